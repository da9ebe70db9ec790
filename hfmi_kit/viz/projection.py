"""Map projections for lat-lon fields without cartopy: pyproj and a nearest-cell lookup.

A field on a regular latitude-longitude grid is drawn in a projection by sampling it at the
centres of a display-sized pixel grid in projected coordinates (each pixel takes the value of the
grid cell under it, found by inverting the projection). The lookup is computed once per grid and
projection and reused by every frame of a map. Cells without a value (land for an ocean field)
stay grey, as on the unprojected maps, and the space outside the globe is white; a graticule every
30° (10° of latitude on the polar maps) and the shipped coastline are drawn over the field.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from hfmi_kit.errors import ConfigError

# name -> (pyproj definition, the latitude the map reaches down to: None for the whole globe)
PROJECTIONS: dict[str, tuple[str, float | None]] = {
    "plate-carree": ("", None),  # the grid as it is (equirectangular): the default
    "robinson": ("+proj=robin +lon_0=0 +datum=WGS84 +units=m +no_defs", None),
    "mollweide": ("+proj=moll +lon_0=0 +datum=WGS84 +units=m +no_defs", None),
    "north-polar": ("EPSG:3413", 40.0),  # NSIDC sea-ice polar stereographic north, poleward of 40°N
    "south-polar": ("EPSG:3031", -40.0),  # Antarctic polar stereographic, poleward of 40°S
}


def check_projection(name: str) -> str:
    """``name`` if it is one of :data:`PROJECTIONS`, else a one-line error listing them."""
    if name not in PROJECTIONS:
        raise ConfigError(f"projection {name!r} is not one of {', '.join(PROJECTIONS)}")
    return name


@functools.cache
def _transformers(name: str) -> tuple[Any, Any]:
    try:
        from pyproj import Transformer
    except ImportError as e:
        raise ImportError("map projections need pyproj; install it with `pip install hfmi_kit[viz]`") from e

    crs = PROJECTIONS[name][0]
    return (Transformer.from_crs("EPSG:4326", crs, always_xy=True),
            Transformer.from_crs(crs, "EPSG:4326", always_xy=True))


def forward(name: str, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projected (x, y) in km of (lon, lat) in degrees; not finite where undefined."""
    x, y = _transformers(name)[0].transform(np.asarray(lon, np.float64), np.asarray(lat, np.float64))
    return np.asarray(x) / 1000.0, np.asarray(y) / 1000.0


def _extent(name: str) -> tuple[float, float, float, float]:
    edge = PROJECTIONS[name][1]
    if edge is None:
        xs, _ = forward(name, np.array([-180.0, 180.0]), np.array([0.0, 0.0]))
        _, ys = forward(name, np.array([0.0, 0.0]), np.array([-90.0, 90.0]))
        return float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())
    x, y = forward(name, np.array([0.0, 90.0, 180.0, -90.0]), np.full(4, edge))
    r = float(np.max(np.hypot(x, y)))
    return -r, r, -r, r


@dataclass(frozen=True)
class Lookup:
    """Where each display pixel of a projected map takes its value from."""

    x: np.ndarray  # pixel centres, km (W,)
    y: np.ndarray  # pixel centres, km (H,)
    cell: np.ndarray  # (H, W) flat index into the (lat, lon) grid; -1 where no cell lies under the pixel
    globe: np.ndarray  # (H, W) bool: the pixel is on the globe (inside the map's latitude bound)

    def sample(self, values: np.ndarray) -> np.ndarray:
        """``values`` (lat, lon) at the pixels: NaN off the grid and where the cell has no value."""
        flat = np.asarray(values, dtype=np.float64).ravel()
        out = np.full(self.cell.shape, np.nan)
        ok = self.cell >= 0
        out[ok] = flat[self.cell[ok]]
        return out


@functools.lru_cache(maxsize=16)
def _lookup(name: str, lon: tuple[float, ...], lat: tuple[float, ...], px: int) -> Lookup:
    x0, x1, y0, y1 = _extent(name)
    w = px if (x1 - x0) >= (y1 - y0) else max(2, round(px * (x1 - x0) / (y1 - y0)))
    h = max(2, round(w * (y1 - y0) / (x1 - x0)))
    xs = x0 + (np.arange(w) + 0.5) * (x1 - x0) / w
    ys = y0 + (np.arange(h) + 0.5) * (y1 - y0) / h
    X, Y = np.meshgrid(xs, ys)
    with np.errstate(invalid="ignore"):
        qlon, qlat = _transformers(name)[1].transform(X * 1000.0, Y * 1000.0)
        qlon, qlat = np.asarray(qlon), np.asarray(qlat)
        bx, by = forward(name, qlon, qlat)  # round trip: a pixel off the globe does not come back
        step = (x1 - x0) / w
        globe = np.isfinite(qlon) & np.isfinite(qlat) & (np.hypot(bx - X, by - Y) < 0.5 * step)
    edge = PROJECTIONS[name][1]
    if edge is not None:
        globe &= (qlat >= edge) if edge > 0 else (qlat <= edge)
    lo, la = np.asarray(lon), np.asarray(lat)
    dlon = float(lo[1] - lo[0]) if lo.size > 1 else 360.0
    dlat = float(la[1] - la[0]) if la.size > 1 else 180.0
    full = abs(abs(dlon) * lo.size - 360.0) < 1e-6 * 360.0  # the grid goes round the globe
    with np.errstate(invalid="ignore"):
        j = np.rint(np.mod(np.where(globe, qlon, 0.0) - lo[0], 360.0) / dlon).astype(np.int64)
        if full:
            j = np.mod(j, lo.size)
        i = np.rint((np.where(globe, qlat, 0.0) - la[0]) / dlat).astype(np.int64)
    ok = globe & (i >= 0) & (i < la.size) & (j >= 0) & (j < lo.size)
    ii, jj = np.clip(i, 0, la.size - 1), np.clip(j, 0, lo.size - 1)
    ok &= np.abs(np.where(ok, qlat, 0.0) - la[ii]) <= abs(dlat) / 2 + 1e-9  # inside the grid's latitudes
    if not full:
        ok &= np.abs(np.mod(np.where(ok, qlon, 0.0) - lo[jj] + 180.0, 360.0) - 180.0) <= abs(dlon) / 2 + 1e-9
    return Lookup(xs, ys, np.where(ok, ii * lo.size + jj, -1), globe)


def lookup(name: str, lon: np.ndarray, lat: np.ndarray, px: int = 512) -> Lookup:
    """The pixel -> grid-cell lookup of a regular (``lon``, ``lat``) grid in projection ``name``."""
    check_projection(name)
    return _lookup(name, tuple(np.asarray(lon, np.float64).tolist()), tuple(np.asarray(lat, np.float64).tolist()),
                   int(px))


def _split_finite(x: np.ndarray, y: np.ndarray, keep: np.ndarray) -> list[np.ndarray]:
    ok = keep & np.isfinite(x) & np.isfinite(y)
    lines, start = [], None
    for k in range(len(ok) + 1):
        if k < len(ok) and ok[k]:
            start = k if start is None else start
        elif start is not None:
            if k - start > 1:
                lines.append(np.column_stack([x[start:k], y[start:k]]))
            start = None
    return lines


def project_lines(name: str, lines: list[np.ndarray]) -> list[np.ndarray]:
    """(lon, lat) lines projected to km, cut where they leave the map (off its latitude bound)."""
    edge = PROJECTIONS[name][1]
    out: list[np.ndarray] = []
    for ln in lines:
        x, y = forward(name, ln[:, 0], ln[:, 1])
        keep = np.ones(len(ln), bool) if edge is None else ((ln[:, 1] >= edge) if edge > 0 else (ln[:, 1] <= edge))
        out += _split_finite(x, y, keep)
    return out


@functools.cache
def graticule(name: str) -> tuple[np.ndarray, ...]:
    """Meridians every 30° and parallels every 30° (10° poleward of the polar maps' bound), in km."""
    edge = PROJECTIONS[name][1]
    if edge is None:
        lats, parallels = np.linspace(-90, 90, 181), np.arange(-60, 61, 30)
    else:
        lats = np.linspace(edge, 90.0 if edge > 0 else -90.0, 101)
        parallels = np.arange(edge, 90.0 if edge > 0 else -90.0, 10.0 if edge > 0 else -10.0)
    lines = [np.column_stack([np.full_like(lats, m), lats]) for m in np.arange(-180, 181, 30)]
    lines += [np.column_stack([np.linspace(-180, 180, 361), np.full(361, p)]) for p in parallels]
    return tuple(project_lines(name, lines))
