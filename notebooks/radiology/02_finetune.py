# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Radiology 2: segment and localise tumours from a few labelled cases
#
# The segmenter starts from the pretrained backbone and is trained on N labelled cases. On the
# same fixed test cases it is compared with the same architecture from scratch and with a
# supervised 3-D U-Net (MONAI DynUNet in the nnU-Net manner) trained on the same cases (the
# same-budget classical baseline) and, as an upper reference, on every training case.
# Scores are computed on each input's own grid: Dice, HD95 in mm, centroid error in mm.
#
# By default it starts from `radiology.tiny`, the checkpoint that ships with hfmi_kit (pretrained
# on a generated study of 52 subjects; `hfmi info --shipped`), and fine-tunes on that study, made
# again here with the same test cases held out. Give `pretrained` the folder `01_pretrain`
# wrote, or `data_path` your own study folder or store, to change either.

# %% tags=["parameters"]
pretrained = "radiology.tiny"  # the shipped checkpoint, or the folder 01_pretrain wrote (runs/radiology_pretrain/model)
data_path = ""  # empty: the data recorded in the checkpoint (for radiology.tiny: its generated study, made again)
budgets = [2, 4]  # numbers of labelled cases (None = all)
steps = 150
unet = True  # also train the U-Net on the same cases (every budget) and on all training cases (the last)
seed = 0
out_dir = "runs/radiology_finetune"

# %%
import json
from pathlib import Path

import pandas as pd

from hfmi_kit.checkpoints import recorded_data
from hfmi_kit.domains.radiology import finetune
from hfmi_kit.viz.core import label_efficiency

out = Path(out_dir)
if not data_path:
    data_path = recorded_data(pretrained, out / "data")
results = {}
for n in budgets:
    want = ["scratch"] + (["unet_same"] if unet else []) + (["unet"] if unet and n == budgets[-1] else [])
    results[n] = finetune(ckpt=pretrained, data=data_path, out=out / f"n{n}", labels=n, steps=steps, seed=seed,
                          baselines=want)
keys = ["dice", "dice_std", "hd95_mm", "centroid_error_mm", "dice_scratch", "hd95_mm_scratch", "dice_unet_same",
        "hd95_mm_unet_same", "dice_unet", "hd95_mm_unet"]
pd.DataFrame({f"N={n}": {k: m.get(k) for k in keys} for n, m in results.items()}).round(3)

# %%
rows = []
for m in results.values():
    rows.append({"method": "pretrained", "labels": m["labelled_cases"], "dice": m["dice"]})
    rows.append({"method": "scratch", "labels": m["labelled_cases"], "dice": m["dice_scratch"]})
    if "dice_unet_same" in m:
        rows.append({"method": "U-Net (same cases)", "labels": m["labelled_cases"], "dice": m["dice_unet_same"]})
    if "dice_unet" in m:
        rows.append({"method": "U-Net (all cases)", "labels": m["unet_cases"], "dice": m["dice_unet"]})
label_efficiency(rows, "dice")

# %%
print(json.dumps(json.loads((out / f"n{budgets[-1]}" / "cases.json").read_text())["per_case"]["model"], indent=1))
