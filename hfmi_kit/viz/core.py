"""Generic plot builders: maps with a slider, metric curves, loss curves."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from hfmi_kit.train.loop import read_log
from hfmi_kit.viz import require_holoviews

DISPLAY_PX = 512  # the largest side of an image sent to a browser: maps go at the resolution shown


def fit_display(a: np.ndarray, max_px: int = DISPLAY_PX) -> np.ndarray:
    """Block-average (NaN-aware) a 2-D array by the smallest integer factor that brings both
    sides to at most ``max_px``; smaller arrays come back unchanged."""
    a = np.asarray(a)
    f = int(np.ceil(max(a.shape) / max_px)) if a.ndim == 2 else 1
    if f <= 1:
        return a
    H, W = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    blocks = a[:H, :W].astype(np.float64).reshape(H // f, f, W // f, f)
    with np.errstate(invalid="ignore"):
        cnt = np.isfinite(blocks).sum(axis=(1, 3))
        tot = np.where(np.isfinite(blocks), blocks, 0.0).sum(axis=(1, 3))
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan).astype(np.float32)


def fit_display_da(da: xr.DataArray, x: str, y: str, max_px: int = DISPLAY_PX) -> xr.DataArray:
    """:func:`fit_display` for a DataArray with named ``x``/``y`` dims (coordinates averaged too)."""
    f = int(np.ceil(max(da.sizes[x], da.sizes[y]) / max_px))
    return da if f <= 1 else da.coarsen({x: f, y: f}, boundary="trim").mean()


LAND_COLOUR = "#b4b4b4"  # where a field has no value (land for an ocean variable): not white, which is ice
COASTLINE = Path(__file__).parent / "data" / "ne_110m_coastline.npz"


@functools.cache
def _coast_lonlat() -> np.ndarray:
    with np.load(COASTLINE, allow_pickle=False) as z:
        return np.asarray(z["lonlat"], dtype=np.float64)


def coastline_paths(lon: np.ndarray, lat: np.ndarray) -> list[np.ndarray]:
    """The shipped Natural Earth 1:110m coastline (no network needed) as (lon, lat) lines in the
    longitude convention of ``lon`` (-180..180 or 0..360), cut where a line crosses the map's
    edge, and only the lines that touch the box of ``lon``/``lat`` (computed once per grid: every
    frame of a map reuses it)."""
    lon = np.asarray(lon, dtype=np.float64)
    east = bool(lon.size and float(np.nanmax(lon)) > 180)  # a 0..360 grid (ERA5, CMIP)
    box = (float(np.nanmin(lon)), float(np.nanmax(lon)), float(np.nanmin(lat)), float(np.nanmax(lat)))
    return list(_coast_lines(east, box))


@functools.lru_cache(maxsize=8)
def _coast_lines(east: bool, box: tuple[float, float, float, float]) -> tuple[np.ndarray, ...]:
    xy = _coast_lonlat().copy()
    if east:
        xy[:, 0] = np.mod(xy[:, 0], 360.0)
    breaks = np.flatnonzero(~np.isfinite(xy[:, 0]))
    lines, start = [], 0
    for stop in (*breaks, len(xy)):
        seg = xy[start:stop]
        start = stop + 1
        if len(seg) < 2:
            continue
        jumps = np.flatnonzero(np.abs(np.diff(seg[:, 0])) > 180) + 1  # wrapped across the map's edge
        lines += [part for part in np.split(seg, jumps) if len(part) > 1]
    x0, x1, y0, y1 = box
    return tuple(ln for ln in lines if (ln[:, 0].max() >= x0) and (ln[:, 0].min() <= x1)
                 and (ln[:, 1].max() >= y0) and (ln[:, 1].min() <= y1))


def _lonlat_dims(x: str, y: str) -> list[Any]:
    hv = require_holoviews()
    return [hv.Dimension(x, label="longitude", unit="°E"), hv.Dimension(y, label="latitude", unit="°N")]


def _geo(img: Any, lon: np.ndarray, lat: np.ndarray, coast: bool) -> Any:
    """``img`` (on lon/lat) with the coastline over it, held to the image's extent."""
    hv = require_holoviews()
    if not coast:
        return img
    paths = hv.Path(coastline_paths(lon, lat), kdims=img.kdims, label="coastline").opts(
        color="black", line_width=0.7, alpha=0.8)
    half_x = float(np.abs(np.diff(lon[:2]))[0]) / 2 if len(lon) > 1 else 0.5
    half_y = float(np.abs(np.diff(lat[:2]))[0]) / 2 if len(lat) > 1 else 0.5
    return (img * paths).opts(xlim=(float(np.min(lon)) - half_x, float(np.max(lon)) + half_x),
                              ylim=(float(np.min(lat)) - half_y, float(np.max(lat)) + half_y))


@functools.cache
def _projected_coast(projection: str) -> tuple[np.ndarray, ...]:
    """The shipped coastline in ``projection`` (km), computed once: every frame of a map reuses it."""
    from hfmi_kit.viz import projection as proj

    return tuple(proj.project_lines(projection, list(_coast_lines(False, (-180.0, 180.0, -90.0, 90.0)))))


def _projected(values: np.ndarray, lon: np.ndarray, lat: np.ndarray, projection: str, *, label: str, cmap: str,
               clim: tuple[float, float], width: int, title: str, coast: bool) -> Any:
    """One (lat, lon) field drawn in ``projection`` (see :mod:`hfmi_kit.viz.projection`): the globe
    grey under the field (so cells without a value read as land), white off it, a graticule and
    the coastline (``coast``) over it."""
    from hfmi_kit.viz import projection as proj

    hv = require_holoviews()
    lk = proj.lookup(projection, lon, lat)
    kd = [hv.Dimension("x", label=f"x ({projection})", unit="km"),
          hv.Dimension("y", label=f"y ({projection})", unit="km")]
    globe = hv.Image((lk.x, lk.y, lk.globe.astype(np.float64)), kdims=kd, vdims=["globe"]).opts(
        cmap=["white", LAND_COLOUR], clim=(0, 1), colorbar=False, tools=[])
    field = hv.Image((lk.x, lk.y, lk.sample(values)), kdims=kd, vdims=[label]).opts(
        cmap=cmap, clim=clim, colorbar=True, tools=["hover"], clipping_colors={"NaN": "transparent"})
    layers = globe * field * hv.Path(list(proj.graticule(projection)), kdims=kd, label="graticule").opts(
        color="#777777", line_width=0.4, alpha=0.7)
    if coast:
        layers = layers * hv.Path(list(_projected_coast(projection)), kdims=kd, label="coastline").opts(
            color="black", line_width=0.7, alpha=0.8)
    return layers.opts(title=title, xaxis=None, yaxis=None, data_aspect=1, frame_width=max(200, width - 120))


def map_with_slider(da: xr.DataArray, slider_dim: str, *, x: str = "lon", y: str = "lat",
                    cmap: str = "RdBu_r", title: str = "", symmetric: bool = False,
                    width: int = 520, height: int = 280, dynamic: bool = False, coast: bool = True,
                    projection: str = "plate-carree") -> Any:
    """A map (``x``, ``y``: longitude and latitude in degrees) for each value of ``slider_dim``
    with a slider widget: a HoloMap (every frame computed, so a static notebook keeps its slider)
    or, with ``dynamic``, a DynamicMap that renders (and sends to a browser) only the frame shown.
    Maps are reduced to display size, drawn with the coastline (``coast``), their colourbar
    titled with the variable and its units, cells without a value (land for an ocean field) in
    grey. ``projection`` (:data:`hfmi_kit.viz.projection.PROJECTIONS`: plate-carree, robinson,
    mollweide, north-polar, south-polar) draws the maps in that projection."""
    from hfmi_kit.viz.projection import check_projection

    hv = require_holoviews()
    check_projection(projection)
    da = fit_display_da(da, x, y)
    vals = np.asarray(da.values, dtype=np.float64)
    lo, hi = np.nanmin(vals), np.nanmax(vals)
    if symmetric:
        m = max(abs(lo), abs(hi))
        lo, hi = -m, m
    units = da.attrs.get("units", "")
    label = f"{da.name or ''} [{units}]" if units else str(da.name or "")
    lon, lat = da[x].values, da[y].values

    def img(v: Any) -> Any:
        sl = da.sel({slider_dim: v}).transpose(y, x)
        if projection != "plate-carree":
            return _projected(sl.values, lon, lat, projection, label=label, cmap=cmap, clim=(lo, hi), width=width,
                              title=title, coast=coast)
        im = hv.Image((sl[x].values, sl[y].values, sl.values), kdims=_lonlat_dims(x, y), vdims=[label]).opts(
            cmap=cmap, clim=(lo, hi), colorbar=True, width=width, height=height, tools=["hover"],
            title=title, clipping_colors={"NaN": LAND_COLOUR})
        return _geo(im, lon, lat, coast)

    keys = [v.item() if hasattr(v, "item") else v for v in da[slider_dim].values]
    if dynamic:
        return hv.DynamicMap(img, kdims=[hv.Dimension(slider_dim, values=keys, default=keys[0])])
    return hv.HoloMap({v: img(v) for v in keys}, kdims=[slider_dim])


def single_map(da: xr.DataArray, *, x: str = "lon", y: str = "lat", cmap: str = "RdBu_r", title: str = "",
               symmetric: bool = False, clim: tuple[float, float] | None = None, width: int = 420,
               height: int = 240, coast: bool = True, projection: str = "plate-carree") -> Any:
    """One lon-lat map as an ``hv.Image``, with the coastline over it (``coast``) and cells
    without a value in grey, in ``projection`` (see :func:`map_with_slider`)."""
    from hfmi_kit.viz.projection import check_projection

    hv = require_holoviews()
    check_projection(projection)
    da = fit_display_da(da, x, y)
    vals = np.asarray(da.values, dtype=np.float64)
    if clim is None:
        lo, hi = np.nanmin(vals), np.nanmax(vals)
        if symmetric:
            m = max(abs(lo), abs(hi), 1e-9)
            lo, hi = -m, m
        clim = (float(lo), float(hi))
    sl = da.transpose(y, x)
    units = da.attrs.get("units", "")
    if projection != "plate-carree":
        return _projected(sl.values, sl[x].values, sl[y].values, projection,
                          label=f"{da.name} [{units}]" if units else str(da.name), cmap=cmap, clim=clim,
                          width=width, title=title, coast=coast)
    im = hv.Image((sl[x].values, sl[y].values, sl.values), kdims=_lonlat_dims(x, y),
                  vdims=[f"{da.name} [{units}]" if units else str(da.name)]).opts(
        cmap=cmap, clim=clim, colorbar=True, width=width, height=height, tools=["hover"], title=title,
        clipping_colors={"NaN": LAND_COLOUR})
    return _geo(im, sl[x].values, sl[y].values, coast)


def curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
           title: str = "", logx: bool = False, width: int = 480, height: int = 300) -> Any:
    """Overlay of named (x, y) curves with markers."""
    hv = require_holoviews()
    items = []
    for name, (xs, ys) in series.items():
        c = hv.Curve((list(xs), list(ys)), xlabel, ylabel, label=name)
        items.append(c * hv.Scatter(c).opts(size=6))
    return hv.Overlay(items).opts(title=title, width=width, height=height, legend_position="top_right",
                                  logx=logx)


def loss_curve(metrics_jsonl: str | Path | Mapping[str, str | Path], keys: Sequence[str] = ("loss",)) -> Any:
    """Loss against optimiser step from a run's ``metrics.jsonl`` (or ``{stage: path}`` for a run
    trained in stages): the training loss and, where logged, the evaluation loss."""
    logs = metrics_jsonl if isinstance(metrics_jsonl, Mapping) else {"": metrics_jsonl}
    series: dict[str, tuple[list[float], list[float]]] = {}
    for stage, path in logs.items():
        rows = [r for r in read_log(path) if isinstance(r.get("step"), (int, float))]
        for split, name in (("train", "training"), ("eval", "evaluation")):
            for k in keys:
                pts = [(r["step"], r[k]) for r in rows if r.get("split") == split and isinstance(r.get(k), (int, float))
                       and math.isfinite(r[k])]
                if pts:
                    label = " ".join(x for x in (stage, name, k if k != "loss" else "") if x)
                    series[label + (" loss" if k == "loss" else "")] = ([p[0] for p in pts], [p[1] for p in pts])
    if not series:
        raise ValueError(f"no loss logged in {', '.join(str(p) for p in logs.values())}")
    return curves(series, xlabel="optimiser step", ylabel="loss", title="Training loss", width=560)


# how a method or baseline of ``metrics.json`` (``rmse_damped_persistence``) is named in a legend
METHOD_NAMES = {"scratch": "from scratch", "rf": "random forest", "dummy": "mean predictor",
                "unet": "U-Net, all labelled cases", "unet_same": "U-Net, same cases"}


def method_name(method: str) -> str:
    """The legend name of a method or baseline key (``unet_same`` -> ``U-Net, same cases``)."""
    return METHOD_NAMES.get(method, method.replace("_", " "))


def label_efficiency(rows: Sequence[Mapping[str, Any]], metric: str, *, xlabel: str = "labelled cases",
                     ylabel: str | None = None, title: str | None = None) -> Any:
    """``metric`` against the number of labels (log axis), one curve per ``method`` of ``rows``
    (dicts with ``labels``, ``method`` and the metric); ``ylabel`` names the metric with its unit."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in sorted(rows, key=lambda r: r["labels"]):
        xs, ys = series.setdefault(method_name(str(r["method"])), ([], []))
        xs.append(float(r["labels"]))
        ys.append(float(r[metric]))
    return curves(series, xlabel=xlabel, ylabel=ylabel or metric, title=title or f"label efficiency ({metric})",
                  logx=True)
