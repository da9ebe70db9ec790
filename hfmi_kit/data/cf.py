"""Reading and writing CF-convention NetCDF and Zarr with xarray.

Axes are found by CF attributes (``axis``, ``standard_name``, ``units``) and only then by common
names, never by fixed variable names. Every check raises :class:`~hfmi_kit.errors.DataError`
naming the file, the variable and what was expected.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from hfmi_kit.config import move_into_place
from hfmi_kit.errors import DataError

_LAT_UNITS = {"degrees_north", "degree_north", "degree_n", "degrees_n", "degreen", "degreesn"}
_LON_UNITS = {"degrees_east", "degree_east", "degree_e", "degrees_e", "degreee", "degreese"}


def _need(module: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for this; install it with `pip install hfmi_kit[{extra}]`") from e


def is_zarr(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix == ".zarr" or (p.is_dir() and any((p / f).exists() for f in ("zarr.json", ".zgroup", ".zmetadata")))


def open_cf(path: str | Path, *, chunks: dict | str | None = None) -> xr.Dataset:
    """Open a CF NetCDF file or Zarr store lazily, with CF time decoding, after the checks of
    :mod:`hfmi_kit.data.safety` (no references to other files, no pickle codecs).

    Raises:
        DataError: the path does not exist, is not a readable NetCDF/Zarr dataset, or refers to
            other files or to pickled data.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    from hfmi_kit.data.safety import check_netcdf, check_zarr

    try:
        if is_zarr(p):
            _need("zarr", "climate")
            check_zarr(p)
            import warnings

            with warnings.catch_warnings():  # a store without consolidated metadata, or with a
                # folder zarr does not recognise, is still read; the checks that follow name what is missing
                warnings.filterwarnings("ignore", message=".*consolidated metadata.*", category=RuntimeWarning)
                warnings.filterwarnings("ignore", message="Object at .* is not recognized")
                return xr.open_zarr(p, chunks=chunks if chunks is not None else {}, decode_times=True)
        check_netcdf(p)
        return xr.open_dataset(p, chunks=chunks, decode_times=True)
    except DataError:
        raise
    except Exception as e:  # the backends raise many types for a corrupt file
        raise DataError(f"{p}: cannot be read as NetCDF or Zarr ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class Axes:
    """Names of the CF axes found in a dataset (``level`` may be None)."""

    time: str
    lat: str
    lon: str
    level: str | None = None


def _attr(da: xr.DataArray, key: str) -> str:
    return str(da.attrs.get(key, "")).strip().lower().replace(" ", "")


def find_axis(ds: xr.Dataset | xr.DataArray, kind: str) -> str | None:
    """Name of the coordinate that is the CF ``kind`` axis (time, lat, lon, level), or None."""
    cands = []
    for name in list(ds.coords) + list(getattr(ds, "dims", [])):
        if name not in ds.coords and name not in getattr(ds, "variables", {}):
            continue
        da = ds[name]
        sn, ax, un = _attr(da, "standard_name"), _attr(da, "axis"), _attr(da, "units")
        lname = str(name).lower()
        if kind == "time" and (sn == "time" or ax == "t" or np.issubdtype(da.dtype, np.datetime64)
                               or (da.dtype == object and lname in ("time", "t"))):
            cands.append(name)
        elif kind == "lat" and (sn == "latitude" or (ax == "y" and un in _LAT_UNITS) or un in _LAT_UNITS
                                or (lname in ("lat", "latitude") and da.ndim == 1)):
            cands.append(name)
        elif kind == "lon" and (sn == "longitude" or (ax == "x" and un in _LON_UNITS) or un in _LON_UNITS
                                or (lname in ("lon", "longitude") and da.ndim == 1)):
            cands.append(name)
        elif kind == "level" and (ax == "z" or "positive" in da.attrs or sn in ("air_pressure", "depth", "height")):
            cands.append(name)
    cands = list(dict.fromkeys(c for c in cands if ds[c].ndim <= 1))
    return cands[0] if cands else None


def find_axes(ds: xr.Dataset, *, source: str = "dataset") -> Axes:
    """Find time, lat and lon (and level) by CF attributes; clear error when one is missing."""
    t, la, lo = find_axis(ds, "time"), find_axis(ds, "lat"), find_axis(ds, "lon")
    if t is None:
        raise DataError(f"{source}: no time axis (a coordinate with standard_name='time' or axis='T')")
    if la is None or lo is None:
        missing = [n for n, v in (("latitude", la), ("longitude", lo)) if v is None]
        raise DataError(
            f"{source}: grid without {' and '.join(missing)}: expected 1-d coordinates with "
            "units degrees_north / degrees_east (or standard_name latitude / longitude)"
        )
    return Axes(time=t, lat=la, lon=lo, level=find_axis(ds, "level"))


def check_time(ds: xr.Dataset, time: str, *, source: str = "dataset") -> None:
    """Times must be strictly increasing (no duplicates, no reversals)."""
    t = ds[time].values
    if t.size < 2:
        raise DataError(f"{source}: time axis {time!r} has {t.size} step(s); at least 2 are needed")
    diffs = np.diff(t.astype("datetime64[ns]").astype(np.int64)) if np.issubdtype(t.dtype, np.datetime64) \
        else np.array([(b - a).total_seconds() for a, b in zip(t[:-1], t[1:])])
    if (diffs == 0).any():
        i = int(np.argmax(diffs == 0))
        raise DataError(f"{source}: duplicated time {t[i + 1]} at index {i + 1} of {time!r}")
    if (diffs < 0).any():
        i = int(np.argmax(diffs < 0))
        raise DataError(f"{source}: non-monotonic time: {t[i + 1]} follows {t[i]} at index {i + 1} of {time!r}")


def unit_factor(units: str, canon: str) -> tuple[float, float] | None:
    """(scale, offset) taking values in ``units`` to ``canon`` (``x * scale + offset``), by
    UDUNITS through ``cf_units``: every spelling real files use (``hPa``, ``millibars``, ``mbar``,
    ``degK``, ``m s-1``, ``M/S``...). None when either is unknown to it or they are not convertible."""
    try:
        import cf_units
    except ImportError:  # pragma: no cover - cf_units comes with the climate extra
        return None
    try:
        u = cf_units.Unit(units)
        if not u.is_convertible(cf_units.Unit(canon)):
            return None
        offset = float(u.convert(0.0, canon))
        return float(u.convert(1.0, canon)) - offset, offset
    except (ValueError, TypeError, ArithmeticError):
        return None


# the CF vertical coordinates a level field is read from, and the units its levels are named in
VERTICAL_KINDS = {"pressure": "hPa", "depth": "m", "height": "m"}
_VERTICAL_NAMES = {"air_pressure": "pressure", "depth": "depth", "height": "height", "altitude": "height",
                   "height_above_reference_ellipsoid": "height", "height_above_geopotential_datum": "height"}


@dataclass(frozen=True)
class Vertical:
    """A variable's vertical axis: pressure, depth or height levels, converted to hPa or m."""

    dim: str  # the dimension's name in the file
    kind: str  # pressure, depth or height
    values: np.ndarray  # the levels in :data:`VERTICAL_KINDS` units, in the file's order
    file_values: np.ndarray  # the same levels as the file holds them
    positive: str  # "down" (pressure, depth) or "up" (height)

    @property
    def units(self) -> str:
        return VERTICAL_KINDS[self.kind]

    def keep(self, levels: Sequence[float] | None) -> list[int]:
        """Indices of the levels ``levels`` (hPa or m) keeps: those it names, or every level when
        it is None or names none of this axis's (``500,850`` leaves ocean depths as they are)."""
        if levels is None:
            return list(range(len(self.values)))
        wanted = np.asarray(levels, dtype=np.float64)
        return [i for i, x in enumerate(self.values) if np.isclose(x, wanted).any()] or list(range(len(self.values)))

    def cf_attrs(self) -> dict[str, str]:
        """The CF attributes of this axis as hfmi writes it (canonical units)."""
        sn = {"pressure": "air_pressure", "depth": "depth", "height": "height"}[self.kind]
        return {"standard_name": sn, "units": self.units, "positive": self.positive, "axis": "Z"}


def vertical_axis(da: xr.DataArray, ds: xr.Dataset, *, source: str = "dataset") -> Vertical | None:
    """The vertical axis of variable ``da``: a dimension whose coordinate is CF-vertical
    (``axis: Z``, a ``positive`` attribute, a vertical standard name, or pressure units), or None.

    Raises:
        DataError: a vertical coordinate that is not pressure, depth or height in units of
            pressure or length (model or hybrid levels, a level index), or has NaN values.
    """
    for d in da.dims:
        if d not in ds.coords or ds[d].ndim != 1:
            continue
        c = ds[d]
        sn, ax = _attr(c, "standard_name"), _attr(c, "axis")
        units = str(c.attrs.get("units", "")).strip()
        pressure = bool(units) and unit_factor(units, "hPa") is not None
        if not (ax == "z" or "positive" in c.attrs or sn in _VERTICAL_NAMES or pressure):
            continue
        positive = str(c.attrs.get("positive", "")).strip().lower()
        kind = "pressure" if pressure else _VERTICAL_NAMES.get(sn) or (
            "depth" if positive == "down" else "height" if positive == "up" else "")
        canon = VERTICAL_KINDS.get(kind)
        factor = unit_factor(units, canon) if canon and units else None
        if factor is None:
            raise DataError(f"{source}: variable {da.name!r} has the vertical axis {d!r} (units {units!r}, "
                            f"standard_name {sn!r}), which is not pressure, depth or height in units of "
                            "pressure or length; interpolate model or hybrid levels to pressure levels first")
        raw = np.asarray(c.values, dtype=np.float64)
        if not np.isfinite(raw).all():
            raise DataError(f"{source}: vertical axis {d!r} has NaN/inf values")
        return Vertical(dim=str(d), kind=kind, values=raw * factor[0] + factor[1], file_values=raw,
                        positive=positive or ("up" if kind == "height" else "down"))
    return None


def level_name(variable: str, level: float) -> str:
    """The name of one level of a variable as a field of its own: ``ta_500`` (hPa), ``thetao_5`` (m)."""
    return f"{variable}_{level:g}"


def grid_dims(da: xr.DataArray, ds: xr.Dataset) -> tuple[str, str] | None:
    """The (lat, lon) dimension names of variable ``da`` (it may sit on its own grid)."""
    lat = lon = None
    for d in da.dims:
        if d not in ds.coords:
            continue
        c = ds[d]
        sn, un, ax = _attr(c, "standard_name"), _attr(c, "units"), _attr(c, "axis")
        if sn == "latitude" or un in _LAT_UNITS or (ax == "y" and d.lower().startswith("lat")):
            lat = d
        elif sn == "longitude" or un in _LON_UNITS or (ax == "x" and d.lower().startswith("lon")):
            lon = d
    return (lat, lon) if lat and lon else None


def regrid_bilinear(da: xr.DataArray, lat_dim: str, lon_dim: str, target_lat: np.ndarray,
                    target_lon: np.ndarray, *, out_lat: str = "lat", out_lon: str = "lon") -> xr.DataArray:
    """Bilinear regridding onto a target lat-lon grid, periodic in longitude.

    NaNs (e.g. land cells of an ocean field) stay NaN where they dominate the stencil.
    """
    src = da.rename({lat_dim: "_lat", lon_dim: "_lon"}).sortby("_lat")
    lon = src["_lon"].values % 360.0
    src = src.assign_coords(_lon=lon).sortby("_lon")
    # pad one column on each side for periodicity
    left = src.isel(_lon=[-1]).assign_coords(_lon=[src["_lon"].values[-1] - 360.0])
    right = src.isel(_lon=[0]).assign_coords(_lon=[src["_lon"].values[0] + 360.0])
    src = xr.concat([left, src, right], dim="_lon")
    # beyond the source's outermost rows (towards the poles) take the nearest row
    tlat = np.clip(np.asarray(target_lat), float(src["_lat"].min()), float(src["_lat"].max()))
    out = src.interp(_lat=xr.DataArray(tlat, dims=out_lat),
                     _lon=xr.DataArray(np.asarray(target_lon) % 360.0, dims=out_lon), method="linear")
    out = out.assign_coords({out_lat: target_lat, out_lon: target_lon})
    out.attrs = dict(da.attrs)
    return out


def write_cf(ds: xr.Dataset, path: str | Path, *, time_chunk: int = 1, time_dim: str = "time") -> Path:
    """Write a Dataset to Zarr (``*.zarr``) or NetCDF atomically (temp path + rename).

    Zarr output is chunked ``time_chunk`` steps per chunk and whole fields in space, matching
    the sample-by-time access pattern of training.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = ds.copy()
    for c in ds.coords:  # CF: coordinates carry no _FillValue; times as float64 (no int64 in CF)
        ds[c].encoding["_FillValue"] = None
        if np.issubdtype(ds[c].dtype, np.datetime64):
            ds[c].encoding["dtype"] = "float64"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)) / path.name
    try:
        if path.suffix == ".zarr":
            _need("zarr", "climate")
            for v in ds.variables:
                ds[v].encoding.pop("chunks", None)
                ds[v].encoding.pop("preferred_chunks", None)
            if time_dim in ds.dims:
                ds = ds.chunk({time_dim: time_chunk})
            ds.to_zarr(tmp, mode="w", consolidated=True, zarr_format=2)
        else:
            ds.to_netcdf(tmp, format="NETCDF4")
        move_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return path


def select_gridded(ds: xr.Dataset, axes: Axes, variables: Sequence[str] | None = None, *,
                   source: str = "dataset") -> list[str]:
    """Names of data variables with a time axis and a lat-lon grid (or check the named ones)."""
    if variables:
        missing = [v for v in variables if v not in ds.data_vars]
        if missing:
            raise DataError(
                f"{source}: variable(s) {missing} not found; the dataset has {sorted(map(str, ds.data_vars))}"
            )
        return list(variables)
    return [str(v) for v, da in ds.data_vars.items()
            if axes.time in da.dims and grid_dims(da, ds) is not None]
