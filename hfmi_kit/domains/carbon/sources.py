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
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hfmi_kit.config import json_kind, read_json_object
from hfmi_kit.data.safety import inside
from hfmi_kit.domains.carbon import tiles as T
from hfmi_kit.domains.carbon.synth import chave_agb_kg
from hfmi_kit.errors import DataError

DEFAULT_RESOLUTION_M = 20.0
SOURCE_FIELDS = ("name", "file", "kind", "bands", "units", "offset", "scale")
RESAMPLING = ("nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average", "mode", "max", "min", "med",
              "q1", "q3", "sum", "rms")  # rasterio.enums.Resampling names usable for reprojection


_kind = json_kind
OPTIONAL_FIELDS = ("resampling", "sensor", "wavelengths_nm", "dn_scale", "dn_offset", "nodata", "crs")


@dataclass(frozen=True)
class Sensor:
    """What a product's files do not say about themselves: band names and central wavelengths,
    the scaling of its stored numbers to physical units (used when a file carries no GDAL band
    scale/offset), its nodata value (when a file declares none) and a normalisation the model
    sees (``(value - offset) / scale``: typical values over vegetated land)."""

    kind: str
    units: str
    bands: tuple[str, ...]
    wavelengths_nm: tuple[float, ...]
    offset: tuple[float, ...]
    scale: tuple[float, ...]
    dn_scale: float | None = None
    dn_offset: float | None = None
    nodata: float | None = None
    resampling: str = "average"
    reference: str = ""


SENSORS: dict[str, Sensor] = {
    # Sentinel-2 Level-2A surface reflectance: DN / 10000 with BOA_ADD_OFFSET -1000 from processing
    # baseline 04.00 (25 January 2022), nodata 0 (ESA, S2 L2A product specification)
    "sentinel-2-l2a": Sensor(
        "raster", "reflectance",
        ("b01", "b02", "b03", "b04", "b05", "b06", "b07", "b08", "b8a", "b09", "b11", "b12"),
        (442.7, 492.7, 559.8, 664.6, 704.1, 740.5, 782.8, 832.8, 864.7, 945.1, 1613.7, 2202.4),
        (0.04, 0.05, 0.08, 0.07, 0.12, 0.22, 0.26, 0.28, 0.29, 0.09, 0.20, 0.12),
        (0.02, 0.03, 0.04, 0.05, 0.05, 0.07, 0.08, 0.09, 0.09, 0.04, 0.07, 0.06),
        dn_scale=1e-4, dn_offset=-0.1, nodata=0.0, reference="ESA Sentinel-2 L2A, processing baseline >= 04.00"),
    # Landsat 8-9 Collection 2 Level-2 surface reflectance: DN x 2.75e-5 - 0.2, nodata 0 (USGS)
    "landsat-8-9-c2-l2": Sensor(
        "raster", "reflectance", ("sr_b1", "sr_b2", "sr_b3", "sr_b4", "sr_b5", "sr_b6", "sr_b7"),
        (443.0, 482.0, 561.4, 654.6, 864.6, 1608.9, 2200.7),
        (0.04, 0.05, 0.08, 0.07, 0.28, 0.20, 0.12), (0.02, 0.03, 0.04, 0.05, 0.09, 0.07, 0.06),
        dn_scale=2.75e-5, dn_offset=-0.2, nodata=0.0, reference="USGS Landsat Collection 2 Level-2 Science Products"),
    # Sentinel-1 GRD backscatter, terrain-corrected, in dB (VV, VH)
    "sentinel-1-grd-db": Sensor("raster", "dB", ("vv", "vh"), (55465.8e6, 55465.8e6), (-10.0, -17.0), (2.5, 3.0),
                                resampling="bilinear", reference="ESA Sentinel-1 GRD, C band (5.405 GHz)"),
    # a canopy-height model from airborne lidar (metres above ground), or the point clouds themselves
    "lidar-chm": Sensor("raster", "m", ("chm",), (), (15.0,), (10.0,), reference="canopy-height model [m]"),
    "lidar-points": Sensor("lidar", "m", ("chm",), (), (15.0,), (10.0,), reference="LAS/LAZ, ground class 2"),
}


def _from_sensor(d: dict[str, Any], pre: str) -> dict[str, Any]:
    """A source description completed from its named ``sensor``: bands (all, or the subset
    listed, in the sensor's naming), kind, units, normalisation, wavelengths, DN scaling, nodata."""
    name = d.get("name", "?")
    key = d["sensor"]
    if not isinstance(key, str) or key not in SENSORS:
        raise DataError(f"{pre}source {name!r}: unknown sensor {key!r}; known: {sorted(SENSORS)} (or describe "
                        "bands, units, offset and scale yourself)")
    sen = SENSORS[key]
    bands = d.get("bands", list(sen.bands))
    if not isinstance(bands, list) or not bands or not all(isinstance(b, str) for b in bands):
        raise DataError(f"{pre}source {name!r}: 'bands' must be a list of {key} band names, got {bands!r}")
    unknown = [b for b in bands if b.lower() not in sen.bands]
    if unknown:
        raise DataError(f"{pre}source {name!r}: band(s) {unknown} are not {key} bands {list(sen.bands)}")
    idx = [sen.bands.index(b.lower()) for b in bands]
    out = {"kind": sen.kind, "units": sen.units, "bands": [sen.bands[i] for i in idx],
           "offset": [sen.offset[i] for i in idx], "scale": [sen.scale[i] for i in idx],
           "resampling": sen.resampling}
    if sen.wavelengths_nm:
        out["wavelengths_nm"] = [sen.wavelengths_nm[i] for i in idx]
    for k in ("dn_scale", "dn_offset", "nodata"):
        if getattr(sen, k) is not None:
            out[k] = getattr(sen, k)
    return {**out, **{k: v for k, v in d.items() if k != "bands"}, "bands": out["bands"]}


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
    sensor: str | None = None  # a name of :data:`SENSORS` the description was completed from
    wavelengths_nm: tuple[float, ...] | None = None  # per band, its central wavelength
    dn_scale: float | None = None  # stored number -> units, when a file has no GDAL scale/offset
    dn_offset: float | None = None
    nodata: float | None = None  # the nodata value of files that declare none
    crs: str | None = None  # the CRS (AUTHORITY:CODE) of files that declare none

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
        if d.get("sensor") is not None:
            d = _from_sensor(d, pre)
        missing = [k for k in SOURCE_FIELDS if k not in d]
        if missing:
            raise DataError(f"{pre}source {name!r}: missing field(s) {missing}; a source needs "
                            f"{list(SOURCE_FIELDS)} (optionally {list(OPTIONAL_FIELDS)}), or a known 'sensor' "
                            f"({', '.join(sorted(SENSORS))}) and its name and file")
        unknown = sorted(set(d) - set(SOURCE_FIELDS) - set(OPTIONAL_FIELDS))
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
        extra: dict[str, Any] = {}
        for k in ("dn_scale", "dn_offset", "nodata"):
            v = d.get(k)
            if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v)):
                raise DataError(f"{pre}source {name!r}: {k!r} must be a finite number, got {v!r}")
            extra[k] = None if v is None else float(v)
        crs = d.get("crs")
        if crs is not None:
            extra["crs"] = _authority_code(crs, f"{pre}source {name!r}")
        wl = d.get("wavelengths_nm")
        if wl is not None and (not isinstance(wl, list) or len(wl) != len(d["bands"]) or
                               not all(isinstance(x, int | float) and not isinstance(x, bool) for x in wl)):
            raise DataError(f"{pre}source {name!r}: 'wavelengths_nm' must list one number per band, got {wl!r}")
        try:
            return cls(name=d["name"], file=d["file"], kind=d["kind"], bands=tuple(d["bands"]), units=d["units"],
                       offset=tuple(map(float, d["offset"])), scale=tuple(map(float, d["scale"])), resampling=res,
                       sensor=d.get("sensor"), wavelengths_nm=None if wl is None else tuple(map(float, wl)), **extra)
        except DataError as e:
            raise DataError(f"{pre}{e}") from e

    def groups(self) -> list[str]:
        return [f"{self.name}:{b}" for b in self.bands]


def _authority_code(v: Any, where: str) -> str:
    """A CRS named as AUTHORITY:CODE (e.g. EPSG:2994) that pyproj knows. Nothing else is taken: a
    PROJ string or WKT may name grid files, and so read files outside the region."""
    import re

    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z]+:[0-9]+", v):
        raise DataError(f"{where}: 'crs' must name a CRS as AUTHORITY:CODE (e.g. EPSG:2994), got {v!r}")
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_user_input(v)
    except CRSError as e:
        raise DataError(f"{where}: 'crs' {v!r} is not a CRS pyproj knows ({e})") from e
    return v.upper()


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


def _open_raster(path: Path) -> Any:
    return T.open_raster(path)


def source_reader(region: Region, epoch_index: int, spec: SourceSpec) -> T.RasterSource | T.LidarSource | None:
    """The reader of one source of one epoch (see :mod:`.tiles`): its file or folder of files,
    headers checked against the description; None when that epoch has no such file."""
    p = region.path(epoch_index, spec)
    if not p.exists():
        return None
    return T.open_source(p, spec)


def target_grid(region: Region, *, crs: str | None = None, resolution: float | None = None,
                readers: list[dict[str, Any]] | None = None) -> Grid:
    """The grid all sources are aligned onto: ``crs`` / ``resolution`` if given, else those of
    ``region.json``'s ``grid``, else the UTM zone of the region centre at 20 m. Its extent is the
    intersection of the raster sources' footprints in the grid's CRS (a folder's footprint is
    the union of its files'; an error if they do not overlap; a region of lidar tiles alone: their
    footprint), its cells those of the first raster in the grid's CRS and resolution when there is
    one. Only the files' headers are read."""
    rasterio = T.rasterio_module()
    from rasterio.transform import from_origin

    def union(b: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
        return min(x[0] for x in b), min(x[1] for x in b), max(x[2] for x in b), max(x[3] for x in b)

    boxes: dict[Path, tuple[float, float, float, float]] = {}  # geographic, per source and epoch
    headers: list[dict[str, Any]] = []
    footprints: list[Any] = []  # the readers whose footprints bound the map
    lidar: dict[Path, Any] = {}
    for e in range(len(region.epochs)):
        for s in region.sources:
            r = readers[e].get(s.name) if readers is not None else source_reader(region, e, s)
            if isinstance(r, T.RasterSource):
                headers += r.headers
                footprints.append(r)
                boxes[region.path(e, s)] = union(r.geographic_bounds())
            elif r is not None:
                lidar[region.path(e, s)] = r
    if not footprints:  # a region of lidar tiles alone: the tiles' footprint
        for p, r in lidar.items():
            footprints.append(r)
            boxes[p] = union(r.geographic_bounds())
    if not boxes:
        raise DataError(f"{region.root}: no raster or lidar source to define the map extent")
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
    # the footprints intersected in the grid's CRS (exact for rasters in it, no round trip)
    own = [r.bounds_in(dst) for r in footprints]
    left, bottom = max(b[0] for b in own), max(b[1] for b in own)
    right, top = min(b[2] for b in own), min(b[3] for b in own)
    # snap inwards to whole cells so every cell lies inside every raster: onto the pixels of the
    # first raster in the grid's CRS at its resolution (to 1e-4; its values are then read as
    # stored), else onto multiples of the resolution
    ax, ay = next(((h["transform"].c, h["transform"].f) for h in headers if h["crs"] == dst
                   and not h["transform"].b and not h["transform"].d
                   and math.isclose(h["transform"].a, res, rel_tol=1e-4)
                   and math.isclose(-h["transform"].e, res, rel_tol=1e-4)), (0.0, 0.0))
    if math.remainder(ax, res) == 0 and math.remainder(ay, res) == 0:
        left, top = math.ceil(left / res) * res, math.floor(top / res) * res
        right, bottom = math.floor(right / res) * res, math.ceil(bottom / res) * res
    else:
        eps = 1e-6
        left, right = ax + math.ceil((left - ax) / res - eps) * res, ax + math.floor((right - ax) / res + eps) * res
        top, bottom = ay - math.ceil((ay - top) / res - eps) * res, ay - math.floor((ay - bottom) / res + eps) * res
    shape = (int(round((top - bottom) / res)), int(round((right - left) / res)))
    if min(shape) < 8:
        raise DataError(f"the rasters overlap on only {shape} cells of {res} m")
    return Grid(crs=dst, transform=from_origin(left, top, res, res), shape=shape)


def read_raster(path: Path, spec: SourceSpec, grid: Grid) -> np.ndarray:
    """(bands, rows, cols) float32 on ``grid``; NaN where the source has nodata or no coverage.
    ``path`` is one GeoTIFF or a folder of them (see :mod:`.tiles`)."""
    return T.RasterSource(spec, T.source_files(path, "raster", spec.name)).read(grid, 0, 0, *grid.shape)


def read_lidar_chm(path: Path, grid: Grid, *, min_points: int = 3) -> np.ndarray:
    """Canopy-height model (1, rows, cols) [m] from a LAS/LAZ file or a folder of tiles: per cell,
    the highest return minus the mean ground return (class 2); NaN where a cell has fewer than
    ``min_points`` returns or no ground return (outside the flight strips)."""
    spec = SourceSpec("lidar", path.name, "lidar", ("chm",), "m", (0.0,), (1.0,))
    files = T.source_files(path, "lidar", spec.name)
    return T.LidarSource(spec, files, min_points=min_points).read(grid, 0, 0, *grid.shape)


def read_sources(region: Region, epoch_index: int, grid: Grid) -> dict[str, np.ndarray]:
    """Every source of one epoch on ``grid``: name -> (bands, rows, cols), NaN where absent.
    A source whose file is missing for this epoch is simply not in the result."""
    out = {}
    for s in region.sources:
        r = source_reader(region, epoch_index, s)
        if r is not None:
            out[s.name] = r.read(grid, 0, 0, *grid.shape)
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

    A region with neither file has no plots (it serves pretraining). Errors name the file and
    row: a plot (partly) outside the map, a tree size outside the
    plausible range (1-500 cm, 1.3-120 m, 0.1-1.5 g cm-3), a tree position outside its plot,
    missing columns or unknown plot ids.
    """
    import pandas as pd

    fp, ft = region.root / "plots.csv", region.root / "trees.csv"
    if not fp.exists() and not ft.exists():  # an unlabelled region: for pretraining only
        i, f = np.zeros(0, dtype=np.int64), np.zeros(0)
        return Plots(ids=[], rows=i, cols=i, agb=f, pix_plot=i, pix_rows=i, pix_cols=i, pix_agb=f)
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
    """The descriptions as ``region.json`` and checkpoints hold them (unset optional fields left out)."""
    return [{k: v for k, v in asdict(s).items() if v is not None or k in SOURCE_FIELDS} for s in specs]


__all__ = [
    "DEFAULT_SOURCES",
    "SENSORS",
    "Grid",
    "Plots",
    "Region",
    "Sensor",
    "SourceSpec",
    "open_region",
    "read_csv",
    "read_lidar_chm",
    "read_plots",
    "read_raster",
    "read_sources",
    "read_station",
    "source_reader",
    "sources_json",
    "target_grid",
]
