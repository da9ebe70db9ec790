"""Sources read window by window onto the target grid: one GeoTIFF, a folder of GeoTIFFs in any
CRSs and resolutions, or a folder of LAS/LAZ tiles, never the whole region at once.

A source of one epoch is a :class:`RasterSource` or a :class:`LidarSource` over its files.
``read(grid, r0, c0, h, w)`` returns the ``(bands, h, w)`` window of the target grid whose
upper-left cell is ``(r0, c0)``, in the source's units, NaN where no file has data (nodata,
clouds, between tiles) and outside the grid (a window at the region's edge is padded with
absent values, which the model turns into absent tokens, never zeros).

Per raster file, only the part under the window is read (``rasterio`` windowed reads; a tiled
GeoTIFF or COG reads just the blocks it touches) and reprojected onto the window's cells. When
the grid is coarser than the file by 2x or more, the read is decimated and GDAL takes the
file's overviews, as a COG is meant to be read. A file on the grid's own CRS and cell lattice
is sliced without resampling. Where files overlap, the first in name order that has data wins.
A file's GDAL band scale and offset (``scale_factor``/``add_offset`` tags of Landsat and
Sentinel-2 products) and its declared nodata are applied as it is read.

A lidar tile is read whole once (points per cell: count, highest return, ground returns) over
the cells its header's bounds cover, and kept for the next windows that need it (a few tiles).
Open file handles belong to one process: a DataLoader worker opens its own.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from hfmi_kit.data.safety import RASTER_DRIVERS, inside
from hfmi_kit.errors import DataError

RASTER_SUFFIXES = (".tif", ".tiff")
LIDAR_SUFFIXES = (".las", ".laz")
SMALL_FILE_CELLS = 1 << 22  # a file this small is checked whole for valid values when opened
LIDAR_CACHE = 16  # lidar tiles kept rasterised


def source_files(path: Path, kind: str, name: str) -> list[Path]:
    """The files of one source of one epoch: ``path`` itself, or the GeoTIFFs (``.tif``) or
    LAS/LAZ tiles of the folder ``path`` in name order (hidden files left out; every one must
    resolve inside the folder). A VRT is refused: it names other files, which hfmi never follows."""
    if path.is_dir():
        suffixes = LIDAR_SUFFIXES if kind == "lidar" else RASTER_SUFFIXES
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith("."))
        files = [inside(path, p.name, manifest=path) for p in files]
        files = [p for p in files if p.is_file()]
        if not files:
            raise DataError(f"{path}: the folder of source {name!r} holds no {'/'.join(suffixes)} file")
        return files
    if path.suffix.lower() == ".vrt":
        raise DataError(f"{path}: a VRT names other files and is not read; give source {name!r} the folder of "
                        "its GeoTIFFs instead")
    return [path]


def rasterio_module() -> Any:
    """rasterio, or an ImportError that says how to install it."""
    try:
        import rasterio
    except ImportError as e:
        raise ImportError("the carbon domain needs rasterio; install it with `pip install hfmi_kit[carbon]`") from e
    return rasterio


def open_raster(path: Path) -> Any:
    """A GeoTIFF opened read-only with the GeoTIFF driver alone (a VRT or another format that
    names other files or URLs is never interpreted)."""
    rasterio = rasterio_module()
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes); expected a GeoTIFF")
    try:
        return rasterio.open(path, driver=RASTER_DRIVERS[0])
    except rasterio.errors.RasterioIOError as e:
        raise DataError(f"{path}: not a readable GeoTIFF, truncated or corrupt ({e})") from e


def _norm_units(u: str) -> str:
    return "".join(u.split()).lower()


def check_header(path: Path, spec: Any, src: Any) -> None:
    """A raster's header must match its description: a CRS, declared nodata for float data,
    one band per described band, and the described units where the file declares any."""
    if src.crs is None and spec.crs is None:
        raise DataError(f"{path}: the raster has no CRS; georeference it (e.g. gdal_edit.py -a_srs EPSG:...) or "
                        f"name it as source {spec.name!r}'s 'crs' in region.json")
    if src.nodata is None and spec.nodata is None and src.dtypes[0].startswith("float") and \
            not src.tags().get("nodata_free"):
        raise DataError(f"{path}: nodata is not declared; set it (e.g. gdal_edit.py -a_nodata -9999) so gaps "
                        "are not read as values")
    if src.count != len(spec.bands):
        raise DataError(f"{path}: {src.count} band(s), but source {spec.name!r} describes {len(spec.bands)} "
                        f"{list(spec.bands)}")
    for b in range(src.count):
        declared = (src.units[b] if src.units and src.units[b] else "") or src.tags(b + 1).get("units") or \
            src.tags().get("units") or ""
        if declared and spec.units and _norm_units(declared) != _norm_units(spec.units):
            raise DataError(f"{path}: band {b + 1} ({spec.bands[b]}) is in units {declared!r}, but region.json "
                            f"describes source {spec.name!r} in {spec.units!r}; convert the file or fix its units")


def _valid(band: np.ndarray) -> np.ndarray:
    return ~np.isnan(band)


def check_values(path: Path, spec: Any, b: int, band: np.ndarray, *, whole: bool) -> None:
    """A band (NaN where nodata) must hold no infinity and, when ``whole`` is the whole band, some
    valid value."""
    n_inf = int(np.isinf(band).sum())
    if n_inf:
        raise DataError(f"{path}: band {b + 1} ({spec.bands[b]}) has {n_inf} infinite value(s); declare gaps as "
                        "nodata instead")
    if whole and not _valid(band).any():
        raise DataError(f"{path}: band {b + 1} ({spec.bands[b]}) has no valid value (every cell is nodata or NaN)")


def window_grid(grid: Any, r0: int, c0: int, h: int, w: int) -> Any:
    """The :class:`~.sources.Grid` of the cells ``[r0, r0 + h) x [c0, c0 + w)`` of ``grid``."""
    from rasterio.transform import Affine

    return type(grid)(crs=grid.crs, transform=grid.transform @ Affine.translation(c0, r0), shape=(h, w))


def _box(grid: Any) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a north-up grid in its CRS."""
    t = grid.transform
    return t.c, t.f + t.e * grid.shape[0], t.c + t.a * grid.shape[1], t.f


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class _Source:
    """What both kinds share: the files, the per-process handles, the window clipped to the grid."""

    def __init__(self, spec: Any, files: list[Path]) -> None:
        self.spec, self.files = spec, files
        self._pid = os.getpid()
        self._affine: tuple[np.ndarray, np.ndarray] | None = None

    def _fresh(self) -> None:  # a forked DataLoader worker must not share the parent's GDAL handles
        if os.getpid() != self._pid:
            self._reset()
            self._pid = os.getpid()

    def _reset(self) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        self._reset()
        return dict(self.__dict__)

    def read(self, grid: Any, r0: int, c0: int, h: int, w: int,
             affine: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """``(bands, h, w)`` float32 of the grid's cells from ``(r0, c0)``: NaN where no file has
        data and outside the grid; ``affine`` (per band ``gain``, ``bias``, gain > 0) gives
        ``gain * value + bias`` instead (a normalisation, applied as the values are made)."""
        self._fresh()
        self._affine = affine
        H, W = grid.shape
        a0, a1, b0, b1 = max(r0, 0), min(r0 + h, H), max(c0, 0), min(c0 + w, W)
        if (a0, a1, b0, b1) == (r0, r0 + h, c0, c0 + w):
            return self._read(window_grid(grid, r0, c0, h, w), grid)
        out = np.full((len(self.spec.bands), h, w), np.nan, dtype=np.float32)
        if a0 < a1 and b0 < b1:
            out[:, a0 - r0:a1 - r0, b0 - c0:b1 - c0] = self._read(window_grid(grid, a0, b0, a1 - a0, b1 - b0), grid)
        return out

    def _read(self, sub: Any, grid: Any) -> np.ndarray:
        raise NotImplementedError


class RasterSource(_Source):
    """One raster source of one epoch over its GeoTIFFs (see the module docstring)."""

    def __init__(self, spec: Any, files: list[Path]) -> None:
        super().__init__(spec, files)
        self._handles: dict[Path, Any] = {}
        self._boxes: dict[tuple[int, str], tuple[float, float, float, float]] = {}
        self._same: dict[tuple[int, str], bool] = {}
        self.headers: list[dict[str, Any]] = []
        for p in files:
            with open_raster(p) as src:
                check_header(p, spec, src)
                scales, offsets = tuple(src.scales), tuple(src.offsets)
                if all(x == 1 for x in scales) and all(x == 0 for x in offsets) and spec.dn_scale is not None:
                    # the product's documented scaling, for files that do not carry it (see SENSORS)
                    scales, offsets = (spec.dn_scale,) * src.count, (spec.dn_offset or 0.0,) * src.count
                crs = src.crs if src.crs is not None else rasterio_module().crs.CRS.from_user_input(spec.crs)
                self.headers.append({"crs": crs, "transform": src.transform, "shape": (src.height, src.width),
                                     "bounds": tuple(src.bounds),
                                     "nodata": src.nodata if src.nodata is not None else spec.nodata,
                                     "scales": scales, "offsets": offsets, "overviews": src.overviews(1)})
                if src.height * src.width <= SMALL_FILE_CELLS:
                    v = self._values(src.read(), len(self.headers) - 1)
                    for b in range(src.count):
                        check_values(p, spec, b, v[b], whole=True)

    def _reset(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def _open(self, i: int) -> Any:
        p = self.files[i]
        if p not in self._handles:
            self._handles[p] = open_raster(p)
        return self._handles[p]

    def geographic_bounds(self) -> list[tuple[float, float, float, float]]:
        """(west, south, east, north) in degrees of every file."""
        from rasterio.warp import transform_bounds

        return [transform_bounds(h["crs"], "EPSG:4326", *h["bounds"]) for h in self.headers]

    def bounds_in(self, crs: Any) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in ``crs`` of all the files together (exact in their own CRS)."""
        b = [self._box_in(i, crs) for i in range(len(self.headers))]
        return min(x[0] for x in b), min(x[1] for x in b), max(x[2] for x in b), max(x[3] for x in b)

    def _values(self, raw: np.ndarray, i: int) -> np.ndarray:
        """Bands (bands, h, w) as float32 in their physical units (nodata -> NaN, then the file's
        scale and offset), then ``gain * value + bias`` of :meth:`read`; an infinity is an error
        naming the file. One pass per operation over all bands at once."""
        h = self.headers[i]
        s, o = np.asarray(h["scales"], np.float64), np.asarray(h["offsets"], np.float64)
        gain, bias = self._affine if self._affine is not None else (1.0, 0.0)
        g, b = (s * gain).astype(np.float32), (o * gain + bias).astype(np.float32)
        out = raw.astype(np.float32)
        if not (np.all(g == 1) and np.all(b == 0)):
            out *= g[:, None, None]
            out += b[:, None, None]
        nd = h["nodata"]
        if nd is not None and not (isinstance(nd, float) and math.isnan(nd)):
            out[raw == nd] = np.nan
        if raw.dtype.kind == "f" and np.isinf(out).any():
            for k in range(out.shape[0]):
                check_values(self.files[i], self.spec, k, out[k], whole=False)
        return out

    def _box_in(self, i: int, crs: Any) -> tuple[float, float, float, float]:
        """File ``i``'s bounds in ``crs`` (kept: the same question comes for every window)."""
        key = (i, crs.to_wkt())
        if key not in self._boxes:
            from rasterio.warp import transform_bounds

            h = self.headers[i]
            self._boxes[key] = tuple(h["bounds"]) if h["crs"] == crs else transform_bounds(h["crs"], crs, *h["bounds"])
            self._same[key] = h["crs"] == crs
        return self._boxes[key]

    def _read(self, sub: Any, grid: Any) -> np.ndarray:
        out = None
        box = _box(sub)
        for i in range(len(self.headers)):
            if not _overlaps(self._box_in(i, grid.crs), box):
                continue
            part = self._part(i, sub, box)
            if part is None:
                continue
            if out is None:
                out = part
            else:
                empty = np.isnan(out)
                out[empty] = part[empty]
            if len(self.headers) > 1 and not np.isnan(out).any():
                break
        return out if out is not None else np.full((len(self.spec.bands), *sub.shape), np.nan, dtype=np.float32)

    def _part(self, i: int, sub: Any, box: tuple[float, float, float, float]) -> np.ndarray | None:
        """File ``i`` on the cells of ``sub`` (NaN where it has no data), or None if it has none there."""
        rasterio = rasterio_module()
        from rasterio.transform import Affine
        from rasterio.warp import Resampling, reproject, transform_bounds
        from rasterio.windows import Window, from_bounds
        from rasterio.windows import transform as win_transform

        h = self.headers[i]
        ft = h["transform"]
        t = sub.transform
        fH, fW = h["shape"]
        path = self.files[i]
        self._box_in(i, sub.crs)
        same = self._same[(i, sub.crs.to_wkt())]
        try:
            if same and _on_lattice(ft, t):  # the grid's own cells: a slice, no resampling
                col, row = round((t.c - ft.c) / ft.a), round((t.f - ft.f) / ft.e)
                a0, b0 = max(row, 0), max(col, 0)
                a1, b1 = min(row + sub.shape[0], fH), min(col + sub.shape[1], fW)
                if a0 >= a1 or b0 >= b1:
                    return None
                v = self._values(self._open(i).read(window=Window(b0, a0, b1 - b0, a1 - a0)), i)
                if v.shape[1:] == sub.shape:
                    return v
                out = np.full((v.shape[0], *sub.shape), np.nan, dtype=np.float32)
                out[:, a0 - row:a1 - row, b0 - col:b1 - col] = v
                return out
            fb = box if same else transform_bounds(sub.crs, h["crs"], *box, densify_pts=21)
            win = from_bounds(*fb, transform=ft)
            pad = 2 + int(math.ceil(abs(t.a) / _pixel_size(h, sub.crs)))  # a resampling kernel's reach
            c0, r0 = math.floor(win.col_off) - pad, math.floor(win.row_off) - pad
            c1, r1 = math.ceil(win.col_off + win.width) + pad, math.ceil(win.row_off + win.height) + pad
            c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, fW), min(r1, fH)
            if c0 >= c1 or r0 >= r1:
                return None
            win = Window(c0, r0, c1 - c0, r1 - r0)
            # decimated when the grid is coarser by 2x or more: GDAL reads the file's overviews
            ratio = abs(t.a) / _pixel_size(h, sub.crs)
            factor = max((f for f in (1, *h["overviews"]) if f <= ratio), default=1)
            rh, rw = max(1, (r1 - r0) // factor), max(1, (c1 - c0) // factor)
            src = self._open(i)
            raw = src.read(window=win, out_shape=(src.count, rh, rw), resampling=Resampling.average)
            rt = win_transform(win, ft) @ Affine.scale((c1 - c0) / rw, (r1 - r0) / rh)
            out = np.full((raw.shape[0], *sub.shape), np.nan, dtype=np.float32)
            v = self._values(raw, i)
            for b in range(raw.shape[0]):
                reproject(v[b], out[b], src_transform=rt, src_crs=h["crs"], dst_transform=t, dst_crs=sub.crs,
                          resampling=getattr(Resampling, self.spec.resampling), src_nodata=np.nan, dst_nodata=np.nan,
                          tolerance=0.0)  # exact coordinates: a cell's value does not depend on the window
            return out
        except rasterio.errors.RasterioError as e:
            raise DataError(f"{path}: corrupt or truncated raster data ({e})") from e


def _on_lattice(ft: Any, t: Any) -> bool:
    """Whether a file's pixels are the grid's cells: same size, north-up, offsets whole cells."""
    if ft.b or ft.d or t.b or t.d or not math.isclose(ft.a, t.a, rel_tol=1e-9) or not math.isclose(ft.e, t.e,
                                                                                                  rel_tol=1e-9):
        return False
    col, row = (t.c - ft.c) / ft.a, (t.f - ft.f) / ft.e
    return abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6


def _pixel_size(h: dict[str, Any], crs: Any) -> float:
    """A file's pixel size in the units of ``crs`` (its mean, from the footprint's width)."""
    from rasterio.warp import transform_bounds

    if h["crs"] == crs:
        return abs(h["transform"].a)
    left, _, right, _ = transform_bounds(h["crs"], crs, *h["bounds"])
    return max(abs(right - left) / h["shape"][1], 1e-12)


class LidarSource(_Source):
    """One lidar source of one epoch over its LAS/LAZ tiles: a canopy-height model (1, h, w) [m],
    per cell the highest return minus the mean ground return (class 2); NaN where a cell has
    fewer than ``min_points`` returns or no ground return (outside the flight strips)."""

    def __init__(self, spec: Any, files: list[Path], *, min_points: int = 3) -> None:
        super().__init__(spec, files)
        self.min_points = min_points
        self._cache: OrderedDict[tuple[Path, str], tuple[tuple[int, int, int, int], np.ndarray]] = OrderedDict()
        self.headers = [_las_header(p, spec.crs) for p in files]

    def _reset(self) -> None:
        self._cache = OrderedDict()

    def geographic_bounds(self) -> list[tuple[float, float, float, float]]:
        """(west, south, east, north) in degrees of every tile (from its header)."""
        return [_las_box(hd, "EPSG:4326") for hd in self.headers]

    def bounds_in(self, crs: Any) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in ``crs`` of all the tiles together (from their headers)."""
        b = [_las_box(hd, crs) for hd in self.headers]
        return min(x[0] for x in b), min(x[1] for x in b), max(x[2] for x in b), max(x[3] for x in b)

    def _read(self, sub: Any, grid: Any) -> np.ndarray:
        from pyproj import CRS

        n_cells = sub.shape[0] * sub.shape[1]
        stats = np.zeros((4, n_cells))  # count, top, ground sum, ground count
        stats[1] = -np.inf
        box = _box(sub)
        a0 = round((sub.transform.f - grid.transform.f) / grid.transform.e)
        b0 = round((sub.transform.c - grid.transform.c) / grid.transform.a)
        for p, hd in zip(self.files, self.headers):
            tb = hd["bounds"] if CRS(hd["crs"]) == CRS(grid.crs.to_wkt()) else _las_box(hd, grid)
            if not _overlaps(tb, box):
                continue
            (r0, c0, r1, c1), st = self._tile(p, hd, grid)
            st = st if hd["z_to_m"] == 1.0 else st * np.array([1.0, hd["z_to_m"], hd["z_to_m"], 1.0])[:, None, None]
            lo_r, hi_r = max(r0, a0), min(r1, a0 + sub.shape[0])
            lo_c, hi_c = max(c0, b0), min(c1, b0 + sub.shape[1])
            if lo_r >= hi_r or lo_c >= hi_c:
                continue
            part = st[:, lo_r - r0:hi_r - r0, lo_c - c0:hi_c - c0]
            dst = stats.reshape(4, *sub.shape)[:, lo_r - a0:hi_r - a0, lo_c - b0:hi_c - b0]
            dst[0] += part[0]
            dst[1] = np.maximum(dst[1], part[1])
            dst[2] += part[2]
            dst[3] += part[3]
        count, top, gsum, gcnt = stats
        chm = np.where((count >= self.min_points) & (gcnt > 0), top - gsum / np.maximum(gcnt, 1), np.nan)
        chm = np.clip(chm, 0, None).reshape(1, *sub.shape)
        if self._affine is not None:
            chm = chm * self._affine[0][:, None, None] + self._affine[1][:, None, None]
        return chm.astype(np.float32)

    def _tile(self, p: Path, hd: dict[str, Any], grid: Any) -> tuple[tuple[int, int, int, int], np.ndarray]:
        """(row0, col0, row1, col1) of the grid cells the tile covers and its (4, rows, cols) stats."""
        key = (p, grid.crs.to_wkt() + str(tuple(grid.transform)))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        x, y, z, cls = _las_points(p, grid, hd["crs"])
        r, c = grid.rowcol(x, y)
        H, W = grid.shape
        ok = (r >= 0) & (r < H) & (c >= 0) & (c < W)
        r, c, z, cls = r[ok], c[ok], z[ok], cls[ok]
        if not len(r):
            r0 = c0 = r1 = c1 = 0
        else:
            r0, c0, r1, c1 = int(r.min()), int(c.min()), int(r.max()) + 1, int(c.max()) + 1
        n = (r1 - r0) * (c1 - c0)
        idx = (r - r0) * (c1 - c0) + (c - c0)
        top = np.full(n, -np.inf)
        np.maximum.at(top, idx, z)
        g = cls == 2
        st = np.stack([np.bincount(idx, minlength=n).astype(float), top,
                       np.bincount(idx[g], weights=z[g], minlength=n), np.bincount(idx[g], minlength=n).astype(float)])
        val = ((r0, c0, r1, c1), st.reshape(4, r1 - r0, c1 - c0))
        self._cache[key] = val
        while len(self._cache) > LIDAR_CACHE:
            self._cache.popitem(last=False)
        return val


def _las_errors() -> tuple[type[BaseException], ...]:
    import laspy

    errors: list[type[BaseException]] = [laspy.errors.LaspyException, OSError, EOFError, ValueError]
    try:
        import lazrs  # the LAZ backend raises its own type on a cut file

        errors.append(lazrs.LazrsError)
    except ImportError:
        pass
    return tuple(errors)


def _quiet_laspy() -> Any:
    import contextlib
    import logging

    @contextlib.contextmanager
    def quiet() -> Any:  # laspy logs the backend's error before raising it: one message is enough
        log = logging.getLogger("laspy")
        level = log.level
        log.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            log.setLevel(level)

    return quiet()


def _las_header(p: Path, fallback: str | None = None) -> dict[str, Any]:
    """A LAS/LAZ tile's bounds and CRS from its header alone (``fallback``, the source's ``crs``,
    for a file that declares none)."""
    import laspy

    if p.stat().st_size == 0:
        raise DataError(f"{p}: empty file (0 bytes); expected a LAS/LAZ point cloud")
    try:
        with _quiet_laspy(), laspy.open(str(p)) as f:
            hd = f.header
            crs = hd.parse_crs()
            mins, maxs = hd.mins, hd.maxs
    except _las_errors() as e:
        raise DataError(f"{p}: not a readable LAS/LAZ file, truncated or corrupt ({type(e).__name__}: {e})") from e
    if crs is None and fallback is None:
        raise DataError(f"{p}: the LAS header declares no CRS; add one (e.g. pdal translate ... "
                        "--writers.las.a_srs=EPSG:...) or name it as the lidar source's 'crs' in region.json")
    from pyproj import CRS

    crs = CRS.from_user_input(fallback) if crs is None else crs
    return {"crs": crs, "bounds": (float(mins[0]), float(mins[1]), float(maxs[0]), float(maxs[1])),
            "z_to_m": _z_to_metres(crs)}


def _z_to_metres(crs: Any) -> float:
    """Metres per unit of a point cloud's z: the vertical CRS's unit of a compound CRS, else (the
    LAS convention) the horizontal unit of a projected CRS; metres for a geographic one."""
    sub = getattr(crs, "sub_crs_list", None) or []
    axes = sub[-1].axis_info if len(sub) > 1 else crs.axis_info
    factors = [a.unit_conversion_factor for a in axes if a.unit_name not in ("degree", "radian", "grad")]
    return float(factors[-1]) if factors else 1.0


def _las_box(hd: dict[str, Any], to: Any) -> tuple[float, float, float, float]:
    """A tile's header bounds in ``to`` (a grid, whose CRS is taken, or a CRS)."""
    from rasterio.warp import transform_bounds

    return transform_bounds(hd["crs"].to_wkt(), getattr(to, "crs", to), *hd["bounds"], densify_pts=21)


def _las_points(p: Path, grid: Any, crs: Any) -> tuple[np.ndarray, ...]:
    """x, y (in the grid's CRS), z (in the file's units) and classification of every point of a
    LAS/LAZ file in ``crs`` (its header's, or the source's for a file that declares none), noise
    (ASPRS classes 7, low, and 18, high) left out."""
    import laspy
    from pyproj import CRS, Transformer

    try:
        with _quiet_laspy():
            las = laspy.read(str(p))
    except _las_errors() as e:
        raise DataError(f"{p}: not a readable LAS/LAZ file, truncated or corrupt ({type(e).__name__}: {e})") from e
    dims = set(las.point_format.dimension_names)
    missing = [d for d in ("X", "Y", "Z", "classification") if d not in dims]
    if missing:
        raise DataError(f"{p}: point records lack {missing}; a lidar source needs x, y, z and classification")
    cls = np.asarray(las.classification)
    if not (cls == 2).any():
        raise DataError(f"{p}: no ground returns (classification 2); classify the points before use")
    keep = (cls != 7) & (cls != 18)
    x, y, z, cls = np.asarray(las.x)[keep], np.asarray(las.y)[keep], np.asarray(las.z)[keep], cls[keep]
    if CRS(crs) != CRS(grid.crs.to_wkt()):
        x, y = Transformer.from_crs(crs, grid.crs.to_wkt(), always_xy=True).transform(x, y)
    return x, y, z, cls


def open_source(path: Path, spec: Any) -> RasterSource | LidarSource:
    """The reader of one source of one epoch at ``path`` (a file or a folder of them)."""
    files = source_files(path, spec.kind, spec.name)
    return RasterSource(spec, files) if spec.kind == "raster" else LidarSource(spec, files)


__all__ = ["LidarSource", "RasterSource", "check_header", "open_raster", "open_source", "source_files",
           "window_grid"]
