"""Streaming climate pretraining from a prepared Zarr store: loader rate against raw chunk reads,
and the peak memory of a streamed pretraining.

Writes ``--years`` per-year NetCDF files of the ``climate_prepare`` layout (``--vars`` upper-air
variables on ``--levels`` pressure levels plus four surface fields, monthly, ``--grid`` degrees),
joins them with ``hfmi data prepare climate`` (``--time-chunk`` steps per chunk), then, on the
training years of the store, with the page cache warm (one read of every chunk first):

- the raw rate: every chunk of every variable read straight from Zarr (in the loader's spans),
  steps per second;
- the loader rate: one pass of :class:`~hfmi_kit.domains.climate.stream.StoreWindows` in the
  trainer's chunk-aware order (every sample built), store steps covered per second;
- ``hfmi pretrain climate --stream true`` of each ``--configs`` size in a child process: wall
  time and peak resident memory.

    .venv/bin/python benchmarks/climate_stream.py --years 20 --grid 1 --out runs/stream_bench
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from climate_prepare import write_year


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--years", type=int, default=20)
    ap.add_argument("--grid", type=float, default=1.0, help="grid spacing in degrees")
    ap.add_argument("--levels", type=int, default=13)
    ap.add_argument("--vars", type=int, default=5, help="upper-air variables")
    ap.add_argument("--time-chunk", type=int, default=1)
    ap.add_argument("--noise", type=float, default=0.1,
                    help="cell-scale noise in the generated fields (so that they compress as real fields do)")
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--steps", type=int, default=4, help="pretraining steps of each size")
    ap.add_argument("--layout", default="windowed")
    ap.add_argument("--activation-checkpointing", action="store_true", help="pretrain with it")
    ap.add_argument("--out", default="runs/stream_bench")
    ap.add_argument("--keep", action="store_true", help="reuse the store of an earlier run in --out")
    a = ap.parse_args()
    import numpy as np
    import zarr

    from hfmi_kit.domains.climate import data as cdata
    from hfmi_kit.domains.climate.stream import StoreReader, StoreWindows, field_statistics, read_block, store_block
    from hfmi_kit.train.loop import ResumableSampler

    root = Path(a.out)
    store = root / "store.zarr"
    hfmi = [sys.executable, "-m", "hfmi_kit.cli"]
    if not (a.keep and store.exists()):
        shutil.rmtree(root, ignore_errors=True)
        (root / "sources").mkdir(parents=True)
        t = time.time()
        total = sum(write_year(root / "sources" / f"y{2000 + y}.nc", 2000 + y, grid=a.grid, levels=a.levels,
                               nvars=a.vars, seed=0, noise=a.noise) for y in range(a.years))
        print(f"sources: {a.years} files, {total / 2**30:.2f} GiB, written in {time.time() - t:.0f} s", flush=True)
        t = time.time()
        subprocess.run([*hfmi, "data", "prepare", "climate", str(root / "sources"), "--out", str(store),
                        "--time-chunk", str(a.time_chunk)], check=True, stdout=subprocess.DEVNULL)
        print(f"prepare: {time.time() - t:.0f} s", flush=True)
        shutil.rmtree(root / "sources")
    disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    d = cdata.load_climate(store, lazy=True)
    split = cdata.split_years(d)
    norm = cdata.Normaliser(field_statistics(d, split.train))
    reader = StoreReader(d, norm)
    chunk = store_block(store)
    V, (H, W) = len(d.state) + len(d.forcing), reader.shape
    print(f"store: {disk / 2**30:.2f} GiB on disk, {d.time.size} steps of {V} fields on {H} x {W}, "
          f"{V * H * W * 4 * d.time.size / 2**30:.2f} GiB of float32 values; chunks of {chunk} step(s)", flush=True)
    group = zarr.open_group(str(store), mode="r")
    arrays = [group[v] for v in reader.plan]
    lo, hi = int(split.train.min()), int(split.train.max()) + 1

    span = read_block(chunk)

    def raw() -> float:  # the training steps, read in the loader's spans, straight from Zarr
        t = time.time()
        for t0 in range(lo, hi, span):
            for arr in arrays:
                np.asarray(arr[t0 : min(t0 + span, hi)], dtype=np.float32)
        return (hi - lo) / (time.time() - t)

    raw()  # warm the page cache: both rates below read from memory, not the disk
    raw_rate = raw()
    ds = StoreWindows(d, reader, norm, split.train, context=2, block=span)
    t = time.time()
    for i in ResumableSampler(len(ds), seed=0, groups=ds.sample_groups):
        ds[i]
    wall = time.time() - t
    covered = max(ds.times) + 2 - min(ds.times) + 1
    loader_rate = covered / wall
    print(f"raw chunk reads ({span} steps at a time): {raw_rate:.1f} steps/s "
          f"({raw_rate * V * H * W * 4 / 2**20:.0f} MiB/s of float32)")
    print(f"loader (StoreWindows, chunk-aware order, {len(ds)} samples, spans of {ds.spans.block} steps): "
          f"{loader_rate:.1f} steps/s, {loader_rate / raw_rate:.0%} of the raw rate; "
          f"{ds.spans.steps_read / covered:.2f} reads per step", flush=True)
    for cfg in [c for c in a.configs.split(",") if c]:  # --configs "": the loader only
        t = time.time()
        # GNU time prints the child's own peak resident set (KiB) on its last line
        r = subprocess.run(["/usr/bin/time", "-f", "%M", *hfmi, "pretrain", "climate", "--data", str(store),
                            "--out", str(root / f"pre_{cfg}"), "--config", cfg, "--steps", str(a.steps),
                            "--batch-size", "1", "--stream", "true", "--layout", a.layout, "--lim-modes", "0",
                            *(["--activation-checkpointing", "true"] if a.activation_checkpointing else [])],
                           capture_output=True, text=True)
        lines = r.stderr.strip().splitlines()
        peak = int(lines[-1]) / 2**20 if lines and lines[-1].isdigit() else float("nan")
        status = "ok" if r.returncode == 0 else f"failed: {lines[-2] if len(lines) > 1 else r.returncode}"
        ac = ", activation checkpointing" if a.activation_checkpointing else ""
        print(f"pretrain {cfg} ({a.layout}{ac}, batch 1, {a.steps} steps, streamed): {time.time() - t:.0f} s, "
              f"peak memory {peak:.2f} GiB; {status}", flush=True)

if __name__ == "__main__":
    main()
