"""Sources described by metadata, read with the field's libraries and aligned onto one grid.

A source is described, not coded: a :class:`SourceSpec` names its file per epoch, its kind
(``raster`` GeoTIFF through rasterio, ``lidar`` LAS/LAZ through laspy rasterised to a
canopy-height model), its bands, units and the normalisation (``(x - offset) / scale``) the model
sees. A region's ``region.json`` lists them, so another sensor is added by describing it.

Every raster is reprojected onto the target grid (the CRS and resolution in ``region.json``, or
the documented default: the UTM zone of the region's centre at 20 m), never onto whichever file
came first. Cells a source does not cover (clouds, outside a lidar strip) are NaN and become
absent tokens in the model.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hfmi_kit.config import json_kind, read_json_object
from hfmi_kit.data.safety import RASTER_DRIVERS, inside
from hfmi_kit.domains.carbon.synth import chave_agb_kg
from hfmi_kit.errors import DataError

DEFAULT_RESOLUTION_M = 20.0
SOURCE_FIELDS = ("name", "file", "kind", "bands", "units", "offset", "scale")
RESAMPLING = ("nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average", "mode", "max", "min", "med",
              "q1", "q3", "sum", "rms")  # rasterio.enums.Resampling names usable for reprojection


_kind = json_kind


@dataclass(frozen=True)
class SourceSpec:
    """How to read and normalise one source."""

    name: str  # e.g. "optical"
    file: str  # file name inside each epoch folder
    kind: str  # "raster" or "lidar"
    bands: tuple[str, ...]  # band names (a lidar source has one: "chm")
    units: str
    offset: tuple[float, ...]  # per band: model input = (value - offset) / scale
    scale: tuple[float, ...]
    resampling: str = "average"  # rasterio resampling onto the target grid

    def __post_init__(self) -> None:
        if self.kind not in ("raster", "lidar"):
            raise DataError(f"source {self.name!r}: kind must be 'raster' or 'lidar', got {self.kind!r}")
        if not (len(self.bands) == len(self.offset) == len(self.scale)) or any(s <= 0 for s in self.scale):
            raise DataError(f"source {self.name!r}: needs one offset and one positive scale per band {self.bands}")
        if not all(math.isfinite(v) for v in (*self.offset, *self.scale)):
            raise DataError(f"source {self.name!r}: offset and scale must be finite numbers")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> SourceSpec:
        """A source from its description in ``region.json`` (``where`` prefixes error messages).

        Every field is checked: ``name``, ``file``, ``kind`` and ``units`` strings, ``bands`` a
        list of names, ``offset`` and ``scale`` one number per band, optional ``resampling``.
        """
        pre = f"{where}: " if where else ""
        if not isinstance(d, dict):
            raise DataError(f"{pre}a source description must be a JSON object, got {_kind(d)}")
        name = d.get("name", "?")
        missing = [k for k in SOURCE_FIELDS if k not in d]
        if missing:
            raise DataError(f"{pre}source {name!r}: missing field(s) {missing}; a source needs "
                            f"{list(SOURCE_FIELDS)} (and optionally resampling)")
        unknown = sorted(set(d) - set(SOURCE_FIELDS) - {"resampling"})
        if unknown:
            raise DataError(f"{pre}source {name!r}: unknown field(s) {unknown}")
        for k in ("name", "file", "kind", "units"):
            if not isinstance(d[k], str) or (k != "units" and not d[k]):
                raise DataError(f"{pre}source {name!r}: {k!r} must be a{' non-empty' if k != 'units' else ''} "
                                f"string, got {_kind(d[k])} {d[k]!r}")
        if not isinstance(d["bands"], list) or not d["bands"] or not all(isinstance(b, str) for b in d["bands"]):
            raise DataError(f"{pre}source {name!r}: 'bands' must be a non-empty list of band names, got {d['bands']!r}")
        for k in ("offset", "scale"):
            v = d[k]
            if not isinstance(v, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
                raise DataError(f"{pre}source {name!r}: {k!r} must be a list of numbers (one per band), got {v!r}")
        res = d.get("resampling", "average")
        if not isinstance(res, str) or res not in RESAMPLING:
            raise DataError(f"{pre}source {name!r}: unknown resampling {res!r}; expected one of {list(RESAMPLING)}")
        try:
            return cls(name=d["name"], file=d["file"], kind=d["kind"], bands=tuple(d["bands"]), units=d["units"],
                       offset=tuple(map(float, d["offset"])), scale=tuple(map(float, d["scale"])), resampling=res)
        except DataError as e:
            raise DataError(f"{pre}{e}") from e

    def groups(self) -> list[str]:
        return [f"{self.name}:{b}" for b in self.bands]


DEFAULT_SOURCES: tuple[SourceSpec, ...] = (
    SourceSpec("optical", "optical.tif", "raster", ("blue", "red", "nir", "swir"), "reflectance",
               (0.05, 0.07, 0.35, 0.2), (0.03, 0.05, 0.1, 0.08)),
    SourceSpec("radar", "radar.tif", "raster", ("vv", "vh"), "dB", (-10.0, -17.0), (2.5, 3.0), "bilinear"),
    SourceSpec("lidar", "lidar.laz", "lidar", ("chm",), "m", (15.0,), (10.0,)),
)


@dataclass
class Grid:
    """The target grid: CRS, affine transform and shape (rows, cols)."""

    crs: Any
    transform: Any
    shape: tuple[int, int]

    @property
    def resolution(self) -> float:
        return float(self.transform.a)

    @property
    def area_ha(self) -> float:
        return abs(self.transform.a * self.transform.e) / 1e4

    def rowcol(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cell (row, col) of map coordinates (the grid is north-up, see :func:`target_grid`)."""
        t = self.transform
        c = (np.asarray(x, dtype=float) - t.c) / t.a
        r = (np.asarray(y, dtype=float) - t.f) / t.e
        return np.floor(r).astype(int), np.floor(c).astype(int)

    def describe(self) -> dict[str, Any]:
        return {"crs": self.crs.to_string(), "transform": list(self.transform)[:6], "shape": list(self.shape)}


@dataclass
class Region:
    """A region folder: metadata, the sources per epoch, plots and the station record."""

    root: Path
    meta: dict[str, Any]
    epochs: list[int]
    sources: list[SourceSpec] = field(default_factory=list)

    def path(self, epoch_index: int, spec: SourceSpec) -> Path:
        return self.root / f"epoch{epoch_index + 1}" / spec.file


def _epochs(f: Path, meta: dict[str, Any]) -> list[int]:
    ep = meta.get("epochs")
    if not isinstance(ep, list) or not ep:
        raise DataError(f"{f}: 'epochs' must be a non-empty list of years, got {_kind(ep)} {ep!r}")
    out = []
    for e in ep:
        try:
            year = int(e) if not isinstance(e, bool) else None
        except (TypeError, ValueError):
            year = None
        if year is None or (isinstance(e, float) and e != year):
            raise DataError(f"{f}: 'epochs' must be a non-empty list of years, got {e!r} in {ep!r}")
        out.append(year)
    if len(set(out)) != len(out):
        raise DataError(f"{f}: 'epochs' {out} lists a year twice")
    return out


def _check_grid_and_truth(root: Path, f: Path, meta: dict[str, Any], n_epochs: int) -> None:
    g = meta.get("grid", {})
    if not isinstance(g, dict):
        raise DataError(f"{f}: 'grid' must be an object with crs and resolution_m, got {_kind(g)}")
    if g.get("crs") is not None and not isinstance(g["crs"], str):
        raise DataError(f"{f}: grid 'crs' must be a string such as 'EPSG:32633', got {g['crs']!r}")
    r = g.get("resolution_m")
    if r is not None and (not isinstance(r, int | float) or isinstance(r, bool) or not 0 < r < 1e6):
        raise DataError(f"{f}: grid 'resolution_m' must be a positive number of metres, got {r!r}")
    t = meta.get("truth", {})
    agb = t.get("agb") if isinstance(t, dict) else None
    if not isinstance(t, dict) or (agb is not None and (not isinstance(agb, list) or len(agb) != n_epochs or
                                                         not all(isinstance(x, str) for x in agb))):
        raise DataError(f"{f}: 'truth' must be an object whose 'agb' lists one raster per epoch ({n_epochs}), "
                        f"got {t!r}")
    for x in agb or []:
        if not inside(root, x, manifest=f).is_file():
            raise DataError(f"{f}: truth raster {x} does not exist")


def open_region(root: str | Path) -> Region:
    """Read and check ``region.json`` (epochs, grid, optional ``sources`` descriptions, truth maps).

    Errors name region.json and the entry: not a JSON object, epochs that are not a list of
    years, a missing epoch folder, a source description with a missing or mistyped field, and a
    declared source that no epoch folder holds (every folder searched is listed). Without a
    ``sources`` entry the default sources are those of the epoch folders.
    """
    root = Path(root)
    f = root / "region.json"
    if not f.is_file():
        raise DataError(f"{root}: no region.json (expected epochs, grid and sources of a region folder)")
    meta = read_json_object(f, error=DataError, expected="a JSON object with 'epochs', 'sources' and 'grid'")
    epochs = _epochs(f, meta)
    folders = [root / f"epoch{e + 1}" for e in range(len(epochs))]
    for k, d in enumerate(folders):
        if not d.is_dir():
            raise DataError(f"{d}: missing; {f.name} declares {len(epochs)} epochs {epochs}, so the region needs "
                            f"folders {', '.join(x.name for x in folders)} (epoch{k + 1} holds {epochs[k]})")
    _check_grid_and_truth(root, f, meta, len(epochs))
    if "sources" in meta:
        if not isinstance(meta["sources"], list) or not meta["sources"]:
            raise DataError(f"{f}: 'sources' must be a non-empty list of source descriptions, got "
                            f"{_kind(meta['sources'])}")
        specs = [SourceSpec.from_dict(s, where=str(f)) for s in meta["sources"]]
        names = [s.name for s in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f"{f}: source(s) {dup} described twice")
        for s in specs:
            for d in folders:  # a source's file is a name inside each epoch folder, nothing outside it
                inside(d, s.file, manifest=f)
            if not any((d / s.file).exists() for d in folders):
                raise DataError(f"{f}: source {s.name!r} (file {s.file}) is in none of the epoch folders searched: "
                                f"{', '.join(str(d / s.file) for d in folders)}")
        present = specs
    else:
        specs = list(DEFAULT_SOURCES)
        present = [s for s in specs if any((d / s.file).exists() for d in folders)]
    if not present:
        raise DataError(f"{root}: none of the source files {[s.file for s in specs]} exists in epoch folders")
    return Region(root=root, meta=meta, epochs=epochs, sources=present)


def _rasterio() -> Any:
    try:
        import rasterio
    except ImportError as e:
        raise ImportError("the carbon domain needs rasterio; install it with `pip install hfmi_kit[carbon]`") from e
    return rasterio


def _open_raster(path: Path) -> Any:
    rasterio = _rasterio()
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes); expected a GeoTIFF")
    try:  # the GeoTIFF driver only: a VRT (or another format) naming other files or URLs is never interpreted
        return rasterio.open(path, driver=RASTER_DRIVERS[0])
    except rasterio.errors.RasterioIOError as e:
        raise DataError(f"{path}: not a readable GeoTIFF, truncated or corrupt ({e})") from e


def _check_raster(path: Path, src: Any) -> None:
    if src.crs is None:
        raise DataError(f"{path}: the raster has no CRS; georeference it (e.g. gdal_edit.py -a_srs EPSG:...)")
    if src.nodata is None and src.dtypes[0].startswith("float") and not src.tags().get("nodata_free"):
        raise DataError(f"{path}: nodata is not declared; set it (e.g. gdal_edit.py -a_nodata -9999) so gaps "
                        "are not read as values")


def raster_bounds_geographic(path: Path) -> tuple[float, float, float, float]:
    _rasterio()
    from rasterio.warp import transform_bounds

    with _open_raster(path) as src:
        _check_raster(path, src)
        return transform_bounds(src.crs, "EPSG:4326", *src.bounds)


def target_grid(region: Region, *, crs: str | None = None, resolution: float | None = None) -> Grid:
    """The grid all sources are aligned onto: ``crs`` / ``resolution`` if given, else those of
    ``region.json``'s ``grid``, else the UTM zone of the region centre at 20 m. Its extent is the
    intersection of the rasters' footprints (an error if they do not overlap)."""
    rasterio = _rasterio()
    from rasterio.transform import from_origin
    from rasterio.warp import transform_bounds

    boxes = {}
    for e in range(len(region.epochs)):
        for s in region.sources:
            p = region.path(e, s)
            if s.kind == "raster" and p.exists():
                boxes[p] = raster_bounds_geographic(p)
    if not boxes:
        raise DataError(f"{region.root}: no raster source to define the map extent")
    w, s_, e_, n = (max(b[0] for b in boxes.values()), max(b[1] for b in boxes.values()),
                    min(b[2] for b in boxes.values()), min(b[3] for b in boxes.values()))
    if w >= e_ or s_ >= n:
        raise DataError("the rasters do not overlap: " + "; ".join(
            f"{p.parent.name}/{p.name} lon {b[0]:.4f}..{b[2]:.4f} lat {b[1]:.4f}..{b[3]:.4f}"
            for p, b in boxes.items()))
    g = region.meta.get("grid", {})
    crs = crs or g.get("crs")
    if crs is None:
        lon0, lat0 = (w + e_) / 2, (s_ + n) / 2
        crs = f"EPSG:{utm_epsg(lon0, lat0)}"
    res = float(resolution or g.get("resolution_m") or DEFAULT_RESOLUTION_M)
    dst = rasterio.crs.CRS.from_user_input(crs)
    left, bottom, right, top = transform_bounds("EPSG:4326", dst, w, s_, e_, n)
    # snap inwards to whole cells so every cell lies inside every raster
    left, top = math.ceil(left / res) * res, math.floor(top / res) * res
    right, bottom = math.floor(right / res) * res, math.ceil(bottom / res) * res
    shape = (int(round((top - bottom) / res)), int(round((right - left) / res)))
    if min(shape) < 8:
        raise DataError(f"the rasters overlap on only {shape} cells of {res} m")
    return Grid(crs=dst, transform=from_origin(left, top, res, res), shape=shape)


def read_raster(path: Path, spec: SourceSpec, grid: Grid) -> np.ndarray:
    """(bands, rows, cols) float32 on ``grid``; NaN where the source has nodata or no coverage."""
    rasterio = _rasterio()
    from rasterio.warp import Resampling, reproject

    with _open_raster(path) as src:
        _check_raster(path, src)
        if src.count != len(spec.bands):
            raise DataError(f"{path}: {src.count} band(s), but source {spec.name!r} describes {len(spec.bands)} "
                            f"{list(spec.bands)}")
        _check_units(path, spec, src)
        out = np.full((src.count, *grid.shape), np.nan, dtype=np.float32)
        try:
            for b in range(src.count):
                band = src.read(b + 1)
                _check_values(path, spec, b, band, src.nodata)
                reproject(band, out[b], src_transform=src.transform, src_crs=src.crs, dst_transform=grid.transform,
                          dst_crs=grid.crs, resampling=getattr(Resampling, spec.resampling), src_nodata=src.nodata,
                          dst_nodata=np.nan)
        except rasterio.errors.RasterioError as e:
            raise DataError(f"{path}: corrupt or truncated raster data ({e})") from e
    return out


def _norm_units(u: str) -> str:
    return "".join(u.split()).lower()


def _check_units(path: Path, spec: SourceSpec, src: Any) -> None:
    """The units a raster declares (GDAL band units or ``units`` tags) must be the source's."""
    for b in range(src.count):
        declared = (src.units[b] if src.units and src.units[b] else "") or src.tags(b + 1).get("units") or \
            src.tags().get("units") or ""
        if declared and spec.units and _norm_units(declared) != _norm_units(spec.units):
            raise DataError(f"{path}: band {b + 1} ({spec.bands[b]}) is in units {declared!r}, but region.json "
                            f"describes source {spec.name!r} in {spec.units!r}; convert the file or fix its units")


def _check_values(path: Path, spec: SourceSpec, b: int, band: np.ndarray, nodata: float | None) -> None:
    """A band must hold some valid value and no infinity (nodata and NaN are gaps)."""
    valid = ~np.isnan(band) if band.dtype.kind == "f" else np.ones(band.shape, bool)
    if nodata is not None and not np.isnan(nodata):
        valid &= band != nodata
    if band.dtype.kind == "f":
        n_inf = int(np.isinf(band[valid]).sum())
        if n_inf:
            raise DataError(f"{path}: band {b + 1} ({spec.bands[b]}) has {n_inf} infinite value(s); declare gaps as "
                            "nodata instead")
    if not valid.any():
        raise DataError(f"{path}: band {b + 1} ({spec.bands[b]}) has no valid value (every cell is nodata or NaN)")


def read_lidar_chm(path: Path, grid: Grid, *, min_points: int = 3) -> np.ndarray:
    """Canopy-height model (1, rows, cols) [m] from a LAS/LAZ file: per cell, the highest return
    minus the mean ground return (class 2); NaN where a cell has fewer than ``min_points``
    returns or no ground return (outside the flight strips)."""
    import laspy
    from pyproj import CRS, Transformer

    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes); expected a LAS/LAZ point cloud")
    errors: list[type[BaseException]] = [laspy.errors.LaspyException, OSError, EOFError, ValueError]
    try:
        import lazrs  # the LAZ backend raises its own type on a cut file

        errors.append(lazrs.LazrsError)
    except ImportError:
        pass
    quiet = logging.getLogger("laspy")  # laspy logs the backend's error before raising it: one message is enough
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        las = laspy.read(str(path))
    except tuple(errors) as e:
        raise DataError(f"{path}: not a readable LAS/LAZ file, truncated or corrupt ({type(e).__name__}: "
                        f"{e})") from e
    finally:
        quiet.setLevel(level)
    dims = set(las.point_format.dimension_names)
    missing = [d for d in ("X", "Y", "Z", "classification") if d not in dims]
    if missing:
        raise DataError(f"{path}: point records lack {missing}; a lidar source needs x, y, z and classification")
    crs = las.header.parse_crs()
    if crs is None:
        raise DataError(f"{path}: the LAS header declares no CRS")
    if not (np.asarray(las.classification) == 2).any():
        raise DataError(f"{path}: no ground returns (classification 2); classify the points before use")
    x, y, z = np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)
    if CRS(crs) != CRS(grid.crs.to_wkt()):
        x, y = Transformer.from_crs(crs, grid.crs.to_wkt(), always_xy=True).transform(x, y)
    r, c = grid.rowcol(x, y)
    inside = (r >= 0) & (r < grid.shape[0]) & (c >= 0) & (c < grid.shape[1])
    idx = (r * grid.shape[1] + c)[inside]
    z, cls = z[inside], np.asarray(las.classification)[inside]
    n = grid.shape[0] * grid.shape[1]
    count = np.bincount(idx, minlength=n)
    top = np.full(n, -np.inf)
    np.maximum.at(top, idx, z)
    g = cls == 2
    gsum = np.bincount(idx[g], weights=z[g], minlength=n)
    gcnt = np.bincount(idx[g], minlength=n)
    chm = np.where((count >= min_points) & (gcnt > 0), top - gsum / np.maximum(gcnt, 1), np.nan)
    return np.clip(chm, 0, None).reshape(1, *grid.shape).astype(np.float32)


def read_sources(region: Region, epoch_index: int, grid: Grid) -> dict[str, np.ndarray]:
    """Every source of one epoch on ``grid``: name -> (bands, rows, cols), NaN where absent.
    A source whose file is missing for this epoch is simply not in the result."""
    out = {}
    for s in region.sources:
        p = region.path(epoch_index, s)
        if not p.exists():
            continue
        out[s.name] = read_raster(p, s, grid) if s.kind == "raster" else read_lidar_chm(p, grid)
    return out


@dataclass
class Plots:
    """Field plots of one epoch on the grid.

    Per plot: ``ids``, the centre cell ``rows``/``cols`` and the plot's biomass ``agb`` [Mg/ha]
    from all its trees. Per grid cell a plot covers (its footprint: the cells whose centres lie
    in the plot square): ``pix_plot`` (index into ``ids``), ``pix_rows``, ``pix_cols`` and
    ``pix_agb``, the biomass of that cell [Mg/ha] from the trees standing in it when the trees are
    stem-mapped (``x_m``, ``y_m``), else the plot's biomass (every cell gets the plot mean).
    ``stem_mapped`` says which.
    """

    ids: list[str]
    rows: np.ndarray
    cols: np.ndarray
    agb: np.ndarray
    pix_plot: np.ndarray
    pix_rows: np.ndarray
    pix_cols: np.ndarray
    pix_agb: np.ndarray
    stem_mapped: bool = False

    def cells(self, ids: set[str] | None = None) -> np.ndarray:
        """Indices of the footprint cells of the plots in ``ids`` (all plots if None)."""
        if ids is None:
            return np.arange(len(self.pix_plot))
        keep = np.array([i in ids for i in self.ids], dtype=bool)
        return np.flatnonzero(keep[self.pix_plot]) if len(self.pix_plot) else np.zeros(0, int)


TREE_LIMITS = {"dbh_cm": (1.0, 500.0), "height_m": (1.3, 120.0), "wood_density_g_cm3": (0.1, 1.5)}
PLOT_RANGES = {"epoch": (0.0, 1e5), "lon": (-180.0, 180.0), "lat": (-90.0, 90.0), "size_m": (-np.inf, np.inf)}


def _value(x: Any) -> str:
    """A table cell as a message shows it: numbers plainly, text quoted."""
    if isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool):
        return f"{float(x):g}"
    return repr(x)


def read_csv(path: Path) -> Any:
    """A CSV table as a pandas frame; an empty, malformed or binary file raises :class:`DataError`
    naming it."""
    import pandas as pd

    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes); expected a CSV table with a header row")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path}: empty CSV, no header row ({e})") from e
    except pd.errors.ParserError as e:
        raise DataError(f"{path}: malformed CSV ({str(e).strip()})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text CSV file ({e})") from e


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS 84 UTM zone of a point (the default grid CRS and a plot's frame)."""
    return (32600 if lat >= 0 else 32700) + int((lon + 180) // 6) % 60 + 1


@functools.lru_cache(maxsize=64)
def _transformer(src: str, dst: str) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs(src, dst, always_xy=True)


def _footprint(grid: Grid, lon: float, lat: float, size: float) -> tuple[np.ndarray, np.ndarray, Any, float, float]:
    """Cells whose centres lie in the plot square (``size`` m, axis-aligned in the plot's UTM
    frame), the transformer from that frame to the grid CRS and the square's south-west corner."""
    frame = f"EPSG:{utm_epsg(lon, lat)}"  # the plot square is axis-aligned in its own UTM zone
    cx, cy = _transformer("EPSG:4326", frame).transform(lon, lat)
    x0, y0 = cx - size / 2, cy - size / 2
    to_grid = _transformer(frame, grid.crs.to_wkt())
    gx, gy = to_grid.transform(np.array([x0, x0 + size, x0, x0 + size]), np.array([y0, y0, y0 + size, y0 + size]))
    r, c = grid.rowcol(gx, gy)
    rr, cc = np.meshgrid(np.arange(r.min(), r.max() + 1), np.arange(c.min(), c.max() + 1), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    t = grid.transform
    px, py = t.c + (cc + 0.5) * t.a, t.f + (rr + 0.5) * t.e  # cell centres in the grid CRS
    fx, fy = to_grid.transform(px, py, direction="INVERSE")
    inside = (fx >= x0) & (fx < x0 + size) & (fy > y0) & (fy <= y0 + size)
    if not inside.any():  # a plot smaller than a cell: the cell under its centre
        r0, c0 = grid.rowcol(*to_grid.transform(cx, cy))
        return np.atleast_1d(r0), np.atleast_1d(c0), to_grid, x0, y0
    return rr[inside], cc[inside], to_grid, x0, y0


def read_plots(region: Region, epoch: int, grid: Grid) -> Plots:
    """Plots of ``epoch`` (``plots.csv``: plot_id, epoch, lon, lat (the plot centre), size_m (the
    side of the square plot); ``trees.csv``: plot_id, epoch, dbh_cm, height_m, wood_density_g_cm3
    and, for stem-mapped plots, x_m, y_m (east and north of the plot's south-west corner)),
    biomass by the Chave et al. 2014 allometry, per plot and per grid cell of its footprint.

    Errors name the file and row: a plot (partly) outside the map, a tree size outside the
    plausible range (1-500 cm, 1.3-120 m, 0.1-1.5 g cm-3), a tree position outside its plot,
    missing columns or unknown plot ids.
    """
    import pandas as pd

    fp, ft = region.root / "plots.csv", region.root / "trees.csv"
    for f in (fp, ft):
        if not f.is_file():
            raise DataError(f"{f}: missing (field plots need plots.csv and trees.csv)")
    plots = read_csv(fp)
    trees = read_csv(ft)
    for f, df, cols in ((fp, plots, ["plot_id", "epoch", "lon", "lat", "size_m"]),
                        (ft, trees, ["plot_id", "epoch", *TREE_LIMITS])):
        miss = [c for c in cols if c not in df.columns]
        if miss:
            raise DataError(f"{f}: missing column(s) {miss}; found {list(df.columns)}")
    for f, df, cols in ((fp, plots, PLOT_RANGES), (ft, trees, {"epoch": PLOT_RANGES["epoch"]})):
        for col, (lo, hi) in cols.items():
            v = pd.to_numeric(df[col], errors="coerce")
            bad = np.flatnonzero(~np.isfinite(v.to_numpy(float)))
            if len(bad):
                i = int(bad[0])
                raise DataError(f"{f}: row {i + 2}: {col}={_value(df[col].iloc[i])} is not a number ({len(bad)} such "
                                "row(s))")
            bad = np.flatnonzero(~v.between(lo, hi).to_numpy())
            if len(bad):
                i = int(bad[0])
                raise DataError(f"{f}: row {i + 2}: {col}={_value(df[col].iloc[i])} outside {lo:g}..{hi:g} "
                                f"({len(bad)} such row(s))")
            df[col] = v
    dup = plots[plots.duplicated(["plot_id", "epoch"])]
    if len(dup):
        i = int(dup.index[0])
        raise DataError(f"{fp}: row {i + 2}: plot {plots.plot_id.iloc[i]} is listed twice for epoch "
                        f"{int(plots.epoch.iloc[i])}")
    plots, trees = plots[plots.epoch == epoch].reset_index(drop=True), trees[trees.epoch == epoch]
    for col, (lo, hi) in TREE_LIMITS.items():
        v = pd.to_numeric(trees[col], errors="coerce")
        bad = trees.index[~v.between(lo, hi)]
        if len(bad):
            i = bad[0]
            raise DataError(f"{ft}: row {i + 2}: {col}={_value(trees.loc[i, col])} outside the plausible range "
                            f"{lo}..{hi} ({len(bad)} such row(s))")
    size = pd.to_numeric(plots.size_m, errors="coerce")
    if not size.between(1.0, 1000.0).all():
        i = int(np.flatnonzero(~size.between(1.0, 1000.0))[0])
        raise DataError(f"{fp}: plot {plots.plot_id.iloc[i]}: size_m={plots.size_m.iloc[i]!r} is not a side in "
                        "metres (1-1000)")
    unknown = sorted(set(trees.plot_id) - set(plots.plot_id))
    if unknown:
        raise DataError(f"{ft}: trees of unknown plot id(s) {unknown[:5]} in epoch {epoch}")
    mapped = {"x_m", "y_m"} <= set(trees.columns)
    if mapped:
        for col in ("x_m", "y_m"):
            v = pd.to_numeric(trees[col], errors="coerce")
            side = trees.plot_id.map(dict(zip(plots.plot_id, size)))
            bad = trees.index[~((v >= 0) & (v <= side))]
            if len(bad):
                i = bad[0]
                raise DataError(f"{ft}: row {i + 2}: {col}={trees.loc[i, col]!r} lies outside plot "
                                f"{trees.loc[i, 'plot_id']} (0..{side.loc[i]:g} m from its south-west corner)")
    kg = chave_agb_kg(trees.dbh_cm.to_numpy(float), trees.height_m.to_numpy(float),
                      trees.wood_density_g_cm3.to_numpy(float))
    by_plot = {pid: np.flatnonzero(trees.plot_id.to_numpy() == pid) for pid in plots.plot_id}
    rows, cols, agb, pp, pr, pc, pa = [], [], [], [], [], [], []
    H, W = grid.shape
    for k, (pid, lon, lat, s) in enumerate(zip(plots.plot_id, plots.lon, plots.lat, size)):
        r, c, to_grid, x0, y0 = _footprint(grid, float(lon), float(lat), float(s))
        inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
        if not inside.all():
            where = "partly outside" if inside.any() else "outside"
            raise DataError(f"{fp}: plot {pid} (lon {lon}, lat {lat}, {s:g} m) lies {where} the map")
        sel = by_plot[pid]
        total = kg[sel].sum()
        agb.append(total / 1000.0 / (s * s / 1e4))
        cr, cc = grid.rowcol(*to_grid.transform(x0 + s / 2, y0 + s / 2))
        rows.append(int(cr))
        cols.append(int(cc))
        if mapped and len(r) > 1:
            tr, tc = grid.rowcol(*to_grid.transform(x0 + trees.x_m.to_numpy(float)[sel],
                                                    y0 + trees.y_m.to_numpy(float)[sel]))
            # each tree to its footprint cell (the nearest one for a tree on the square's edge)
            near = np.argmin((tr[:, None] - r[None]) ** 2 + (tc[:, None] - c[None]) ** 2, axis=1)
            cell = np.bincount(near, weights=kg[sel], minlength=len(r)) / 1000.0 / grid.area_ha
        else:
            cell = np.full(len(r), agb[-1])
        pp.append(np.full(len(r), k))
        pr.append(r)
        pc.append(c)
        pa.append(cell)
    def cat(x: list[np.ndarray], t: type) -> np.ndarray:
        return np.concatenate(x).astype(t) if x else np.zeros(0, t)
    return Plots(ids=plots.plot_id.tolist(), rows=np.array(rows, int), cols=np.array(cols, int),
                 agb=np.array(agb, float), pix_plot=cat(pp, int), pix_rows=cat(pr, int), pix_cols=cat(pc, int),
                 pix_agb=cat(pa, float), stem_mapped=mapped)


def read_station(region: Region) -> Any:
    """The station CO2 record (``station_co2.csv``: date, co2_ppm[, background_ppm]) as a frame,
    checked for dates in order and plausible values (250-600 ppm); None when absent."""
    import pandas as pd

    f = region.root / "station_co2.csv"
    if not f.is_file():
        return None
    df = read_csv(f)
    miss = [c for c in ("date", "co2_ppm") if c not in df.columns]
    if miss:
        raise DataError(f"{f}: missing column(s) {miss}")
    df["date"] = pd.to_datetime(df["date"], errors="coerce")
    if df["date"].isna().any() or not df["date"].is_monotonic_increasing:
        raise DataError(f"{f}: dates must be valid and increasing")
    if not df["co2_ppm"].between(250, 600).all():
        raise DataError(f"{f}: co2_ppm outside 250-600 ppm")
    return df


def sources_json(specs: list[SourceSpec]) -> list[dict[str, Any]]:
    return [asdict(s) for s in specs]


__all__ = ["DEFAULT_SOURCES", "Grid", "Plots", "Region", "SourceSpec", "open_region", "read_csv", "read_lidar_chm",
           "read_plots", "read_raster", "read_sources", "read_station", "sources_json", "target_grid"]
