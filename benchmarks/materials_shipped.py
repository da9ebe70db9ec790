"""The shipped materials checkpoint against the random forest, fold by fold.

Fine-tunes ``materials.tiny`` (the checkpoint that ships in ``hfmi_kit/checkpoints``) with the
command line's default settings, which is what

    .venv/bin/hfmi finetune materials --from materials.tiny --out OUT

runs: 5-fold cross-validation on the 4,604 experimental band gaps (``expt_gap``; every fold's
training rows labelled, 3-member ensembles), then the final ensemble. The random forest on
Magpie features is trained on the same folds (``baselines=["rf"]``, which changes nothing in the
network's training). Prints the MAE of each held-out fold for both and PASS/FAIL per fold (the
network must be better on every fold); exits 1 on a failure.

    .venv/bin/python benchmarks/materials_shipped.py --out runs/materials_shipped
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="ckpt", default="materials.tiny", help="checkpoint folder or shipped name")
    ap.add_argument("--out", default="runs/materials_shipped")
    a = ap.parse_args()

    import pandas as pd

    from hfmi_kit.domains.materials.tasks import finetune

    t0 = time.time()
    m = finetune(ckpt=a.ckpt, out=a.out, baselines=["rf"])
    wall = time.time() - t0
    cv = pd.read_csv(Path(a.out) / "cv_predictions.csv")
    rows, ok = [], True
    for k, f in cv.groupby("fold"):
        net = float((f["prediction_ev"] - f["target_ev"]).abs().mean())
        rf = float((f["prediction_rf_ev"] - f["target_ev"]).abs().mean())
        ok &= net < rf
        rows.append({"fold": int(k) + 1, "rows": len(f), "mae_ev": round(net, 4), "mae_ev_rf": round(rf, 4),
                     "result": "PASS" if net < rf else "FAIL"})
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"pooled MAE {m['mae_ev']:.4f} eV (random forest {m['mae_ev_rf']:.4f}), {int(m['labels_per_fold'])} labels "
          f"per fold, {int(m['ensemble_members'])} members, {int(m['train_steps'])} steps; {wall:.0f} s")
    (Path(a.out) / "folds.json").write_text(json.dumps(rows, indent=1))
    print("PASS: better than the random forest on every fold" if ok else "FAIL: the random forest wins a fold")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
