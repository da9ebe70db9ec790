"""Carbon skill: biomass RMSE on held-out plots and on the full true map at 20 / 50 / 150 field
plots (1 ha, stem-mapped), pretrained (the default head from a checkpoint, "ensemble": the
frozen encoder's quantile head averaged with a forest on its embedding) against the network from
scratch and a random forest on per-pixel source values (the same forest settings); coverage of
the 90 % interval; the regional budget and the change against the generator's truth. Held-out
plots are scored at plot scale: the plot's biomass against the map's mean over the plot.

Pixel biomass is heavy-tailed (a few big trees make a 20 m pixel), so one draw of 50 plots is a
noisy measurement: every budget is repeated for ``--draws`` draws of the training plots (seeds
0, 1, ...) and the table gives the mean and the spread (min..max) over draws.

    .venv/bin/python benchmarks/carbon_skill.py --size 128 --pretrain-steps 1500 --steps 600 --draws 3

Transfer to a new region: ``--corpus`` pretrains on several generated regions (forest type /
season, each its own seed), never on the region the plots come from, which is generated with
``--forest`` / ``--season`` and a seed of its own:

    .venv/bin/python benchmarks/carbon_skill.py --corpus conifer/winter,broadleaf/summer,mixed/spring \
        --forest broadleaf --season winter --budgets 10,20,50 --draws 3

Prints a table and writes ``--out/skill.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="region side in 20 m pixels")
    ap.add_argument("--plots", type=int, default=300)
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=600, help="gradient steps of a network head (scratch)")
    ap.add_argument("--head", choices=["ensemble", "forest", "network"],
                    help="head of the pretrained model (default: ensemble)")
    ap.add_argument("--draws", type=int, default=3, help="draws of the training plots per budget")
    ap.add_argument("--calibration-folds", type=int, default=5, help="cross-conformal folds of the 90%% interval")
    ap.add_argument("--budgets", default="20,50,150")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/carbon_bench")
    ap.add_argument("--pretrained", help="reuse this pretrained checkpoint (of --out/region)")
    ap.add_argument("--corpus", default="", help="pretrain on generated regions FOREST/SEASON,... instead of the "
                    "fine-tuning region (a transfer test)")
    ap.add_argument("--forest", default="mixed", help="forest type of the fine-tuning region")
    ap.add_argument("--season", default="summer", help="season of the fine-tuning region")
    ap.add_argument("--baselines", default="scratch,rf",
                    help="baselines trained beside the pretrained model (a diagnostic of heads may keep only rf: "
                    "the scratch network does not depend on the head)")
    a = ap.parse_args()

    from hfmi_kit.domains.carbon import LandscapeConfig, finetune, generate_region, pretrain

    out = Path(a.out)
    t0 = time.time()
    region = out / "region"
    if not (a.pretrained and region.is_dir()):
        region = generate_region(region, LandscapeConfig(size=a.size, plots=a.plots, seed=a.seed, forest=a.forest,
                                                         season=a.season))
    if a.pretrained:
        ckpt = Path(a.pretrained)
    elif a.corpus:
        for k, kind in enumerate(a.corpus.split(",")):
            forest, season = kind.split("/")
            generate_region(out / "corpus" / f"{k}-{forest}-{season}", LandscapeConfig(
                size=a.size, plots=10, seed=a.seed + 100 + k, forest=forest, season=season))
        ckpt = pretrain(data=out / "corpus", out=out / "pretrain", steps=a.pretrain_steps, seed=a.seed,
                        progress=False)
        print(f"corpus {a.corpus} ({a.size}x{a.size} px each), pretrained {a.pretrain_steps} steps in "
              f"{time.time() - t0:.0f} s; fine-tuning on a new {a.forest}/{a.season} region")
    else:
        ckpt = pretrain(data=region, out=out / "pretrain", steps=a.pretrain_steps, seed=a.seed, progress=False)
        print(f"region {a.size}x{a.size} px, pretrained {a.pretrain_steps} steps in {time.time() - t0:.0f} s")
    keys = ["rmse_mg_ha", "rmse_mg_ha_scratch", "rmse_mg_ha_rf", "bias_mg_ha", "r2", "rmse_mg_ha_map",
            "rmse_mg_ha_map_scratch", "rmse_mg_ha_map_rf", "coverage_90", "calibration_raw_coverage_90",
            "calibration_width_factor", "budget_error_pct", "budget_interval_halfwidth_pct", "budget_in_interval",
            "change_error_mg_c", "change_in_interval", "losses_error_pct", "losses_map_only_error_pct",
            "losses_in_interval", "gains_error_pct", "gains_map_only_error_pct", "gains_in_interval"]
    res: dict[int, list[dict[str, float]]] = {}
    for b in [int(x) for x in a.budgets.split(",")]:
        for d in range(a.draws):
            t = time.time()
            m = finetune(ckpt=ckpt, data=region, out=out / f"n{b}_d{d}", labels=b, steps=a.steps, seed=a.seed + d,
                         baselines=a.baselines.split(","), calibration_folds=a.calibration_folds, head=a.head,
                         progress=False)
            res.setdefault(b, []).append(m)
            print(f"  {b} plots, draw {d}: {time.time() - t:.0f} s  rmse pretrained / scratch / rf "
                  f"{m['rmse_mg_ha']:.1f} / {m.get('rmse_mg_ha_scratch', np.nan):.1f} / "
                  f"{m.get('rmse_mg_ha_rf', np.nan):.1f}", flush=True)
            (out / "skill.json").write_text(json.dumps(res, indent=1))
    print(f"\n{'metric (mean over draws, min..max)':36s}" + "".join(f"{f'{b} plots':>24}" for b in res))
    for k in keys:
        cells = []
        for b in res:
            v = np.array([m.get(k, np.nan) for m in res[b]], dtype=float)
            cells.append(f"{v.mean():9.3g} ({v.min():.3g}..{v.max():.3g})")
        print(f"{k:36s}" + "".join(f"{c:>24}" for c in cells))
    wins = {b: sum(m["rmse_mg_ha"] < min(m.get("rmse_mg_ha_scratch", np.inf), m.get("rmse_mg_ha_rf", np.inf))
                   for m in res[b]) for b in res}
    print("draws where pretrained beats both on held-out plots: " + ", ".join(f"{b}: {w}/{a.draws}"
                                                                             for b, w in wins.items()))
    for b in res:
        for k in ("scratch", "rf"):
            if f"rmse_mg_ha_{k}" not in res[b][0]:
                continue
            d = np.array([m[f"rmse_mg_ha_{k}"] - m["rmse_mg_ha"] for m in res[b]])
            print(f"{b} plots: {k} minus pretrained, held-out plots RMSE: mean {d.mean():+.1f} Mg/ha "
                  f"(per draw {', '.join(f'{x:+.1f}' for x in d)})")
    budget = (out / f"n{max(res)}_d0" / "budget.csv").read_text()
    print(f"\nbudget with {max(res)} plots (Mg C):\n{budget}")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
