"""The field's verification metrics (WeatherBench 2 definitions), in physical units.

Arrays are (N, H, W) over N forecasts; ``valid`` (H, W) marks cells where a variable is defined.
Spatial means are weighted by cos(latitude).
"""

from __future__ import annotations

import numpy as np


def lat_weights(lat: np.ndarray) -> np.ndarray:
    """cos(lat) weights normalised to mean 1, shape (H, 1)."""
    w = np.cos(np.deg2rad(np.asarray(lat, dtype=np.float64))).clip(min=0)
    return (w / w.mean())[:, None]


def _w(lat: np.ndarray, valid: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    w = np.broadcast_to(lat_weights(lat), shape[-2:]).astype(np.float64)
    return w * (valid.astype(np.float64) if valid is not None else 1.0)


def rmse(pred: np.ndarray, truth: np.ndarray, lat: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Latitude-weighted RMSE: sqrt of the mean over forecasts of the spatially weighted MSE."""
    w = _w(lat, valid, pred.shape)
    mse = (np.nan_to_num((pred - truth) ** 2) * w).sum(axis=(-2, -1)) / w.sum()
    return float(np.sqrt(mse.mean()))


def acc(pred: np.ndarray, truth: np.ndarray, clim: np.ndarray, lat: np.ndarray,
        valid: np.ndarray | None = None) -> float:
    """Anomaly correlation coefficient (anomalies against ``clim``), averaged over forecasts."""
    w = _w(lat, valid, pred.shape)
    fa, oa = np.nan_to_num(pred - clim), np.nan_to_num(truth - clim)
    num = (w * fa * oa).sum(axis=(-2, -1))
    den = np.sqrt((w * fa**2).sum(axis=(-2, -1)) * (w * oa**2).sum(axis=(-2, -1)))
    return float(np.mean(num / np.maximum(den, 1e-12)))


def sea_ice_extent(conc: np.ndarray, lat: np.ndarray, valid: np.ndarray | None = None,
                   threshold: float = 0.15) -> np.ndarray:
    """Sea-ice extent [10^6 km²]: area of cells with concentration >= ``threshold`` (default 15 %)."""
    H, W = conc.shape[-2:]
    dlat, dlon = np.deg2rad(180.0 / H), 2 * np.pi / W
    area = (6371.0**2 * dlat * dlon * np.cos(np.deg2rad(np.asarray(lat))))[:, None] * np.ones((1, W))
    if valid is not None:
        area = area * valid
    covered = np.nan_to_num(conc) >= threshold
    return (covered * area).sum(axis=(-2, -1)) / 1e6


def pattern_correlation(pred: np.ndarray, truth: np.ndarray, lat: np.ndarray,
                        valid: np.ndarray | None = None) -> float:
    """Centred, area-weighted pattern correlation of two (H, W) maps."""
    w = _w(lat, valid, pred.shape)
    w = w / w.sum()
    pa = pred - (w * pred).sum()
    ta = truth - (w * truth).sum()
    return float((w * pa * ta).sum() / np.sqrt((w * pa**2).sum() * (w * ta**2).sum() + 1e-30))


def amplitude_ratio(pred: np.ndarray, truth: np.ndarray, lat: np.ndarray,
                    valid: np.ndarray | None = None) -> float:
    """Ratio of area-weighted RMS amplitudes of two (H, W) response maps (1 = right size)."""
    w = _w(lat, valid, pred.shape)
    return float(np.sqrt((w * pred**2).sum() / max((w * truth**2).sum(), 1e-30)))
