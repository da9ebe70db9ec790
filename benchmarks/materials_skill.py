"""Materials skill: 5-fold cross-validated MAE on the 4,604 experimental band gaps at each label
budget, pretrained against from-scratch, a random forest on Magpie features and the mean; then
the active-learning simulation and the top candidates of the model fine-tuned on the last budget.

    .venv/bin/python benchmarks/materials_skill.py --pretrain-steps 3000      # pretrains first
    .venv/bin/python benchmarks/materials_skill.py --ckpt runs/pre/model --budgets 200

Prints tables and writes ``--out/label_curve.json``, ``al.json`` and ``candidates.csv``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="pretrained checkpoint (default: pretrain one into --out/pretrain)")
    ap.add_argument("--pretrain-steps", type=int, default=3000, help="steps of each pretraining stage")
    ap.add_argument("--budgets", default="50,200,1000,all")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500, help="max fine-tuning steps per member")
    ap.add_argument("--al-budget", type=int, default=300)
    ap.add_argument("--al-repeats", type=int, default=5)
    ap.add_argument("--out", default="runs/materials_bench")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from hfmi_kit.domains.materials import chem
    from hfmi_kit.domains.materials.discover import active_learning, rank_candidates
    from hfmi_kit.domains.materials.tables import load_property_csv
    from hfmi_kit.domains.materials.tasks import curve_rows, embed_arrays, finetune, predict_arrays, pretrain
    from hfmi_kit.train import load_pretrained

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ckpt = a.ckpt or pretrain(out=out / "pretrain", steps=a.pretrain_steps, seed=a.seed, progress=False)
    print(f"pretrained checkpoint: {ckpt} ({time.time() - t0:.0f} s)")

    budgets = [None if b == "all" else int(b) for b in a.budgets.split(",")]
    rows = []
    for b in budgets:
        t = time.time()
        m = finetune(ckpt=ckpt, data="expt_gap", out=out / f"n{b or 'all'}", labels=b, folds=a.folds,
                     members=a.members, steps=a.steps, seed=a.seed, baselines=True, final=b == budgets[-1],
                     progress=False)
        rows += curve_rows(m)
        print(f"  budget {b or 'all'}: {time.time() - t:.0f} s; uncertainty coverage 1/2 sigma "
              f"{m['coverage_1sigma']:.2f}/{m['coverage_2sigma']:.2f}, recalibration x{m['uncertainty_scale']:.2f}")
        (out / "label_curve.json").write_text(json.dumps(rows, indent=1))
    methods = ["pretrained", "scratch", "rf", "dummy"]
    print(f"\n{a.folds}-fold CV MAE [eV] on expt_gap (RMSE in brackets)")
    print(f"{'labels/fold':>12} " + " ".join(f"{m:>16}" for m in methods))
    for n in sorted({r["labels"] for r in rows}):
        cells = {r["method"]: f"{r['mae_ev']:.3f} ({r['rmse_ev']:.3f})" for r in rows if r["labels"] == n}
        print(f"{n:>12} " + " ".join(f"{cells.get(m, '-'):>16}" for m in methods))

    # active learning on the measured set: features from the pretrained model (never saw these labels)
    table = load_property_csv("expt_gap")
    arrays = chem.encode(table.parsed)
    net = load_pretrained(ckpt)
    feats = np.concatenate([embed_arrays(net, arrays), predict_arrays(net, arrays)[0].T], axis=1)
    t = time.time()
    al = active_learning({"foundation": feats, "magpie": chem.magpie_features(table.parsed)}, table.y,
                         budget=a.al_budget, repeats=a.al_repeats, seed=a.seed)
    print(f"\nactive learning ({time.time() - t:.0f} s): {al.targets} of {al.pool} materials have 1.1-1.6 eV")
    for k in (10, 25, 50):
        print(f"  measurements to find {k:>3}: " + ", ".join(f"{s} {v:.0f}" for s, v in al.measurements_to(k).items()))
    print("  found within budget: " + ", ".join(f"{s} {v[:, -1].mean():.1f}" for s, v in al.hits.items()))
    (out / "al.json").write_text(json.dumps({"targets": al.targets, "pool": al.pool,
                                             "mean_hits": {k: v.mean(0).tolist() for k, v in al.hits.items()}}))

    ranked = rank_candidates(out / f"n{budgets[-1] or 'all'}" / "model", measured=table)
    ranked.to_csv(out / "candidates.csv", index=False)
    cols = ["formula", "family", "prediction_ev", "uncertainty_ev", "expected_sq_pct", "known", "measured_ev"]
    print("\ntop candidates by expected SQ efficiency:")
    print(ranked[cols].head(12).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
