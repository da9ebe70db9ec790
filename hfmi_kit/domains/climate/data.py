"""Climate data: CF NetCDF/Zarr -> validated, regridded, normalised arrays -> sample dicts.

A sample (see :class:`ForecastWindows`) is a dict with the documented keys:

- ``inputs``: (C, V, H, W) normalised state at t-C+1 .. t (C = context steps, V state variables);
- ``forcing``: (K, F, H, W) normalised field forcings at t+1 .. t+K;
- ``scalars``: (K, S) normalised scalar forcings (CO2 radiative forcing) at t+1 .. t+K;
- ``target``: (K, V, H, W) normalised state at t+1 .. t+K;
- ``mask``: (V, H, W) 1 where a variable is defined (ocean variables over the ocean), else 0;
- ``phase``: () climatological bin of t+1 (its month of year 0-11 for monthly data; see
  :mod:`~hfmi_kit.domains.climate.timeaxis`);
- ``meta``: (1,) index of time t in the dataset.

Field forcings (insolation) and scalar forcings (CO2) are inputs the model never predicts: a
what-if experiment changes them and rolls the model out.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch.utils.data import Dataset

from hfmi_kit.data.cf import (
    _LAT_UNITS,
    _LON_UNITS,
    check_time,
    find_axes,
    grid_dims,
    is_zarr,
    level_name,
    open_cf,
    regrid_bilinear,
    select_gridded,
    unit_factor,
    vertical_axis,
)
from hfmi_kit.domains.climate.timeaxis import TimeStep, calendar_fields, detect_step, phase_of
from hfmi_kit.errors import DataError, GeometryMismatchError

LOGGER = logging.getLogger(__name__)

# standard_name -> (canonical units, accepted spellings, conversions to canonical)
UNITS: dict[str, tuple[str, set[str], dict[str, tuple[float, float]]]] = {
    "air_temperature": ("K", {"K", "kelvin"}, {"degC": (1.0, 273.15), "Celsius": (1.0, 273.15)}),
    "sea_surface_temperature": ("K", {"K", "kelvin"}, {"degC": (1.0, 273.15)}),
    "sea_ice_area_fraction": ("1", {"1", "", "fraction"}, {"%": (0.01, 0.0)}),
    "toa_incoming_shortwave_flux": ("W m-2", {"W m-2", "W/m2", "W m**-2", "W/m^2"}, {}),
    "mole_fraction_of_carbon_dioxide_in_air": ("1e-6", {"1e-6", "ppm", "ppmv"}, {"1": (1e6, 0.0)}),
}
FIELD_FORCINGS = {"toa_incoming_shortwave_flux"}
SCALAR_FORCINGS = {"mole_fraction_of_carbon_dioxide_in_air"}
C0_PPM = 280.0


def co2_to_forcing(ppm: np.ndarray) -> np.ndarray:
    """CO2 concentration [ppm] -> radiative forcing 5.35 ln(C/C0) [W m-2], C0 = 280 ppm."""
    return 5.35 * np.log(np.asarray(ppm, dtype=np.float64) / C0_PPM)


def sha256(path: str | Path) -> str:
    """Checksum of a file, or of every file of a Zarr directory in a stable order."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:  # in blocks: a year of hourly ERA5 is tens of GB
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class StoredField:
    """A field that ``load_climate(..., lazy=True)`` left in its Zarr store: its (T, H, W) shape;
    :class:`~hfmi_kit.domains.climate.stream.StoreReader` reads it block by block. Turning it
    into an array (loading it whole) is refused."""

    source: str
    name: str
    shape: tuple[int, int, int]

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise DataError(f"{self.source}: field {self.name!r} is streamed from its store, not loaded whole "
                        "(this step needs the data in memory: run without --stream)")


@dataclass
class ClimateData:
    """A validated climate dataset held as numpy arrays on one lat-lon grid."""

    source: str
    time: np.ndarray  # (T,) datetime64, or cftime objects on a calendar numpy lacks (360_day, noleap)
    lat: np.ndarray  # (H,)
    lon: np.ndarray  # (W,)
    # var -> (T, H, W) physical units, NaN where undefined (a StoredField when loaded lazily)
    state: dict[str, np.ndarray]
    forcing: dict[str, np.ndarray]  # var -> (T, H, W) (a StoredField when loaded lazily)
    scalars: dict[str, np.ndarray]  # var -> (T,) (CO2 already as radiative forcing, W m-2)
    valid: dict[str, np.ndarray]  # state var -> (H, W) bool
    attrs: dict[str, dict[str, Any]]  # var -> CF attributes (units canonical)
    global_attrs: dict[str, Any] = field(default_factory=dict)
    # a field that is one level of a variable (ta_500) -> {variable, axis, kind, value, units,
    # positive, file_value}: its vertical coordinate, the level in hPa or m
    levels: dict[str, dict[str, Any]] = field(default_factory=dict)
    step: TimeStep = TimeStep("month", 1)  # the regular time step (and calendar) of ``time``

    @property
    def state_vars(self) -> list[str]:
        return list(self.state)

    @property
    def phase(self) -> np.ndarray:
        """(T,) the climatological bin of each step (month of year 0-11 for monthly data)."""
        return phase_of(self.time, self.step)

    @property
    def years(self) -> np.ndarray:
        return calendar_fields(self.time)["year"]

    def geometry(self) -> dict[str, Any]:
        """What a checkpoint records about the data it expects (its normalisation statistics go
        in the checkpoint's ``processors``)."""
        return {
            "state_variables": self.state_vars,
            "field_forcings": list(self.forcing),
            "scalar_forcings": list(self.scalars),
            "units": {v: self.attrs[v].get("units", "") for v in [*self.state, *self.forcing, *self.scalars]},
            "standard_names": {v: self.attrs[v].get("standard_name", "") for v in self.attrs},
            "grid": {"lat": [float(x) for x in self.lat], "lon": [float(x) for x in self.lon]},
            "valid_fraction": {v: float(m.mean()) for v, m in self.valid.items()},
            "time_step": self.step.label, "calendar": self.step.calendar, "climatology": self.step.cycle,
            **({"levels": {k: {a: b for a, b in v.items() if a != "file_value"} for k, v in self.levels.items()}}
               if self.levels else {}),
        }


def unit_conversion(standard_name: str, units: str) -> tuple[float, float] | None:
    """(scale, offset) that bring a variable of a known ``standard_name`` from ``units`` to the
    canonical units of :data:`UNITS` (``(1, 0)`` when they already are); None when not convertible
    or the standard name is not one of :data:`UNITS`."""
    if standard_name not in UNITS:
        return None
    canon, ok, conv = UNITS[standard_name]
    if units in ok:
        return 1.0, 0.0
    if units in conv:
        return conv[units]
    return unit_factor(units, canon) if units else None


def _convert_units(da: xr.DataArray, name: str, source: str) -> tuple[xr.DataArray, str]:
    sn = str(da.attrs.get("standard_name", ""))
    units = str(da.attrs.get("units", "")).strip()
    if sn not in UNITS:
        if not units:
            raise DataError(f"{source}: variable {name!r}{f' ({sn})' if sn else ''} has no 'units' attribute; CF "
                            f"requires one: add it, e.g. `ncatted -a units,{name},c,c,UNITS FILE`")
        return da, units
    canon, ok, conv = UNITS[sn]
    if units in ok:
        return da, canon
    factor = unit_conversion(sn, units)
    if factor is not None:
        a, b = factor
        LOGGER.info("%s: converting %s from %s to %s", source, name, units, canon)
        out = da * a + b
        out.attrs = {**da.attrs, "units": canon}
        return out, canon
    if unit_factor(canon, canon) is not None:  # UDUNITS at hand: any convertible units will do
        expected = f"{canon!r} or units convertible to it" + (f" (e.g. {sorted(conv)})" if conv else "")
    else:
        expected = f"{canon!r}" + (f" or one of {sorted(conv)}" if conv else "")
    raise DataError(f"{source}: variable {name!r} ({sn}) has units {units!r}; expected {expected}")


_NETCDF_MAGIC = (b"CDF\x01", b"CDF\x02", b"CDF\x05", b"\x89HDF\r\n\x1a\n")


def _check_file(path: str | Path) -> None:
    """Clear errors for what is not a NetCDF file or Zarr store before a backend guesses."""
    from hfmi_kit.data.cf import is_zarr

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        if not is_zarr(p):
            raise DataError(f"{p}: a directory but not a Zarr store (no zarr.json, .zgroup or .zmetadata)")
        return
    size = p.stat().st_size
    if size == 0:
        raise DataError(f"{p}: empty file (0 bytes); expected a NetCDF file or a Zarr store")
    with open(p, "rb") as f:
        head = f.read(8)
        hdf_at = [0, 512, 1024, 2048, 4096]  # HDF5 may follow a user block of 512 * 2^k bytes
        found = any(head.startswith(m) for m in _NETCDF_MAGIC)
        for off in hdf_at[1:]:
            if found or off >= size:
                break
            f.seek(off)
            found = f.read(8) == _NETCDF_MAGIC[-1]
    if not found:
        raise DataError(f"{p}: not a NetCDF file (it starts with {head!r}, not the NetCDF 'CDF' or HDF5 "
                        f"signature); expected a NetCDF file or a Zarr store")


def _check_time_values(ds: xr.Dataset, time: str, source: str) -> None:
    """The time axis must hold decoded times (CF: numbers with 'units' like 'days since 2000-01-01')."""
    t = ds[time]
    if np.issubdtype(t.dtype, np.datetime64):
        return
    if t.dtype == object and all(hasattr(x, "year") and hasattr(x, "month") for x in t.values.ravel()):
        return
    units = t.attrs.get("units", t.encoding.get("units"))
    hint = f"its units {units!r} are not 'TIME since DATE'" if units else "it has no 'units' attribute"
    raise DataError(f"{source}: time axis {time!r} holds {t.dtype} values, not times ({hint}; CF needs units "
                    "such as 'days since 2000-01-01')")


def _check_coord(ds: xr.Dataset, name: str, kind: str, source: str) -> None:
    """A latitude or longitude coordinate: numbers, finite, no duplicates, strictly monotonic
    (longitude may wrap once past 360), latitude within [-90, 90]."""
    c = ds[name]
    if not np.issubdtype(c.dtype, np.number):
        raise DataError(f"{source}: {kind} {name!r} holds {c.dtype} values, not numbers")
    units = str(c.attrs.get("units", "")).strip()
    allowed = _LAT_UNITS if kind == "latitude" else _LON_UNITS
    if units and units.lower().replace(" ", "") not in allowed | {"degrees", "degree"}:
        want = "degrees_north" if kind == "latitude" else "degrees_east"
        raise DataError(f"{source}: {kind} {name!r} has units {units!r}; expected {want}")
    x = np.asarray(c.values, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise DataError(f"{source}: {kind} {name!r} has NaN/inf values")
    key = x % 360.0 if kind == "longitude" else x
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    if (counts > 1).any():
        i = int(np.flatnonzero(counts > 1)[0])
        j = int(np.flatnonzero(key == key[first[i]])[1])
        raise DataError(f"{source}: duplicated {kind} {x[j]} at index {j} of {name!r}")
    if kind == "latitude":
        if x.min() < -90.0 or x.max() > 90.0:
            raise DataError(f"{source}: latitude {name!r} has values outside [-90, 90] (min {x.min():g}, max "
                            f"{x.max():g}); expected degrees_north")
        d = np.diff(x)
        if x.size > 1 and not ((d > 0).all() or (d < 0).all()):
            i = int(np.argmax(d < 0) if d[0] > 0 else np.argmax(d > 0)) + 1
            raise DataError(f"{source}: latitude {name!r} is not monotonic: {x[i]:g} follows {x[i - 1]:g} at "
                            f"index {i}")
    else:
        if x.max() - x.min() >= 360.0 + 1e-6:
            raise DataError(f"{source}: longitude {name!r} spans {x.max() - x.min():g} degrees (more than 360); "
                            "expected degrees_east")
        up = np.diff(np.roll(key, -int(np.argmin(key))))  # a sorted sequence, possibly wrapped past 360
        down = np.diff(np.roll(key, -int(np.argmax(key))))
        if x.size > 2 and not ((up > 0).all() or (down < 0).all()):
            d = np.diff(x)
            i = int(np.argmax(d < 0) if d[0] > 0 else np.argmax(d > 0)) + 1
            raise DataError(f"{source}: longitude {name!r} is not monotonic: {x[i]:g} follows {x[i - 1]:g} at "
                            f"index {i}")


def _values(da: xr.DataArray, name: str, source: str) -> np.ndarray:
    """Read a variable's values; a corrupt or truncated chunk becomes a :class:`DataError`."""
    try:
        return np.asarray(da.values)
    except Exception as e:  # the backends and codecs raise many types for damaged data
        raise DataError(f"{source}: variable {name!r} cannot be read, the file is corrupt or truncated "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e


def _on_grid(ds: xr.Dataset, dims: tuple[str, str], lat: np.ndarray, lon: np.ndarray) -> bool:
    a, b = ds[dims[0]].values, ds[dims[1]].values
    return a.shape == lat.shape and b.shape == lon.shape and np.allclose(a, lat) and np.allclose(b, lon)


def _level_fields(ds: xr.Dataset, names: Sequence[str], levels: Sequence[float] | None, src: str
                  ) -> tuple[dict[str, xr.DataArray], dict[str, dict[str, Any]]]:
    """Each variable of ``names`` as (time, lat, lon) fields: a variable on a vertical axis
    (pressure, depth, height) becomes one field per level, ``ta_500`` (the level in hPa or m).
    ``levels`` keeps those levels of every variable that has any of them (``500,850`` thins the
    pressure levels and leaves ocean depths as they are); a level no variable has is an error.
    Returns the fields and each level field's vertical coordinate."""
    fields: dict[str, xr.DataArray] = {}
    info: dict[str, dict[str, Any]] = {}
    wanted = None if levels is None else np.asarray(levels, dtype=np.float64)
    for v in names:
        da = ds[v]
        vert = vertical_axis(da, ds, source=src)
        if vert is None:
            fields[v] = da
            continue
        for i in vert.keep(levels):
            name = level_name(v, float(vert.values[i]))
            if name in ds.variables or name in fields:
                raise DataError(f"{src}: level {vert.values[i]:g} {vert.units} of {v!r} would be the field {name!r}, "
                                "which the dataset already has; rename one of them")
            fields[name] = da.isel({vert.dim: i}, drop=True)
            info[name] = {"variable": str(v), "axis": vert.dim, "kind": vert.kind, "value": float(vert.values[i]),
                          "units": vert.units, "positive": vert.positive, "file_value": float(vert.file_values[i])}
    if wanted is not None:
        have = {(i["units"], i["value"]) for i in info.values()}
        missing = [f"{x:g}" for x in wanted if not any(np.isclose(x, h) for _, h in have)]
        if missing:
            raise DataError(f"{src}: no variable has the level(s) {', '.join(missing)}; the levels present are "
                            f"{', '.join(f'{h:g} {u}' for u, h in sorted(have))}" if have else
                            f"{src}: levels {', '.join(missing)} asked for, but no variable has a vertical axis")
    return fields, info


def _requested(ds: xr.Dataset, variables: Sequence[str]) -> list[str]:
    """The file variables a request names: ``ta`` (every level) or one level field ``ta_500``."""
    out = []
    for r in variables:
        base = r.rsplit("_", 1)[0] if r not in ds.data_vars and "_" in r else r
        out.append(base if base in ds.data_vars else r)
    return list(dict.fromkeys(out))


def field_array(ds: xr.Dataset, name: str, levels: dict[str, dict[str, Any]]) -> xr.DataArray:
    """Field ``name`` of ``ds``: a variable, or one level of one (``levels[name]``)."""
    lv = levels.get(name)
    return ds[name] if lv is None else ds[lv["variable"]].sel({lv["axis"]: lv["file_value"]}, drop=True)


def gather_levels(ds: xr.Dataset, levels: dict[str, dict[str, Any]]) -> xr.Dataset:
    """The data variables of ``ds`` named after level fields (``ta_500``, ``ta_500_response``)
    joined per variable along its vertical coordinate (``ta``, ``ta_response`` with dims
    (..., plev, lat, lon) and the CF attributes of the axis, levels in hPa or m), as the
    source file held them."""
    groups: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for name in list(ds.data_vars):
        for f in sorted(levels, key=len, reverse=True):
            if name == f or name.startswith(f + "_"):
                groups.setdefault((f"{levels[f]['variable']}{name[len(f):]}", levels[f]["axis"]), []).append(
                    (str(name), levels[f]))
                break
    out = ds
    for (target, axis), members in groups.items():
        lv = members[0][1]
        coord = xr.DataArray([m[1]["value"] for m in members], dims=axis,
                             attrs={"standard_name": {"pressure": "air_pressure"}.get(lv["kind"], lv["kind"]),
                                    "units": lv["units"], "positive": lv["positive"], "axis": "Z"})
        joined = xr.concat([ds[m[0]] for m in members], dim=coord)
        dims = list(ds[members[0][0]].dims)
        joined = joined.transpose(*dims[:-2], axis, *dims[-2:])
        joined.attrs = dict(ds[members[0][0]].attrs)
        joined.encoding = dict(ds[members[0][0]].encoding)
        out = out.drop_vars([m[0] for m in members]).assign({target: joined})
    return out


def _times(t: xr.DataArray) -> tuple[np.ndarray, str]:
    """The times of axis ``t`` (datetime64, or cftime objects on a calendar numpy lacks) and
    their CF calendar."""
    calendar = str(t.encoding.get("calendar", t.attrs.get("calendar", "standard")))
    values = np.asarray(t.values)
    if values.dtype == object:
        calendar = str(getattr(values.ravel()[0], "calendar", calendar) or calendar)
        if calendar in ("standard", "gregorian", "proleptic_gregorian"):
            values = np.asarray(xr.CFTimeIndex(values).to_datetimeindex(time_unit="ns"))
    if np.issubdtype(values.dtype, np.datetime64):
        values = values.astype("datetime64[ns]")
        calendar = "standard" if calendar in ("gregorian", "proleptic_gregorian") else calendar
    return values, calendar


def load_climate(path: str | Path, *, variables: Sequence[str] | None = None,
                 levels: Sequence[float] | None = None, expect: dict[str, Any] | None = None,
                 lazy: bool = False) -> ClimateData:
    """Read and validate a CF climate dataset.

    Takes every data variable with a time axis and a lat-lon grid (or those named in
    ``variables``); variables whose standard name is a known forcing (TOA insolation) become
    forcings, a time-only CO2 series becomes a scalar forcing. Variables on another lat-lon grid
    are regridded bilinearly onto the grid of the first state variable (or ``expect``'s grid).
    A variable on a vertical axis (pressure, depth or height, found by its CF attributes) is
    read as one field per level, ``ta_500`` (hPa) or ``thetao_5`` (m): a token group each, with
    statistics of its own; an ocean field's cells that hold no value at any time at one depth
    (below the sea floor) are outside its mask at that depth.

    Args:
        path: NetCDF file or Zarr store.
        variables: restrict to these variables (``ta`` for every level, ``ta_500`` for one).
        levels: keep only these levels (hPa for pressure, m for depth and height).
        expect: a checkpoint's geometry; the data must provide its variables on its grid.
        lazy: leave the fields in a Zarr store (:class:`StoredField`), reading only their first
            step (masks, below-floor cells); NaNs outside a mask are then caught as blocks are
            read for training. The fields must be on one grid (``hfmi data prepare`` puts them there).

    Raises:
        DataError: missing/misnamed variable, no time axis, non-monotonic or duplicated times,
            wrong units, NaNs outside the declared mask, a grid without lat/lon.
        GeometryMismatchError: the data does not match ``expect``.
    """
    src = str(path)
    _check_file(path)
    if lazy and not is_zarr(path):
        raise DataError(f"{src}: streaming reads a Zarr store; make one with "
                        f"hfmi data prepare climate {Path(src).name} --out STORE.zarr")
    ds = open_cf(path, chunks="auto")  # read whole on-disk chunks in few dask tasks
    axes = find_axes(ds, source=src)
    _check_time_values(ds, axes.time, src)
    check_time(ds, axes.time, source=src)
    if expect is not None:
        variables = list(expect["state_variables"]) + list(expect["field_forcings"])
        levels = None
    names = select_gridded(ds, axes, _requested(ds, variables) if variables else None, source=src)
    if not names:
        raise DataError(f"{src}: no data variable has dims ({axes.time}, lat, lon)")
    for v in names:
        if axes.time not in ds[v].dims:
            raise DataError(f"{src}: variable {v!r} has no time axis {axes.time!r}; dims are {ds[v].dims}")
        if grid_dims(ds[v], ds) is None:
            raise DataError(f"{src}: variable {v!r} is not on a lat-lon grid; dims are {ds[v].dims}")
    fields, level_info = _level_fields(ds, names, levels, src)
    if variables:
        chosen = [f for r in variables for f in fields if f == r or level_info.get(f, {}).get("variable") == r]
        missing = [r for r in variables if r not in fields and not any(i["variable"] == r for i in level_info.values())]
        if missing:
            lv = sorted({f"{i['variable']}: {i['value']:g} {i['units']}" for i in level_info.values()})
            raise DataError(f"{src}: field(s) {missing} not found; the level fields are named VARIABLE_LEVEL "
                            f"({', '.join(lv[:8])}{', ...' if len(lv) > 8 else ''})")
        fields = {f: fields[f] for f in dict.fromkeys(chosen)}
    for v, da in fields.items():
        dims = grid_dims(da, ds)
        extra = [str(d) for d in da.dims if d not in (axes.time, *dims)]  # type: ignore[misc]
        if extra:
            raise DataError(f"{src}: variable {v!r} has dims {da.dims}; expected only ({axes.time}, [level,] lat, "
                            f"lon), not the extra dimension(s) {extra}")
        if not np.issubdtype(da.dtype, np.number):
            raise DataError(f"{src}: variable {v!r} holds {da.dtype} values, not numbers")
        for c, kind in zip(dims, ("latitude", "longitude")):  # type: ignore[arg-type]
            _check_coord(ds, c, kind, src)
    state_names = [v for v in fields if fields[v].attrs.get("standard_name") not in FIELD_FORCINGS]
    forcing_names = [v for v in fields if fields[v].attrs.get("standard_name") in FIELD_FORCINGS]
    if not state_names:
        raise DataError(f"{src}: only forcings found ({forcing_names}); need at least one state variable")
    scalar_names = [str(v) for v, da in ds.data_vars.items()
                    if da.dims == (axes.time,) and da.attrs.get("standard_name") in SCALAR_FORCINGS]
    if expect is not None:
        missing = [v for v in expect["scalar_forcings"] if v not in scalar_names]
        if missing:
            raise GeometryMismatchError(f"{src}: scalar forcing(s) {missing} the model expects are missing")
        scalar_names = list(expect["scalar_forcings"])
    # target grid
    lat_d, lon_d = grid_dims(fields[state_names[0]], ds)  # type: ignore[misc]
    lat = np.asarray(ds[lat_d].values, dtype=np.float64)
    lon = np.asarray(ds[lon_d].values, dtype=np.float64)
    if expect is not None:
        lat, lon = np.asarray(expect["grid"]["lat"]), np.asarray(expect["grid"]["lon"])
    land = None
    for da in ds.data_vars.values():
        if da.attrs.get("standard_name") == "land_area_fraction":
            dims = grid_dims(da, ds)
            if dims and da.ndim == 2:
                lf = da if _on_grid(ds, dims, lat, lon) else regrid_bilinear(da, *dims, lat, lon)
                frac = np.asarray(_values(lf, str(da.name), src), dtype=np.float64)
                frac = frac / 100.0 if str(da.attrs.get("units", "%")).strip() == "%" else frac
                land = frac >= 0.5
    time, calendar = _times(ds[axes.time])
    step = detect_step(time, calendar=calendar, source=src)
    if expect is not None and expect.get("time_step", "1 month") != step.label:
        raise GeometryMismatchError(f"{src}: time step of {step.label}; the checkpoint was trained on steps of "
                                    f"{expect.get('time_step', '1 month')}")
    state, forcing, valid, attrs = {}, {}, {}, {}
    for v in state_names + forcing_names:
        src_da = fields[v]
        g = grid_dims(src_da, ds)
        da = src_da.transpose(axes.time, *g)  # type: ignore[misc]
        da, units = _convert_units(da, level_info[v]["variable"] if v in level_info else v, src)
        where_sea = "where sea" in str(src_da.attrs.get("cell_methods", ""))
        mask_v = land
        regrid = not _on_grid(ds, g, lat, lon)  # another grid, or not the checkpoint's grid
        if regrid:
            LOGGER.info("%s: regridding %s bilinearly onto the %dx%d target grid", src, v, lat.size, lon.size)
            if where_sea and land is not None:  # check NaNs against the variable's own mask first
                own = _values(src_da, v, src)
                if (~np.isfinite(own) & ~(np.isnan(own).all(axis=0))[None]).any():
                    raise DataError(f"{src}: variable {v!r} has NaN/inf values over the ocean on its own grid")
            if lazy:
                raise DataError(f"{src}: variable {v!r} is on another grid than {state_names[0]!r}; streaming "
                                "reads fields on one grid: put them there with hfmi data prepare climate --grid")
            da = regrid_bilinear(da, g[0], g[1], lat, lon)
        arr = _values(da.isel({axes.time: slice(0, 1)}) if lazy else da, v, src).astype(np.float32)
        if arr.shape[1:] != (lat.size, lon.size):
            raise DataError(f"{src}: variable {v!r} has grid {arr.shape[1:]}, expected {(lat.size, lon.size)}")
        bad = ~np.isfinite(arr)
        if where_sea and land is not None and (regrid or v in level_info):
            # coast cells the regridded ocean field does not reach; at a depth, cells below the sea floor
            mask_v = land | bad.all(axis=0)
        if bad.any():
            if where_sea and mask_v is not None:
                outside = bad & ~mask_v[None]
                if outside.any():
                    t, i, j = np.argwhere(outside)[0]
                    raise DataError(
                        f"{src}: variable {v!r} has {int(outside.sum())} NaN/inf value(s) over the ocean "
                        f"(outside its declared land mask), first at time={time[t]}, lat={lat[i]:.2f}, "
                        f"lon={lon[j]:.2f}"
                    )
            else:
                t, i, j = np.argwhere(bad)[0]
                declared = "declared 'where sea' but no land_area_fraction variable" if where_sea else \
                    "no declared mask (cell_methods 'area: mean where sea' + land_area_fraction)"
                raise DataError(
                    f"{src}: variable {v!r} has {int(bad.sum())} NaN/inf value(s) and {declared}; "
                    f"first at time={time[t]}, lat={lat[i]:.2f}, lon={lon[j]:.2f}"
                )
        attrs[v] = {**{k: src_da.attrs[k] for k in ("standard_name", "long_name", "cell_methods")
                       if k in src_da.attrs}, "units": units}
        if v in level_info:
            lv = level_info[v]
            attrs[v]["level"] = f"{lv['value']:g} {lv['units']}"
        stored = StoredField(src, v, (int(ds.sizes[axes.time]), lat.size, lon.size)) if lazy else arr
        if v in forcing_names:
            forcing[v] = stored
        else:
            state[v] = stored
            valid[v] = ~mask_v if (where_sea and mask_v is not None) else np.ones((lat.size, lon.size), bool)
    scalars = {}
    for v in scalar_names:
        if not np.issubdtype(ds[v].dtype, np.number):
            raise DataError(f"{src}: scalar forcing {v!r} holds {ds[v].dtype} values, not numbers")
        da, units = _convert_units(ds[v], v, src)
        arr = _values(da, v, src).astype(np.float64)
        if not np.isfinite(arr).all():
            raise DataError(f"{src}: scalar forcing {v!r} has NaN/inf values")
        if (arr <= 0).any():
            raise DataError(f"{src}: CO2 concentration {v!r} must be positive [ppm], got min {arr.min()}")
        scalars[v] = co2_to_forcing(arr).astype(np.float32)
        attrs[v] = {"standard_name": ds[v].attrs.get("standard_name", ""), "units": units,
                    "long_name": "CO2 radiative forcing 5.35 ln(C/280 ppm) [W m-2] as model input"}
    if expect is not None:
        exp_units = expect.get("units", {})
        for v, a in attrs.items():
            if v in exp_units and exp_units[v] != a["units"]:
                raise GeometryMismatchError(
                    f"{src}: variable {v!r} has units {a['units']!r}; the checkpoint expects {exp_units[v]!r}"
                )
    ga = dict(ds.attrs)
    ds.close()
    return ClimateData(source=src, time=time, step=step, lat=lat, lon=lon,
                       state=state, forcing=forcing, scalars=scalars, valid=valid, attrs=attrs,
                       global_attrs=ga, levels={k: level_info[k] for k in [*state, *forcing] if k in level_info})


def compute_stats(path: str | Path, data: ClimateData,
                  time_index: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Per-variable mean and standard deviation, computed lazily with dask chunks.

    Reads the file (so it scales past memory), restricted to ``time_index`` (the training
    years) when given; CO2 statistics are those of its radiative forcing.
    """
    ds = open_cf(path, chunks="auto")  # dask's chunk size (whole on-disk chunks): few tasks, bounded memory
    if time_index is not None:
        tdim = find_axes(ds, source=str(path)).time
        ds = ds.isel({tdim: np.asarray(time_index)})
    import dask

    names = [*data.state, *data.forcing]
    # one dask graph for every mean and std: each chunk is read once, not twice per variable
    arrays = [field_array(ds, v, data.levels) for v in names]
    means, stds = dask.compute([a.mean(skipna=True) for a in arrays], [a.std(skipna=True) for a in arrays])
    stats = {}
    for v, da, m, sd in zip(names, arrays, means, stds):
        a = data.attrs[v]
        mean, std = float(m), float(sd)
        factor = unit_conversion(a.get("standard_name", ""), str(da.attrs.get("units", "")).strip())
        if factor is not None:
            s, o = factor
            mean, std = mean * s + o, std * abs(s)
        stats[v] = {"mean": mean, "std": max(std, 1e-6)}
    ds.close()
    return {**stats, **scalar_stats(data, time_index)}


def scalar_stats(data: ClimateData, time_index: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each scalar forcing (its radiative forcing for CO2) over
    ``time_index`` (every step when None)."""
    stats = {}
    for v, arr in data.scalars.items():
        a = arr if time_index is None else arr[np.asarray(time_index)]
        stats[v] = {"mean": float(a.mean()), "std": max(float(a.std()), 1.0)}
    return stats


def residual_scale(tens: Tensors, index: np.ndarray) -> list[float]:
    """Std of one-step tendencies (normalised units) per state variable over valid cells of ``index``."""
    idx = np.asarray(index)
    pairs = idx[np.isin(idx + 1, idx)]
    d = tens.state[pairs + 1] - tens.state[pairs]  # (N, V, H, W)
    m = tens.mask[None].expand_as(d)
    out = []
    for v in range(d.shape[1]):
        x = d[:, v][m[:, v] > 0]
        out.append(float(max(x.std().item(), 1e-3)) if x.numel() > 1 else 1.0)
    return out


def main_variable(data: ClimateData) -> str:
    """The headline variable: near-surface air temperature when present (a single-level field
    before one on pressure levels), else the first."""
    for v in sorted(data.state, key=lambda v: v in data.levels):
        if data.attrs[v].get("standard_name") == "air_temperature":
            return v
    return data.state_vars[0]


def check_geometry(data: ClimateData, geometry: dict[str, Any]) -> None:
    """Fail with a clear message when data and a checkpoint's geometry disagree."""
    src = data.source
    exp_vars = geometry["state_variables"]
    if data.state_vars != exp_vars:
        raise GeometryMismatchError(f"{src}: state variables {data.state_vars}; the checkpoint expects {exp_vars}")
    glat, glon = np.asarray(geometry["grid"]["lat"]), np.asarray(geometry["grid"]["lon"])
    if data.lat.shape != glat.shape or data.lon.shape != glon.shape or not (
        np.allclose(data.lat, glat) and np.allclose(data.lon, glon)
    ):
        raise GeometryMismatchError(
            f"{src}: grid {data.lat.size}x{data.lon.size} differs from the checkpoint's {glat.size}x{glon.size}"
        )


class Normaliser:
    """Per-variable (x - mean) / std with the statistics stored in the checkpoint."""

    def __init__(self, stats: dict[str, dict[str, float]]) -> None:
        self.stats = stats

    def norm(self, name: str, x: np.ndarray) -> np.ndarray:
        s = self.stats[name]
        return (x - s["mean"]) / s["std"]

    def denorm(self, name: str, x: np.ndarray | torch.Tensor) -> Any:
        s = self.stats[name]
        return x * s["std"] + s["mean"]


@dataclass
class Tensors:
    """Normalised arrays of a whole dataset, NaN replaced by 0 (masked out of losses)."""

    state: torch.Tensor  # (T, V, H, W)
    forcing: torch.Tensor  # (T, F, H, W)
    scalars: torch.Tensor  # (T, S)
    mask: torch.Tensor  # (V, H, W)
    phase: torch.Tensor  # (T,) climatological bin of each step (month of year 0-11 for monthly data)
    step: TimeStep = TimeStep("month", 1)


def to_tensors(data: ClimateData, normaliser: Normaliser) -> Tensors:
    """Normalise ``data`` into dense tensors for the models.

    Raises:
        DataError: ``data`` was loaded lazily (its fields are streamed, not held)."""
    T, H, W = data.time.size, data.lat.size, data.lon.size
    for v in [*data.state.values(), *data.forcing.values()]:
        if isinstance(v, StoredField):
            np.asarray(v)  # raises, naming the field

    def stack(d: dict[str, np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
        if not d:
            return torch.zeros(shape)
        arr = np.stack([np.nan_to_num(normaliser.norm(k, v), nan=0.0) for k, v in d.items()], axis=1)
        return torch.from_numpy(arr.astype(np.float32))

    return Tensors(
        state=stack(data.state, (T, 0, H, W)),
        forcing=stack(data.forcing, (T, 0, H, W)),
        scalars=stack(data.scalars, (T, 0)),
        mask=torch.from_numpy(np.stack([data.valid[v] for v in data.state]).astype(np.float32)),
        phase=torch.from_numpy(data.phase.astype(np.int64)),
        step=data.step,
    )


def phase_means(x: torch.Tensor, phase: torch.Tensor, step: TimeStep, index: np.ndarray) -> torch.Tensor:
    """(P, ...) mean of ``x`` (T, ...) in each climatological bin of ``step`` over the steps
    ``index``; day-of-year bins are smoothed over +-15 days (circular), so a bin without data
    (day 366 outside leap years) takes its neighbours'.

    Raises:
        DataError: a bin without data (after smoothing): the training steps do not cover the cycle.
    """
    idx = torch.from_numpy(np.asarray(index))
    sums = torch.zeros(step.phases, *x.shape[1:], dtype=torch.float64)
    counts = torch.zeros(step.phases, dtype=torch.float64)
    add_phase_sums(sums, counts, x[idx], phase[idx])
    return finish_phase_means(sums, counts, step)


def add_phase_sums(sums: torch.Tensor, counts: torch.Tensor, x: torch.Tensor, phase: torch.Tensor) -> None:
    """Add the steps ``x`` (N, ...) of bins ``phase`` (N,) to the per-bin ``sums`` (P, ...) and
    ``counts`` (P,) (float64), in place: a climatology accumulated block by block."""
    for v in range(x.shape[1]) if x.dim() > 2 else [None]:  # a variable at a time: float64 copies stay small
        if v is None:
            sums.index_add_(0, phase, x.double())
        else:
            sums[:, v].index_add_(0, phase, x[:, v].double())
    counts.index_add_(0, phase, torch.ones(len(phase), dtype=torch.float64))


def finish_phase_means(sums: torch.Tensor, counts: torch.Tensor, step: TimeStep) -> torch.Tensor:
    """(P, ...) float32 means from the sums of :func:`add_phase_sums`, smoothed over +-15 days
    for day-of-year bins (see :func:`phase_means`).

    Raises:
        DataError: a bin without data (after smoothing)."""
    P = step.phases
    shape = tuple(sums.shape[1:])
    w = step.smooth_bins
    if w:
        per = 24 // step.n if step.unit == "hour" else 1  # bins per day: smooth along the days
        days = P // per
        s = sums.reshape(days, per, *shape)
        c = counts.reshape(days, per)
        s = sum(torch.roll(s, k, dims=0) for k in range(-w, w + 1))
        c = sum(torch.roll(c, k, dims=0) for k in range(-w, w + 1))
        sums, counts = s.reshape(P, *shape), c.reshape(P)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        b = int(empty[0])
        what = f"month {b + 1}" if step.cycle == "month" else f"{step.cycle} bin {b}"
        raise DataError(f"{what} has no data in the training years; cannot form a climatology")
    return sums.div_(counts.reshape(P, *([1] * len(shape)))).float()  # in place: no second float64 copy


def climatology(tens: Tensors, index: np.ndarray) -> torch.Tensor:
    """(P, V, H, W) normalised mean state of each climatological bin (month of year for monthly
    data, day of year for daily, none for annual; see :mod:`.timeaxis`) over the steps ``index``."""
    return phase_means(tens.state, tens.phase, tens.step, index)


def anomaly_damping(tens: Tensors, index: np.ndarray, clim: torch.Tensor) -> torch.Tensor:
    """(V, H, W) lag-1 regression coefficient of monthly anomalies over consecutive steps of ``index``.

    The least-squares ``a`` in ``anom[t+1] ≈ a * anom[t]`` per cell and variable, clipped to
    [0, 1]: the damped-anomaly-persistence forecast, the classical statistical baseline that the
    forecaster starts from. Cells outside the mask get 1.
    """
    idx = np.asarray(index)
    pairs = idx[np.isin(idx + 1, idx)]
    if pairs.size < 2:
        raise DataError("fewer than two consecutive training steps; cannot fit the anomaly damping")
    p = torch.from_numpy(pairs)
    a0 = tens.state[p] - clim[tens.phase[p]]
    a1 = tens.state[p + 1] - clim[tens.phase[p + 1]]
    num, den = (a0 * a1).sum(0), (a0 * a0).sum(0)
    out = torch.where(den > 1e-8, num / den.clamp_min(1e-8), torch.ones_like(den)).clamp(0.0, 1.0)
    return torch.where(tens.mask > 0, out, torch.ones_like(out))


def anomaly_regression(tens: Tensors, index: np.ndarray, clim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """Forced damped persistence fitted per cell over consecutive steps of ``index``:
    ``anom[t+1] ≈ a anom[t] + sum_s b_s (s[t+1] - s_ref)`` by least squares (a linear inverse
    model with the scalar forcings, e.g. CO2, as inputs; ``s_ref`` their mean over the steps).

    Returns ``a`` (V, H, W) clipped to [0, 1] (1 outside the mask), ``b`` (S, V, H, W) (0 outside
    the mask) and ``s_ref`` (S,). Without scalar forcings ``a`` is the plain lag-1 coefficient of
    :func:`anomaly_damping`.
    """
    idx = np.asarray(index)
    pairs = idx[np.isin(idx + 1, idx)]
    S = tens.scalars.shape[1]
    if pairs.size < S + 2:
        raise DataError("too few consecutive training steps to fit the forced anomaly persistence")
    p = torch.from_numpy(pairs)
    if S == 0:
        a = anomaly_damping(tens, index, clim)
        return a, torch.zeros(0, *a.shape), torch.zeros(0)
    ref = tens.scalars[p + 1].double().mean(0)
    sums = RegressionSums(S, tuple(tens.state.shape[1:]))
    sums.add((tens.state[p] - clim[tens.phase[p]]).double(), (tens.state[p + 1] - clim[tens.phase[p + 1]]).double(),
             tens.scalars[p + 1].double() - ref)
    a, b = sums.solve(tens.mask)
    return a, b, ref.float()


class RegressionSums:
    """The per-cell normal equations of the forced anomaly persistence of
    :func:`anomaly_regression`, accumulated block by block: ``add(a0, a1, ds)`` with the
    anomalies at t and t+1 (N, V, H, W) and the scalar forcings' departures at t+1 (N, S)."""

    def __init__(self, scalars: int, shape: tuple[int, ...]) -> None:
        n_x = 1 + scalars  # x = [anom_t, ds_1..ds_S]
        self.S = scalars
        self.G = torch.zeros(*shape, n_x, n_x, dtype=torch.float64)
        self.r = torch.zeros(*shape, n_x, dtype=torch.float64)
        self.n = 0

    def add(self, a0: torch.Tensor, a1: torch.Tensor, ds: torch.Tensor) -> None:
        G, r = self.G, self.r
        dsa = ds.to(a0.dtype)  # float32 anomalies (a streamed span) are summed in float32, then added up in float64
        G[..., 0, 0] += (a0 * a0).sum(0)
        r[..., 0] += (a0 * a1).sum(0)
        for i in range(self.S):
            cross = torch.einsum("n,nvhw->vhw", dsa[:, i], a0)
            G[..., 0, 1 + i] += cross
            G[..., 1 + i, 0] += cross
            r[..., 1 + i] += torch.einsum("n,nvhw->vhw", dsa[:, i], a1)
            for j in range(self.S):
                G[..., 1 + i, 1 + j] += float(ds[:, i] @ ds[:, j])
        self.n += len(a0)

    def solve(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a`` (V, H, W) clipped to [0, 1] (1 outside ``mask``) and ``b`` (S, V, H, W) (0 outside)."""
        G = self.G + 1e-8 * torch.eye(1 + self.S, dtype=torch.float64)
        coef = torch.linalg.solve(G, self.r[..., None])[..., 0]  # (V, H, W, 1 + S)
        ok = (mask > 0) & (G[..., 0, 0] > 1e-8)
        a = torch.where(ok, coef[..., 0].clamp(0.0, 1.0), torch.ones_like(coef[..., 0])).float()
        b = torch.where(ok[None], coef[..., 1:].permute(3, 0, 1, 2), torch.zeros(())).float()
        return a, b


@dataclass
class LinearInverseModel:
    """A forced linear inverse model of the monthly anomalies (Penland and Sardeshmukh 1995) in
    the leading EOFs of the training years, the skip path's large-scale dynamics:

    ``p[t+1] = p[t] A + (s[t+1] - s_ref) B`` with ``p = <anom, project>`` the EOF coefficients and
    ``anom ≈ p reconstruct + r``; the residual ``r`` outside the EOF space decays per cell by
    ``residual_damping``. Unlike a per-cell regression, A carries the non-local part (advection,
    diffusion, ocean-atmosphere-ice coupling), so the response to a changed forcing,
    ``(I - A)^-1 B ds`` at equilibrium, has the spatial pattern the data shows.
    """

    project: torch.Tensor  # (k, V, H, W) EOFs times the per-variable weights: p = sum(anom * project)
    reconstruct: torch.Tensor  # (k, V, H, W) EOFs over the weights: the anomaly of p
    operator: torch.Tensor  # (k, k) A
    forcing: torch.Tensor  # (S, k) B
    residual_damping: torch.Tensor  # (V, H, W) lag-1 coefficient of the residual, in [0, 1]
    ref: torch.Tensor  # (S,) reference forcing (mean over the fitted steps)
    val_error: float = float("nan")  # validation rollout error it was chosen by (weighted MSE)

    @property
    def modes(self) -> int:
        return int(self.operator.shape[0])

    def step(self, anom: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
        """Anomaly (B, V, H, W) at t -> t+1 given the forcing change ``ds`` (B, S) at t+1."""
        return lim_step(anom, ds, self.project, self.reconstruct, self.operator, self.forcing,
                        self.residual_damping)


def lim_step(anom: torch.Tensor, ds: torch.Tensor | None, project: torch.Tensor, reconstruct: torch.Tensor,
             operator: torch.Tensor, forcing: torch.Tensor, residual_damping: torch.Tensor) -> torch.Tensor:
    """One step of a :class:`LinearInverseModel` from its tensors (``ds`` None: unforced)."""
    p = torch.einsum("bvhw,kvhw->bk", anom, project)
    r = anom - torch.einsum("bk,kvhw->bvhw", p, reconstruct)
    p1 = p @ operator + (ds @ forcing if ds is not None else 0.0)
    return torch.einsum("bk,kvhw->bvhw", p1, reconstruct) + residual_damping * r


def _anomalies(tens: Tensors, clim: torch.Tensor) -> torch.Tensor:
    return ((tens.state - clim[tens.phase]) * tens.mask).double()


@dataclass
class _EOFBasis:
    """Scaled anomalies (T, D) of a dataset and the right singular vectors of its fitting steps:
    what every :func:`fit_lim` candidate shares (computed once by :func:`choose_lim`)."""

    X: torch.Tensor  # (T, D) anomalies times w
    Vt: torch.Tensor  # (r, D) EOFs, orthonormal rows
    w: torch.Tensor  # (D,) per-variable weights, 0 outside the mask
    mask: torch.Tensor  # (V, H, W) bool
    pairs: np.ndarray  # fitting steps whose next step is fitted too


def _eof_basis(tens: Tensors, index: np.ndarray, clim: torch.Tensor) -> _EOFBasis:
    idx = np.asarray(index)
    anom = _anomalies(tens, clim)
    mask = tens.mask.bool()
    sd = torch.stack([anom[idx][:, v][:, mask[v]].std() for v in range(anom.shape[1])]).clamp_min(1e-6)
    w = (mask.double() / sd[:, None, None]).reshape(-1)
    X = anom.reshape(anom.shape[0], -1) * w
    _, _, Vt = torch.linalg.svd(X[torch.from_numpy(idx)], full_matrices=False)
    return _EOFBasis(X=X, Vt=Vt, w=w, mask=mask, pairs=idx[np.isin(idx + 1, idx)])


def fit_lim(tens: Tensors, index: np.ndarray, clim: torch.Tensor, modes: int,
            basis: _EOFBasis | None = None) -> LinearInverseModel:
    """Fit a :class:`LinearInverseModel` with ``modes`` EOFs on consecutive steps of ``index``.

    Every state variable gets the same total weight (its anomalies are divided by their standard
    deviation over the training steps before the EOF analysis), so sea ice is not drowned by
    temperature. Least squares for A and B jointly. ``basis``: the EOF analysis of ``index``,
    when already made.
    """
    S = tens.scalars.shape[1]
    idx = np.asarray(index)
    n_pairs = int(np.isin(idx + 1, idx).sum())
    if n_pairs < modes + S + 2:
        raise DataError(f"too few consecutive training steps ({n_pairs}) for a {modes}-mode linear inverse model")
    b = basis if basis is not None else _eof_basis(tens, index, clim)
    X, w, mask = b.X, b.w, b.mask
    k = min(modes, b.Vt.shape[0])
    E = b.Vt[:k]  # (k, D), orthonormal rows
    P = X @ E.T  # (T, k)
    s = tens.scalars.double()
    p = torch.from_numpy(b.pairs)
    ref = s[p + 1].mean(0) if S else torch.zeros(0, dtype=torch.float64)
    Z = torch.cat([P[p], s[p + 1] - ref], dim=1)
    W = torch.linalg.lstsq(Z, P[p + 1]).solution  # (k + S, k)
    R = X - P @ E
    num, den = (R[p] * R[p + 1]).sum(0), (R[p] * R[p]).sum(0)
    rd = torch.where(den > 1e-12, num / den.clamp_min(1e-12), torch.ones_like(den)).clamp(0.0, 1.0)
    grid = tuple(mask.shape)
    inv_w = torch.where(w > 0, 1.0 / w.clamp_min(1e-12), torch.zeros_like(w))
    return LinearInverseModel(project=(E * w).reshape(k, *grid).float(),
                              reconstruct=(E * inv_w).reshape(k, *grid).float(),
                              operator=W[:k].float(), forcing=W[k:].float(),
                              residual_damping=torch.where(mask, rd.reshape(grid), torch.ones(())).float(),
                              ref=ref.float())


def lim_rollout_error(lim: LinearInverseModel, tens: Tensors, index: np.ndarray, clim: torch.Tensor,
                      leads: int = 12) -> float:
    """Mean squared error of ``leads``-step rollouts of ``lim`` from every start in ``index`` whose
    next ``leads`` steps are in ``index`` too (anomalies over the valid cells, each variable
    divided by its anomaly variance over ``index``); inf when no start fits."""
    return rollout_error(lambda x, s: lim.step(x, s - lim.ref), tens, index, clim, leads)


def rollout_error(step: Any, tens: Tensors, index: np.ndarray, clim: torch.Tensor, leads: int = 12) -> float:
    """:func:`lim_rollout_error` of any anomaly step ``step(anom (B, V, H, W), scalars (B, S))``."""
    idx = np.asarray(index)
    ok = set(idx.tolist())
    starts = [t for t in idx if all(t + k in ok for k in range(1, leads + 1))]
    if not starts:
        return float("inf")
    anom = _anomalies(tens, clim).float()
    st = torch.tensor(starts)
    x = anom[st]
    s = tens.scalars
    for k in range(1, leads + 1):
        x = step(x, s[st + k])
    err = (x - anom[st + leads]) ** 2
    mask = tens.mask.bool()
    per_var = [err[:, v][:, mask[v]].mean() / anom[torch.from_numpy(idx)][:, v][:, mask[v]].var().clamp_min(1e-12)
               for v in range(err.shape[1])]
    return float(torch.stack(per_var).mean())


def validation_leads(val: np.ndarray, leads: int = 12) -> int:
    """``leads``, or fewer when the validation steps hold no consecutive run that long."""
    v = np.sort(np.asarray(val))
    runs = np.split(v, np.flatnonzero(np.diff(v) != 1) + 1) if v.size else []
    return max(1, min(leads, max((r.size for r in runs), default=2) - 1))


def per_cell_rollout_error(tens: Tensors, train: np.ndarray, val: np.ndarray, clim: torch.Tensor,
                           leads: int = 12) -> float:
    """:func:`rollout_error` on ``val`` of the per-cell forced regression fitted on ``train``."""
    a, b, ref = anomaly_regression(tens, train, clim)

    def step(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return a * x + torch.einsum("bs,svhw->bvhw", s - ref, b)

    return rollout_error(step, tens, val, clim, validation_leads(val, leads))


def choose_lim(tens: Tensors, train: np.ndarray, val: np.ndarray, clim: torch.Tensor,
               candidates: Sequence[int] = (5, 10, 20, 40, 80), leads: int = 12) -> LinearInverseModel:
    """The :func:`fit_lim` (on ``train``) whose ``leads``-month rollouts err least on ``val``
    (fewer leads when the validation years hold no run that long). Skipped: candidates with
    fewer than 4 training pairs per coefficient of a row of the operator, and unstable ones
    (spectral radius >= 1)."""
    leads = validation_leads(val, leads)
    idx = np.asarray(train)
    n_pairs = int(np.isin(idx + 1, idx).sum())
    best: LinearInverseModel | None = None
    basis: _EOFBasis | None = None
    for k in candidates:
        if n_pairs < 4 * (k + tens.scalars.shape[1]):
            continue
        try:
            basis = basis or _eof_basis(tens, train, clim)
            lim = fit_lim(tens, train, clim, k, basis)
        except DataError:
            continue
        if float(torch.linalg.eigvals(lim.operator.double()).abs().max()) >= 1.0:
            continue
        lim.val_error = lim_rollout_error(lim, tens, val, clim, leads)
        LOGGER.info("linear inverse model with %d modes: %d-month validation error %.4f", lim.modes, leads,
                    lim.val_error)
        if best is None or lim.val_error < best.val_error:
            best = lim
    if best is None:
        raise DataError("no stable linear inverse model fits the training years")
    return best


@dataclass(frozen=True)
class Split:
    """Time indices of the train, validation and test years."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_years: tuple[int, ...]
    val_years: tuple[int, ...]
    test_years: tuple[int, ...]


def split_years(data: ClimateData, *, test_fraction: float = 0.2, val_fraction: float = 0.1) -> Split:
    """Held-out years at the end: test = last ``test_fraction``, val before it, train the rest."""
    years = np.unique(data.years)
    n = years.size
    if n < 3:
        raise DataError(f"{data.source}: {n} year(s) of data; at least 3 are needed for train/val/test")
    n_test = max(1, int(round(n * test_fraction)))
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_test - n_val < 1:
        n_val, n_test = 1, 1
    tr, va, te = years[: n - n_test - n_val], years[n - n_test - n_val : n - n_test], years[n - n_test :]

    def idx(ys: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isin(data.years, ys))

    return Split(idx(tr), idx(va), idx(te), tuple(map(int, tr)), tuple(map(int, va)), tuple(map(int, te)))


def label_subset(data: ClimateData, split: Split, fraction: float, seed: int) -> np.ndarray:
    """Time indices of a seeded ``fraction`` of the training years (at least one year), picked by
    :class:`~hfmi_kit.train.budget.LabelBudget`: nested, so a smaller fraction's years are among
    a larger one's for the same seed."""
    from hfmi_kit.train.budget import LabelBudget

    chosen = LabelBudget.from_options(label_fraction=fraction, pool="training years").pick(split.train_years, seed)
    return np.flatnonzero(np.isin(data.years, np.asarray(chosen)))


def window_times(indices: np.ndarray, context: int, horizon: int) -> list[int]:
    """The times ``t`` whose context (t-C+1..t) and horizon (t+1..t+K) lie in ``indices``.

    Raises:
        DataError: none does."""
    idx = set(int(i) for i in indices)
    times = [t for t in sorted(idx) if all((t - c) in idx for c in range(context))
             and all((t + k) in idx for k in range(1, horizon + 1))]
    if not times:
        raise DataError(f"no sample fits context={context} and horizon={horizon} in the {len(idx)} selected "
                        "time steps")
    return times


class ForecastWindows(Dataset):
    """Samples at times ``t`` whose context (t-C+1..t) and horizon (t+1..t+K) lie in ``indices``."""

    def __init__(self, tensors: Tensors, indices: np.ndarray, *, context: int = 2, horizon: int = 1) -> None:
        self.t = tensors
        self.context, self.horizon = context, horizon
        self.times = window_times(indices, context, horizon)

    def __len__(self) -> int:
        return len(self.times)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = self.times[i]
        C, K = self.context, self.horizon
        return {
            "inputs": self.t.state[t - C + 1 : t + 1],  # (C, V, H, W)
            "forcing": self.t.forcing[t + 1 : t + K + 1],  # (K, F, H, W)
            "scalars": self.t.scalars[t + 1 : t + K + 1],  # (K, S)
            "target": self.t.state[t + 1 : t + K + 1],  # (K, V, H, W)
            "mask": self.t.mask,  # (V, H, W)
            "phase": self.t.phase[t + 1],  # () climatological bin of t+1
            "meta": torch.tensor([t]),
        }
