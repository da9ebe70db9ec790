"""Climate ``hfmi data prepare`` at scale: time and peak memory of joining per-year files.

Writes ``--years`` NetCDF files, one per year, of ``--vars`` upper-air variables on ``--levels``
pressure levels (in Pa, as CMIP6 writes them) plus four surface fields on a regular grid of
``--grid`` degrees (monthly steps; smooth random fields, fast to make), then runs
``hfmi data prepare climate`` on them in a child process (which prints ``hfmi data inspect`` of
the store) and prints its wall time, peak resident memory and throughput against the bytes of the
sources.

    .venv/bin/python benchmarks/climate_prepare.py --years 10 --grid 1 --out runs/prepare_bench
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_year(path: Path, year: int, *, grid: float, levels: int, nvars: int, seed: int, noise: float = 0.0) -> int:
    """One year of monthly fields; ``noise`` adds cell-scale white noise of that amplitude (the
    smooth fields alone compress about 8 times, real reanalysis fields far less)."""
    import xarray as xr

    rng = np.random.default_rng(seed + year)
    lat = -90 + grid * (np.arange(int(180 / grid)) + 0.5)
    lon = grid * np.arange(int(360 / grid))
    plev = np.linspace(100000.0, 5000.0, levels)
    t = np.array([f"{year}-{m:02d}-01" for m in range(1, 13)], dtype="datetime64[ns]")
    base = np.cos(np.deg2rad(lat))[:, None] * np.ones(lon.size)[None]

    def field(shape: tuple[int, ...]) -> np.ndarray:
        coarse = rng.normal(size=(*shape[:-2], 8, 16)).astype(np.float32)
        out = np.repeat(np.repeat(coarse, -(-lat.size // 8), -2)[..., : lat.size, :], -(-lon.size // 16),
                        -1)[..., : lon.size] + base.astype(np.float32)
        if noise:
            out += noise * rng.standard_normal(out.shape, dtype=np.float32)
        return out

    data = {f"v{i}": (("time", "plev", "lat", "lon"), 250 + 10 * field((12, levels, lat.size, lon.size)),
                      {"standard_name": "air_temperature" if i == 0 else f"quantity_{i}", "units": "K"})
            for i in range(nvars)}
    for i, sn in enumerate(("air_temperature", "sea_surface_temperature", "surface_quantity_a", "surface_quantity_b")):
        data[f"s{i}"] = (("time", "lat", "lon"), 280 + 5 * field((12, lat.size, lon.size)),
                         {"standard_name": sn, "units": "degC" if i == 2 else "K"})
    ds = xr.Dataset(data, coords={
        "time": ("time", t, {"standard_name": "time", "axis": "T"}),
        "plev": ("plev", plev, {"standard_name": "air_pressure", "units": "Pa", "positive": "down", "axis": "Z"}),
        "lat": ("lat", lat, {"standard_name": "latitude", "units": "degrees_north"}),
        "lon": ("lon", lon, {"standard_name": "longitude", "units": "degrees_east"})})
    ds.to_netcdf(path)
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--years", type=int, default=10)
    ap.add_argument("--grid", type=float, default=1.0, help="grid spacing in degrees")
    ap.add_argument("--levels", type=int, default=13)
    ap.add_argument("--vars", type=int, default=5, help="upper-air variables")
    ap.add_argument("--out", default="runs/prepare_bench")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    root = Path(a.out)
    src = root / "sources"
    shutil.rmtree(root, ignore_errors=True)
    src.mkdir(parents=True)
    t = time.time()
    total = sum(write_year(src / f"y{2000 + y}.nc", 2000 + y, grid=a.grid, levels=a.levels, nvars=a.vars, seed=a.seed)
                for y in range(a.years))
    print(f"sources: {a.years} files, {total / 2**30:.2f} GiB, written in {time.time() - t:.0f} s", flush=True)
    hfmi = [sys.executable, "-m", "hfmi_kit.cli"]
    t = time.time()
    subprocess.run([*hfmi, "data", "prepare", "climate", str(src), "--out", str(root / "store.zarr")], check=True)
    wall = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    print(f"prepare: {wall:.0f} s, {total / 2**20 / wall:.0f} MiB/s of sources, peak memory {peak:.2f} GiB "
          f"({peak * 2**30 / total:.1%} of the sources)")


if __name__ == "__main__":
    main()
