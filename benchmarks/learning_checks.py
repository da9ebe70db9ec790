"""Learning checks too long for the test suite: each trains a model long enough to learn, prints
its figures and says PASS or FAIL against the same thresholds the suite used; the exit status is
1 when one fails.

    python benchmarks/learning_checks.py [--out runs/learning_checks] [--seeds 0,1]

- ``segmenter``: the radiology segmenter from scratch on three labelled cases of the small study
  set (2 unlabelled + 5 labelled subjects at 1.6x spacing, 200 steps, batch 2). The training loss
  must fall below 0.85 of its first value, test Dice must exceed 0.2 (the empty prediction scores
  0), and the centroid error must be under 0.8 of the best guess without a model (the centroid of
  the brighter half of the T1 image, about 48 mm from the tumours). About 2 minutes per seed on 2
  CPU cores. It was ``tests/test_radiology_e2e.py::test_segmenter_learns_from_three_cases`` (145 s
  of the suite); the suite keeps the short CLI run of the same task.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def segmenter(out: Path, seed: int) -> bool:
    """Fine-tune from scratch on three cases; print the figures; whether every threshold holds."""
    from hfmi_kit.domains.radiology import StudyConfig, discover, finetune, generate_study, split_subjects
    from hfmi_kit.domains.radiology.io import load_volume
    from hfmi_kit.domains.radiology.metrics import centroid_mm

    study = out / "study"
    if not (study / "dataset.json").is_file():
        generate_study(study, StudyConfig(unlabelled=2, labelled=5, spacing_scale=1.6, seed=3))
    guess = []
    for s in split_subjects(discover(study))[1]:
        lab, img = load_volume(s.label), load_volume(s.images["T1w"])
        guess.append(float(np.linalg.norm(centroid_mm(img.data > np.percentile(img.data, 50), img.affine)
                                          - centroid_mm(lab.data > 0, lab.affine))))
    t = time.time()
    run = out / f"segmenter_s{seed}"
    m = finetune(ckpt=None, data=study, out=run, labels=3, steps=200, batch_size=2, seed=seed, progress=False)
    rows = [json.loads(x) for x in (run / "train_segmenter" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    checks = {f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (< 0.85x)": losses[-1] < 0.85 * losses[0],
              f"test Dice {m['dice']:.3f} (> 0.2)": m["dice"] > 0.2,
              f"centroid error {m['centroid_error_mm']:.1f} mm (< 0.8 x {np.mean(guess):.1f} mm, the guess "
              "without a model)": m["centroid_error_mm"] < 0.8 * np.mean(guess)}
    print(f"segmenter, seed {seed} ({time.time() - t:.0f} s):")
    for text, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    return all(checks.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/learning_checks")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds of the training runs")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ok = [segmenter(out, int(s)) for s in a.seeds.split(",")]
    print(f"{sum(ok)} of {len(ok)} runs passed")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
