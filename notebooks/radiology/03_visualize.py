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
# # Radiology 3: look at the segmentations
#
# Three orthogonal slices through a test case with the predicted and the true tumour masks
# (oedema orange, core red), each plane with its own slider (its position in mm) and a menu of
# the modalities; they keep working in the saved notebook. The written NIfTI
# prediction has exactly the input's affine and shape, so it opens aligned in 3D Slicer or
# ITK-SNAP.

# %% tags=["parameters"]
finetuned = "runs/radiology_finetune/n4/model"  # a fine-tuned segmenter
data_path = ""  # empty: the data recorded in the checkpoint's card
case_index = 0  # which test case
positions = [40, 45, 50, 55, 60]  # the sliders' stops, in % of each axis around the tumour
out_dir = "runs/radiology_visualize"

# %%
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from hfmi_kit.domains.radiology import discover, prepare
from hfmi_kit.domains.radiology.data import split_subjects
from hfmi_kit.domains.radiology.plots import orthoviews
from hfmi_kit.domains.radiology.tasks import predictor, write_prediction
from hfmi_kit.train import load_pretrained, read_config

cfg = read_config(finetuned)
if not data_path:
    data_path = cfg["card"]["data"][0]["path"]
model = load_pretrained(finetuned).eval()
_, test = split_subjects(discover(data_path))
sub = test[case_index]
case = prepare(sub, cfg["geometry"]["modalities"], cfg["geometry"]["spacing_mm"], keep_ref=True)
pred = predictor(model, cfg)(case)  # sliding windows, blended as the checkpoint says
centre = np.argwhere(case.label > 0).mean(0).round().astype(int) if case.label.any() else None
orthoviews(dict(zip(case.modalities, case.image)), {"predicted": pred, "true": case.label}, title=case.id,
           affine=case.affine, centre=centre, positions=positions)

# %%
written = write_prediction(pred, case, Path(out_dir))
img, ref = nib.load(str(written[0])), nib.load(sub.images[case.modalities[0]])
print(written[0], "same affine as input:", np.allclose(img.affine, ref.affine), "same shape:", img.shape == ref.shape)

# %%
print(json.dumps({k: round(v, 3) for k, v in cfg["metrics"].items() if not k.endswith("_std")}, indent=1))
