"""Radiology label efficiency: pretrained vs scratch vs a supervised U-Net, on one fixed test split.

Builds the study set (MNI152 anatomy from nilearn, inserted tumours), pretrains the
``--backbone`` (the 3-D ViT MAE or the residual-encoder U-Net) once, then fine-tunes from the
pretrained backbone and from scratch on N labelled cases for every N in --budgets (nested
subsets, same seed), trains the nnU-Net-style U-Net on the same N cases and, at the last budget,
on all training cases. Prints Dice, HD95 and centroid error (mean +- std over the test cases).

    python benchmarks/radiology_skill.py --pretrain-steps 1500 --finetune-steps 400 [--backbone resenc]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/radiology_skill")
    ap.add_argument("--unlabelled", type=int, default=24)
    ap.add_argument("--labelled", type=int, default=28)
    ap.add_argument("--spacing-scale", type=float, default=1.0)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--finetune-steps", type=int, default=400)
    ap.add_argument("--budgets", default="2,4,8,16,all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default="transformer", choices=("transformer", "resenc"))
    a = ap.parse_args()
    from hfmi_kit.domains.radiology import StudyConfig, finetune, generate_study, pretrain

    out = Path(a.out)
    study = out / "study"
    t = time.time()
    if not (study / "dataset.json").is_file():
        generate_study(study, StudyConfig(unlabelled=a.unlabelled, labelled=a.labelled,
                                          spacing_scale=a.spacing_scale, seed=a.seed))
    print(f"study: {study} ({time.time() - t:.0f} s)", flush=True)
    t = time.time()
    ck = out / "pretrain" / "model"
    if not (ck / "config.json").is_file():
        ck = pretrain(data=study, out=out / "pretrain", config=a.config, steps=a.pretrain_steps, seed=a.seed,
                      progress=False, backbone=a.backbone)
    print(f"pretrain: {a.pretrain_steps} steps in {time.time() - t:.0f} s", flush=True)
    budgets = [None if b == "all" else int(b) for b in a.budgets.split(",")]
    rows = []
    for i, n in enumerate(budgets):
        t = time.time()
        want = ["scratch", "unet_same"] + (["unet"] if i == len(budgets) - 1 else [])
        m = finetune(ckpt=ck, data=study, out=out / f"ft_{n or 'all'}", labels=n, steps=a.finetune_steps,
                     seed=a.seed, baselines=want, progress=False)
        rows.append(m)
        cases = json.loads((out / f"ft_{n or 'all'}" / "cases.json").read_text())["per_case"]
        diff = [p["dice"] - s["dice"] for p, s in zip(cases["model"], cases["scratch"])]
        m["paired_dice_gain"] = sum(diff) / len(diff)
        m["cases_pretrained_better"] = float(sum(d > 0 for d in diff))
        print(f"N={int(m['labelled_cases']):3d} ({time.time() - t:4.0f} s)  pretrained dice {m['dice']:.3f}"
              f"+-{m['dice_std']:.3f} hd95 {m['hd95_mm']:6.1f} mm centroid {m['centroid_error_mm']:5.1f} mm | "
              f"scratch dice {m['dice_scratch']:.3f}+-{m['dice_std_scratch']:.3f} hd95 {m['hd95_mm_scratch']:6.1f}"
              f" centroid {m['centroid_error_mm_scratch']:5.1f} | same-N U-Net dice {m['dice_unet_same']:.3f}"
              f"+-{m['dice_std_unet_same']:.3f} | paired gain {m['paired_dice_gain']:+.3f}, better in "
              f"{int(m['cases_pretrained_better'])}/{len(diff)} cases", flush=True)
    last = rows[-1]
    print(f"U-Net on all {int(last['unet_cases'])} cases: dice {last['dice_unet']:.3f}+-{last['dice_std_unet']:.3f} "
          f"hd95 {last['hd95_mm_unet']:.1f} mm centroid {last['centroid_error_mm_unet']:.1f} mm")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
