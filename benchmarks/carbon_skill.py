"""Carbon skill: biomass RMSE on held-out plots and on the full true map at 20 / 50 / 150 field
plots, pretrained against from-scratch and a random forest on per-pixel source values; coverage
of the 90 % interval; the regional budget and the change against the generator's truth.

    .venv/bin/python benchmarks/carbon_skill.py --size 128 --pretrain-steps 1500 --steps 400

Prints a table and writes ``--out/skill.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="region side in 20 m pixels")
    ap.add_argument("--plots", type=int, default=300)
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=400, help="fine-tuning steps")
    ap.add_argument("--budgets", default="20,50,150")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/carbon_bench")
    a = ap.parse_args()

    from hfmi_kit.domains.carbon import LandscapeConfig, finetune, generate_region, pretrain

    out = Path(a.out)
    t0 = time.time()
    region = generate_region(out / "region", LandscapeConfig(size=a.size, plots=a.plots, seed=a.seed))
    ckpt = pretrain(data=region, out=out / "pretrain", steps=a.pretrain_steps, seed=a.seed, progress=False)
    print(f"region {a.size}x{a.size} px, pretrained {a.pretrain_steps} steps in {time.time() - t0:.0f} s")
    keys = ["rmse_mg_ha", "rmse_mg_ha_scratch", "rmse_mg_ha_rf", "bias_mg_ha", "r2", "rmse_mg_ha_map",
            "rmse_mg_ha_map_scratch", "rmse_mg_ha_rf_map", "coverage_90", "coverage_90_scratch", "budget_error_pct",
            "budget_interval_halfwidth_pct", "budget_in_interval", "change_error_mg_c", "change_in_interval"]
    res = {}
    for b in [int(x) for x in a.budgets.split(",")]:
        t = time.time()
        res[b] = finetune(ckpt=ckpt, data=region, out=out / f"n{b}", labels=b, steps=a.steps, seed=a.seed,
                          baselines=True, progress=False)
        print(f"  {b} plots: {time.time() - t:.0f} s")
        (out / "skill.json").write_text(json.dumps(res, indent=1))
    print(f"\n{'metric':32s}" + "".join(f"{f'{b} plots':>14}" for b in res))
    for k in keys:
        print(f"{k:32s}" + "".join(f"{res[b].get(k, float('nan')):>14.3f}" for b in res))
    budget = (out / f"n{max(res)}" / "budget.csv").read_text()
    print(f"\nbudget with {max(res)} plots (Mg C):\n{budget}")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
