"""Climate backbones against the grid: per-sample training memory and step time from 5 to 0.25 degrees.

For each resolution (global regular grids: 5 deg 36 x 72, 2.5 deg 72 x 144, 1 deg 180 x 360,
0.25 deg 721 x 1440 as ERA5), model size and layout, one pretraining step (masked
reconstruction + next step, batch 1) of ``--vars`` variables on ``--levels`` pressure levels
plus four surface fields (context 2, one field forcing, CO2) runs in a child process with its
address space capped at ``--limit-gb``; the child reports the step time (mean of two steps after
one warm-up) and its peak resident memory. ``groups`` is the layout of the checkpoints before
session 12 (a token per field and patch, global attention); ``windowed`` a token per patch and
shifted-window attention. A configuration over the cap prints ``over the cap``.

    .venv/bin/python benchmarks/climate_scale.py                       # tiny and small, both layouts
    .venv/bin/python benchmarks/climate_scale.py --sizes tiny --grids 0.25 --layouts windowed
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GRIDS = {"5": (36, 72), "2.5": (72, 144), "1": (180, 360), "0.25": (721, 1440)}


def child(size: str, grid: str, layout: str, nvars: int, levels: int, checkpointing: bool) -> dict:
    import torch

    import hfmi_kit.domains.climate.model  # noqa: F401 (registers the families)
    from hfmi_kit.models import create_model, get_size

    torch.set_num_threads(2)
    H, W = GRIDS[grid]
    names = [f"v{i}_{p}" for i in range(nvars) for p in range(levels)] + [f"s{i}" for i in range(4)]
    kw = dict(variables=names, field_forcings=["rsdt"], scalar_forcings=["co2"], grid=[H, W], patch=[4, 4],
              context=2, layout=layout, window=[8, 8], periodic=True)
    model = create_model(f"climate_pretrainer.{size}", **kw)
    if checkpointing:
        model.backbone.encoder.activation_checkpointing = True
    V = len(names)
    batch = {"inputs": torch.randn(1, 2, V, H, W), "forcing": torch.randn(1, 1, 1, H, W),
             "scalars": torch.randn(1, 1, 1), "target": torch.randn(1, 1, V, H, W), "mask": torch.ones(1, V, H, W),
             "phase": torch.zeros(1, dtype=torch.long)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(3):
        t = time.time()
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time() - t)
    tokens = (model.tokenizer.patch_grid[0] * model.tokenizer.patch_grid[1] if layout == "windowed"
              else model.tokenizer.num_patches * len(model.tokenizer.groups))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"step_s": sum(times[1:]) / 2, "tokens": tokens, "params_m": params, "dim": get_size(size).dim}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--grids", default="5,2.5,1,0.25")
    ap.add_argument("--layouts", default="groups,windowed")
    ap.add_argument("--vars", type=int, default=5)
    ap.add_argument("--levels", type=int, default=13)
    ap.add_argument("--limit-gb", type=float, default=16.0, help="address-space cap of each child")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the encoder")
    ap.add_argument("--max-group-tokens", type=int, default=30000,
                    help="skip the groups layout above this many tokens (global attention: a step at 5 degrees, "
                         "22,518 tokens, takes about a minute here; 2.5 degrees would take about 16)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        size, grid, layout = a.child.split(":")
        lim = int(a.limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        out = child(size, grid, layout, a.vars, a.levels, a.checkpointing)
        out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(out))
        return
    fields = a.vars * a.levels + 4
    print(f"{a.vars} variables x {a.levels} levels + 4 surface = {fields} fields, context 2, batch 1, "
          f"patch 4, window 8x8{', activation checkpointing' if a.checkpointing else ''}")
    print(f"{'size':6s} {'grid':>5s} {'cells':>9s} {'layout':9s} {'tokens':>8s} {'step s':>8s} {'peak GB':>8s} "
          f"{'kB/cell':>8s}")
    for size in a.sizes.split(","):
        for grid in a.grids.split(","):
            H, W = GRIDS[grid]
            for layout in a.layouts.split(","):
                groups = (2 * fields + 1) * -(-H // 4) * (W // 4)
                if layout == "groups" and groups > a.max_group_tokens:
                    print(f"{size:6s} {grid:>5s} {H * W:9d} {layout:9s} {groups:8d} skipped: global attention over "
                          f"{groups:,} tokens (--max-group-tokens {a.max_group_tokens})")
                    continue
                cmd = [sys.executable, __file__, "--child", f"{size}:{grid}:{layout}", "--vars", str(a.vars),
                       "--levels", str(a.levels), "--limit-gb", str(a.limit_gb)]
                cmd += ["--checkpointing"] if a.checkpointing else []
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0 or not r.stdout.strip():
                    why = "over the cap" if "MemoryError" in r.stderr or "alloc" in r.stderr.lower() else \
                        (r.stderr.strip().splitlines() or ["failed"])[-1][:60]
                    print(f"{size:6s} {grid:>5s} {H * W:9d} {layout:9s} {'':>8s} {why}")
                    continue
                m = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"{size:6s} {grid:>5s} {H * W:9d} {layout:9s} {m['tokens']:8d} {m['step_s']:8.2f} "
                      f"{m['peak_gb']:8.2f} {m['peak_gb'] * 2**20 / (H * W):8.2f}", flush=True)


if __name__ == "__main__":
    main()
