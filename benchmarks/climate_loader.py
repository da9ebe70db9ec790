"""Climate loader benchmark: samples/s from Zarr against the raw xarray read of the same arrays.

Writes a CF dataset of random fields (the loader's speed does not depend on the physics) twice:
chunked one time step per chunk (matched to sampling by time) and 64 steps per chunk (a
common default), then reads random training windows (context 2 + target 1) with

- ``xarray``: ``ds[vars].isel(time=slice(t - 1, t + 2)).to_array().values`` per sample;
- ``hfmi``: :class:`hfmi_kit.data.zarr_source.ZarrWindowSource` (direct chunk reads);
- ``hfmi+local``: the same after copying the store to node-local disk on first read.

    python benchmarks/climate_loader.py [--steps 600 --nlat 96 --nlon 192 --samples 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from hfmi_kit.data.cf import write_cf
from hfmi_kit.data.zarr_source import ZarrWindowSource

VARS = ["tas", "tos", "siconc", "rsdt"]


def make(n: int, nlat: int, nlon: int) -> xr.Dataset:
    rng = np.random.default_rng(0)
    time = np.arange(n).astype("datetime64[D]").astype("datetime64[ns]")
    return xr.Dataset(
        {v: (("time", "lat", "lon"), rng.standard_normal((n, nlat, nlon), dtype=np.float32),
             {"units": "1", "standard_name": "air_temperature" if v == "tas" else v}) for v in VARS},
        coords={"time": time, "lat": ("lat", np.linspace(-89, 89, nlat), {"units": "degrees_north"}),
                "lon": ("lon", np.linspace(0, 359, nlon), {"units": "degrees_east"})},
    )


def bench(fn, idx: np.ndarray) -> float:
    fn(int(idx[0]))  # warm-up (opens, first chunk)
    t = time.perf_counter()
    for i in idx:
        fn(int(i))
    return len(idx) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--nlat", type=int, default=96)
    ap.add_argument("--nlon", type=int, default=192)
    ap.add_argument("--samples", type=int, default=200)
    a = ap.parse_args()
    ds = make(a.steps, a.nlat, a.nlon)
    mb = ds.nbytes / 2**20
    idx = np.random.default_rng(1).integers(1, a.steps - 1, a.samples)
    sample_mb = 3 * len(VARS) * a.nlat * a.nlon * 4 / 2**20
    print(f"dataset: {a.steps} steps x {len(VARS)} vars x {a.nlat}x{a.nlon} = {mb:.0f} MiB; "
          f"sample = 3 steps ({sample_mb:.2f} MiB); {a.samples} random samples")
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in (1, 64):
            p = write_cf(ds, Path(tmp) / f"c{chunk}.zarr", time_chunk=chunk)
            x = xr.open_zarr(p)
            xs = bench(lambda t, x=x: x[VARS].isel(time=slice(t - 1, t + 2)).to_array().values, idx)
            src = ZarrWindowSource(p, VARS)
            hs = bench(lambda t, s=src: s.read(t - 1, t + 2), idx)
            local = ZarrWindowSource(p, VARS, cache_dir=Path(tmp) / f"local{chunk}")
            ls = bench(lambda t, s=local: s.read(t - 1, t + 2), idx)
            print(f"time chunk {chunk:3d}: xarray {xs:7.1f} samples/s | hfmi {hs:7.1f} samples/s "
                  f"({hs / xs:4.1f}x) | hfmi+local copy {ls:7.1f} samples/s ({ls / xs:4.1f}x) "
                  f"| {hs * sample_mb:6.0f} MiB/s")


if __name__ == "__main__":
    main()
