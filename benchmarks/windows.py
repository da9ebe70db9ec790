"""Whole-field and whole-volume prediction by windows (``hfmi_kit.data.windows``): time and peak
memory against the grid size, with a cheap stand-in model so that the windowing itself is
measured (a real model adds its own per-window cost). 3-D runs twice: ``3d`` is the Gaussian
probability blend radiology uses (streamed one window-deep slab at a time), ``3d-argmax`` the
lean most-confident-window argmax beside it.

    .venv/bin/python benchmarks/windows.py                       # 2-D 64..640 px, 3-D 48..224 voxels a side
    .venv/bin/python benchmarks/windows.py --sides2d 1024,2048 --sides3d 256

Each size runs in a fresh process; peak memory is the resident-set high-water mark above the
process's baseline. Prints one row per size: cells, seconds, ns per cell, peak MiB, bytes per cell.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

WORKER = r"""
import json, resource, sys, time
import numpy as np, torch
from hfmi_kit.data.windows import argmax_windows, blend_argmax_windows, blend_windows, centre_weight
kind, side = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
base = rss()
t = time.perf_counter()
if kind == "2d":  # carbon-like: 4 source layers, tiles of 32 at half stride, 4 output channels
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(4, side, side)).astype(np.float32))
    out = blend_windows(lambda b: b[:, :4] * 2.0, lambda c: x[:, c[0]:c[0] + 32, c[1]:c[1] + 32], (side, side), 32,
                        channels=4, overlap=0.5, batch_size=16)
    cells = side * side
else:  # radiology-like: 1 channel volume, windows of 32 with overlap 0.5, 3 classes, centre-weighted
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, side, side, side)).astype(np.float32))
    fn = lambda b: torch.cat([b, -b, 0 * b], 1)
    way = blend_argmax_windows if kind == "3d" else argmax_windows  # the Gaussian blend, or the lean argmax
    lab, conf = way(fn, lambda c: x[:, c[0]:c[0] + 32, c[1]:c[1] + 32, c[2]:c[2] + 32],
                    (side,) * 3, 32, overlap=0.5, batch_size=4, weight=centre_weight(32, 3))
    cells = side ** 3
print(json.dumps({"kind": kind, "side": side, "cells": cells, "seconds": time.perf_counter() - t,
                  "peak": rss() - base}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides2d", default="64,200,640", help="2-D field sides (the tests use 64 px)")
    ap.add_argument("--sides3d", default="48,104,224", help="3-D volume sides (the tests use about 48)")
    a = ap.parse_args()
    runs = [("2d", int(s)) for s in a.sides2d.split(",") if s] + [
        (k, int(s)) for s in a.sides3d.split(",") if s for k in ("3d", "3d-argmax")]
    print(f"{'grid':>14} {'cells':>12} {'seconds':>9} {'ns/cell':>8} {'peak MiB':>9} {'B/cell':>7}")
    for kind, side in runs:
        r = json.loads(subprocess.run([sys.executable, "-c", WORKER, kind, str(side)], check=True,
                                      capture_output=True, text=True).stdout)
        print(f"{kind:>9} {side:>4} {r['cells']:>12} {r['seconds']:>9.2f} {1e9 * r['seconds'] / r['cells']:>8.0f} "
              f"{r['peak'] / 2**20:>9.1f} {r['peak'] / r['cells']:>7.1f}")


if __name__ == "__main__":
    main()
