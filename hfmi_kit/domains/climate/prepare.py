"""``hfmi data prepare climate``: many CF files, as users download them, into one training store.

In the manner of anemoi-datasets' ``create``: the sources (NetCDF files or Zarr stores, one per
year, per variable or both; folders of them) are checked one by one, with the file named in
every error, joined along time (per group of variables) and across variables, put on one grid
(the first source's, or a regular grid of ``grid`` degrees), converted to canonical units
(``degC`` -> ``K``, pressure levels in hPa), cut to the variables and levels asked for, and
written as one CF Zarr store chunked for training (``time_chunk`` steps per chunk, whole
fields), with per-field statistics of one streaming pass and the provenance of every source
(name, size, SHA-256) in its attributes. Nothing is loaded whole: dask reads the sources in
pieces of about 64 MB and writes chunk by chunk.

``inspect_store`` reads a store back: variables with their levels, grid, time span, step and
calendar, chunking, statistics, size on disk and sources.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import xarray as xr

from hfmi_kit import options as opt
from hfmi_kit.data.cf import (
    check_time,
    find_axis,
    grid_dims,
    is_zarr,
    open_cf,
    regrid_bilinear,
    vertical_axis,
    write_cf,
)
from hfmi_kit.domains.climate import data as cdata
from hfmi_kit.domains.climate.timeaxis import detect_step
from hfmi_kit.errors import DataError
from hfmi_kit.train.env import code_version

LOGGER = logging.getLogger(__name__)
READ_BYTES = 64 * 2**20  # dask reads a source in pieces of about this size
STORE_MARK = "hfmi_store"  # attribute naming what wrote the store (and for which domain)
_SUFFIXES = (".nc", ".nc4", ".netcdf", ".zarr")


def _sources(paths: Sequence[str | Path]) -> list[Path]:
    """Files and stores named, folders expanded to the NetCDF files and Zarr stores inside them."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not is_zarr(p):
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in _SUFFIXES and not q.name.startswith("."))
            if not found:
                raise DataError(f"{p}: a folder without NetCDF files or Zarr stores ({', '.join(_SUFFIXES)})")
            root = p.resolve()
            for q in found:  # a folder handed over is read inside itself only
                if root not in q.resolve().parents:
                    raise DataError(f"{q}: a link to {q.resolve()}, outside the folder {p}; name it explicitly")
            out += found
        else:
            out.append(p)
    if not out:
        raise DataError("no sources given")
    return out


def _open(path: Path) -> tuple[xr.Dataset, str]:
    """One source, checked (a readable CF file with decoded, increasing times), opened lazily in
    pieces of about :data:`READ_BYTES` along time; returns it and its time axis' name."""
    cdata._check_file(path)
    src = str(path)
    ds = open_cf(path)  # lazy backend arrays: nothing read yet
    t = find_axis(ds, "time")
    if t is None:
        raise DataError(f"{src}: no time axis (a coordinate with standard_name='time' or axis='T')")
    cdata._check_time_values(ds, t, src)
    if ds.sizes[t] > 1:
        check_time(ds, t, source=src)
    sizes = [da.dtype.itemsize * int(np.prod([ds.sizes[d] for d in da.dims if d != t]))
             for da in ds.data_vars.values() if t in da.dims]
    return ds.chunk({t: max(1, READ_BYTES // max(sizes or [1]))}), t


def _follows(fa: Path, a: xr.Dataset, fb: Path, b: xr.Dataset) -> None:
    """Source ``fb`` must start one step after ``fa`` ends (same variables, consecutive times)
    and hold the same grid and levels.

    Raises:
        DataError: naming ``fb``: another grid, times that overlap ``fa``'s, or a gap between them.
    """
    for c in a.coords:  # the same grid and levels in every file of a variable group
        if c != "time" and a[c].ndim == 1 and c in b.coords and (
                a[c].size != b[c].size or not np.array_equal(a[c].values, b[c].values)):
            raise DataError(f"{fb}: its coordinate {c!r} differs from {fa}'s ({b[c].size} values "
                            f"{b[c].values[0]} .. {b[c].values[-1]}, not {a[c].size} values "
                            f"{a[c].values[0]} .. {a[c].values[-1]}); files of the same variables need one grid")
    (ta, cal), (tb, _) = cdata._times(a["time"]), cdata._times(b["time"])
    if tb[0] <= ta[-1]:
        raise DataError(f"{fb}: its times start at {tb[0]}, before {fa} ends ({ta[-1]}); sources of the same "
                        "variables must not overlap")
    if ta.size >= 2:
        within = detect_step(ta, calendar=cal, source=str(fa))
        try:
            across = detect_step(np.array([ta[-1], tb[0]]), calendar=cal, source=str(fb))
        except DataError:
            across = None
        if across != within:
            raise DataError(f"{fb}: its first time {tb[0]} is not one step of {within.label} after the last of {fa} "
                            f"({ta[-1]}); a file is missing between them")


def _sha256(path: Path) -> str:
    """The SHA-256 of a file as ``sha256sum`` prints it (read in 1 MiB blocks); of a Zarr store,
    :func:`~hfmi_kit.domains.climate.data.sha256` over its files."""
    if path.is_dir():
        return cdata.sha256(path)
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _target_grid(grid: float | None, first: xr.Dataset, v: str) -> tuple[np.ndarray, np.ndarray]:
    if grid is None:
        la, lo = grid_dims(first[v], first)  # type: ignore[misc]
        return np.asarray(first[la].values, np.float64), np.asarray(first[lo].values, np.float64)
    if not 0 < grid <= 90 or abs(180 / grid - round(180 / grid)) > 1e-9:
        raise DataError(f"--grid {grid}: a regular grid needs a spacing in degrees that divides 180")
    n = int(round(180 / grid))
    return -90 + grid * (np.arange(n) + 0.5), grid * np.arange(2 * n)


def prepare(*, sources: Annotated[Sequence[str | Path], opt.Opt("NetCDF files, Zarr stores or folders of them")],
            out: opt.Out,
            variables: opt.Variables = None,
            levels: Annotated[Sequence[float] | None, opt.Opt("vertical levels to keep (hPa for pressure, m for "
                                                               "depth and height; None: every level)")] = None,
            grid: Annotated[float | None, opt.Opt("a regular lat-lon grid of this spacing in degrees (cell "
                                                  "centres; None: the first source's grid)", above=0)] = None,
            time_chunk: Annotated[int, opt.Opt("time steps per chunk of the store", low=1)] = 1) -> Path:
    """Join ``sources`` into one CF Zarr store at ``out`` (see the module docstring); returns it.

    Raises:
        DataError: naming the file: not NetCDF/Zarr, no time axis, times that overlap another
            source's or leave a gap, a variable missing, units that do not convert.
    """
    out = Path(out)
    if out.suffix != ".zarr":
        raise DataError(f"{out}: the store's name must end in .zarr")
    files = _sources(sources)
    opened = [(f, *_open(f)) for f in files]
    # group the sources by the set of time-dependent variables they hold; each group is joined along time
    groups: dict[tuple[str, ...], list[tuple[Path, xr.Dataset, str]]] = {}
    static: dict[str, xr.DataArray] = {}
    for f, ds, t in opened:
        timed = tuple(sorted(str(v) for v, da in ds.data_vars.items() if t in da.dims))
        for v, da in ds.data_vars.items():
            if t not in da.dims and v not in static and grid_dims(da, ds) is not None:
                static[str(v)] = da
        if timed:
            groups.setdefault(timed, []).append((f, ds.rename({t: "time"}) if t != "time" else ds, "time"))
    if not groups:
        raise DataError(f"{files[0]}: no source has a variable with a time axis")
    joined: list[xr.Dataset] = []
    for members in groups.values():
        members.sort(key=lambda m: m[1]["time"].values[0])
        for (fa, a, _), (fb, b, _) in zip(members, members[1:]):
            _follows(fa, a, fb, b)
        joined.append(xr.concat([m[1] for m in members], dim="time", data_vars="minimal", coords="minimal",
                                compat="override", join="override") if len(members) > 1 else members[0][1])
    times = joined[0]["time"].values
    for g, members in zip(joined[1:], list(groups.values())[1:]):
        if g.sizes["time"] != times.size or not (g["time"].values == times).all():
            raise DataError(f"{members[0][0]}: its times ({g['time'].values[0]} .. {g['time'].values[-1]}, "
                            f"{g.sizes['time']} steps) differ from {files[0]}'s group ({times[0]} .. {times[-1]}, "
                            f"{times.size} steps); every variable needs the same times")
    time_vals, calendar = cdata._times(joined[0]["time"])
    step = detect_step(time_vals, calendar=calendar, source=f"{files[0]} .. {files[-1]}")
    names = {str(v): g for g in joined for v in g.data_vars if "time" in g[v].dims}
    if variables:
        missing = [v for v in variables if v not in names]
        if missing:
            raise DataError(f"variable(s) {missing} are in none of the sources ({', '.join(map(str, files))}); "
                            f"they hold {sorted(names)}")
    keep = [v for v in names if not variables or v in variables or
            names[v][v].attrs.get("standard_name") in cdata.FIELD_FORCINGS | cdata.SCALAR_FORCINGS]
    first_gridded = next((v for v in keep if grid_dims(names[v][v], names[v]) is not None), None)
    if first_gridded is None:
        raise DataError(f"{files[0]}: no variable with a time axis is on a lat-lon grid")
    lat, lon = _target_grid(grid, names[first_gridded], first_gridded)
    out_vars: dict[str, xr.DataArray] = {}
    wanted = None if levels is None else np.asarray(levels, np.float64)
    for v in keep:
        g = names[v]
        da = g[v]
        src = next(str(m[0]) for m in groups[tuple(sorted(str(x) for x in g.data_vars if "time" in g[x].dims))])
        if not np.issubdtype(da.dtype, np.number):
            raise DataError(f"{src}: variable {v!r} holds {da.dtype} values, not numbers")
        dims = grid_dims(da, g)
        if dims is None:
            if da.dims == ("time",):
                out_vars[v] = da
            continue
        vert = vertical_axis(da, g, source=src)
        if vert is not None:
            keep = vert.keep(levels)
            da = da.isel({vert.dim: keep}).assign_coords(
                {vert.dim: xr.DataArray(vert.values[keep], dims=vert.dim, attrs=vert.cf_attrs())})
        da, _ = cdata._convert_units(da, v, src)
        if not (da[dims[0]].size == lat.size and da[dims[1]].size == lon.size and
                np.allclose(da[dims[0]].values, lat) and np.allclose(da[dims[1]].values, lon)):
            LOGGER.info("%s: regridding %s bilinearly onto the %dx%d grid", src, v, lat.size, lon.size)
            da = regrid_bilinear(da, dims[0], dims[1], lat, lon)
        else:
            da = da.rename({dims[0]: "lat", dims[1]: "lon"}) if dims != ("lat", "lon") else da
        out_vars[v] = da.transpose("time", *[d for d in da.dims if d not in ("time", "lat", "lon")], "lat", "lon")
    for v, da in static.items():
        dims = grid_dims(da, next(ds for _, ds, _ in opened if v in ds))
        if da.attrs.get("standard_name") == "land_area_fraction" and dims is not None:
            on = da[dims[0]].size == lat.size and da[dims[1]].size == lon.size
            out_vars[v] = (da.rename({dims[0]: "lat", dims[1]: "lon"}) if on and dims != ("lat", "lon")
                           else da if on else regrid_bilinear(da, dims[0], dims[1], lat, lon))
    if wanted is not None:
        have = {float(x) for da in out_vars.values() for d in da.dims if str(da[d].attrs.get("axis", "")) == "Z"
                for x in da[d].values}
        missing = [f"{x:g}" for x in wanted if not any(np.isclose(x, h) for h in have)]
        if missing:
            raise DataError(f"no variable of the sources has the level(s) {', '.join(missing)}")
    ds = xr.Dataset(out_vars)
    ds = ds.assign_coords(
        time=("time", joined[0]["time"].values, {"standard_name": "time", "axis": "T"}),
        lat=("lat", lat, {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"}),
        lon=("lon", lon, {"standard_name": "longitude", "units": "degrees_east", "axis": "X"}))
    ds["time"].encoding.update({"units": "days since 1970-01-01", "calendar": calendar})
    stats = _statistics(ds)
    ds.attrs = {
        "Conventions": "CF-1.8", "title": "hfmi_kit climate training store",
        "source": ", ".join(sorted({str(opened[0][1].attrs.get("source", "")).strip()} - {""})) or "see hfmi_sources",
        "history": f"{np.datetime64('now')}: hfmi data prepare climate ({code_version()}) from {len(files)} source(s)",
        STORE_MARK: json.dumps({"domain": "climate", "time_step": step.label, "calendar": calendar,
                                "time_chunk": time_chunk}),
        "hfmi_statistics": json.dumps(stats),
        "hfmi_sources": json.dumps([{"path": f.name, "bytes": _size(f), "sha256": _sha256(f)} for f in files]),
    }
    return write_cf(ds, out, time_chunk=time_chunk)


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _statistics(ds: xr.Dataset) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of every field (a variable, or one level of one: ``ta_500``)
    over every time step, in one dask pass over the sources."""
    import dask

    from hfmi_kit.data.cf import level_name

    arrays: dict[str, xr.DataArray] = {}
    for v, da in ds.data_vars.items():
        if "time" not in da.dims or da.dims == ("time",):
            continue
        z = next((d for d in da.dims if str(da[d].attrs.get("axis", "")) == "Z"), None)
        if z is None:
            arrays[str(v)] = da
        else:
            for x in da[z].values:
                arrays[level_name(str(v), float(x))] = da.sel({z: x})
    means, stds = dask.compute([a.mean(skipna=True) for a in arrays.values()],
                               [a.std(skipna=True) for a in arrays.values()])
    return {k: {"mean": float(m), "std": float(s)} for k, m, s in zip(arrays, means, stds)}


def inspect_store(store: str | Path) -> list[str]:
    """What a store written by :func:`prepare` holds, one line each.

    Raises:
        DataError: not a store ``hfmi data prepare`` wrote.
    """
    store = Path(store)
    cdata._check_file(store)
    ds = open_cf(store)
    mark = ds.attrs.get(STORE_MARK)
    if not mark:
        raise DataError(f"{store}: not a store written by `hfmi data prepare` (no {STORE_MARK} attribute)")
    info = json.loads(mark)
    stats = json.loads(ds.attrs.get("hfmi_statistics", "{}"))
    srcs = json.loads(ds.attrs.get("hfmi_sources", "[]"))
    lat, lon = ds["lat"].values, ds["lon"].values
    dlat = float(np.diff(lat).mean()) if lat.size > 1 else float("nan")
    dlon = float(np.diff(lon).mean()) if lon.size > 1 else float("nan")
    t = ds["time"].values
    lines = [f"{store} ({_size(store) / 2**20:.1f} MiB on disk): a {info['domain']} store",
             f"time: {t[0]} .. {t[-1]}, {t.size} steps of {info['time_step']} ({info['calendar']} calendar)",
             f"grid: {lat.size} x {lon.size} (lat {lat.min():g} .. {lat.max():g}, lon {lon.min():g} .. {lon.max():g}; "
             f"{abs(dlat):g} x {abs(dlon):g} degrees)", "variables:"]
    for v, da in ds.data_vars.items():
        z = next((d for d in da.dims if str(da[d].attrs.get("axis", "")) == "Z"), None)
        lev = f", {da[z].size} {z} levels {', '.join(f'{x:g}' for x in da[z].values)} {da[z].attrs.get('units', '')}" \
            if z else ""
        chunks = da.encoding.get("chunks") or (tuple(c[0] for c in da.chunks) if da.chunks else ())
        lines.append(f"  {v} {tuple(da.dims)} [{da.attrs.get('units', '')}]{lev}; chunks {tuple(chunks)}")
    lines.append("statistics over every step (a variable on levels: the range over its levels):")
    by_var: dict[str, list[dict[str, float]]] = {}
    for k, s in stats.items():
        by_var.setdefault(k if k in ds.data_vars else k.rsplit("_", 1)[0], []).append(s)
    for v, ss in by_var.items():
        m, sd = [x["mean"] for x in ss], [x["std"] for x in ss]
        lines.append(f"  {v}: mean {m[0]:.6g}, std {sd[0]:.6g}" if len(ss) == 1 else
                     f"  {v}: mean {min(m):.6g} .. {max(m):.6g}, std {min(sd):.6g} .. {max(sd):.6g} ({len(ss)} levels)")
    more = ", ..." if len(srcs) > 6 else ""
    lines.append(f"sources ({len(srcs)}): " + ", ".join(s["path"] for s in srcs[:6]) + more)
    ds.close()
    return lines
