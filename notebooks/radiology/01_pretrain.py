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
# # Radiology 1: pretrain a 3-D CT/MRI foundation model on unlabelled volumes
#
# Bring a folder of NIfTI files (`<subject>_<modality>.nii.gz`) and/or DICOM series
# (`data_path`), or leave it empty to build a study set from real anatomy: the MNI152 2009
# template that nilearn ships, warped into many subjects, with T1w, T2w-like and CT-like
# contrasts and inserted tumours. Pretraining is 3-D masked autoencoding over all modalities
# (a modality token per volume) on the shared backbone; labels are never read and the test
# subjects are left out.

# %% tags=["parameters"]
data_path = ""  # study folder; empty: generate one into out_dir
unlabelled = 6  # subjects without labels to generate
labelled = 8  # subjects with tumour labels to generate
spacing_scale = 1.4  # acquisition voxel size multiplier of the generated set (>1: faster)
config = "tiny"  # model size: tiny, small, base
backbone = "transformer"  # transformer (3-D ViT MAE) or resenc (residual-encoder U-Net, masked-image)
steps = 150  # optimiser steps
spacing = 3.0  # model grid spacing [mm]
seed = 0
out_dir = "runs/radiology_pretrain"

# %%
import json
from pathlib import Path

import numpy as np
import torch

from hfmi_kit.domains.radiology import StudyConfig, discover, generate_study, prepare, pretrain
from hfmi_kit.domains.radiology.data import describe
from hfmi_kit.domains.radiology.plots import orthoviews, reconstruction_panels
from hfmi_kit.train import load_pretrained
from hfmi_kit.viz.core import loss_curve

out = Path(out_dir)
if not data_path:
    data_path = str(generate_study(out / "study", StudyConfig(unlabelled=unlabelled, labelled=labelled,
                                                              spacing_scale=spacing_scale, seed=seed)))
subjects = discover(data_path)
describe(subjects)

# %% [markdown]
# One subject on the model grid (all modalities co-registered through their affines):

# %%
case = prepare(subjects[0], sorted(subjects[0].images), spacing)
orthoviews(dict(zip(case.modalities, case.image)), title=case.id, affine=case.affine, positions=[30, 50, 70])

# %%
ckpt = pretrain(data=data_path, out=out, config=config, steps=steps, seed=seed, spacing=spacing,
                backbone=backbone)
print("checkpoint:", ckpt)
print(json.dumps(json.loads((ckpt / "config.json").read_text())["geometry"], indent=1))

# %%
loss_curve(out / "metrics.jsonl")

# %% [markdown]
# Reconstructions of masked patches (75 % of the 4x4x4-voxel patches hidden; the transformer
# predicts hidden patches from the visible tokens, the residual encoder sees the hidden cubes as zeros):

# %%
mae = load_pretrained(ckpt).eval()
c = mae.crop
x = case.image[0]
i, j, k = (np.array(x.shape) - c) // 2
crop = torch.from_numpy(np.ascontiguousarray(x[i : i + c, j : j + c, k : k + c]))[None]
rec = mae.reconstruct(crop, torch.tensor([mae.modalities.index(case.modalities[0])]))
reconstruction_panels({k_: v[0].numpy() for k_, v in rec.items()}, crop[0].numpy())
