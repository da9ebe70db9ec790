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
# # Materials 2: experimental band gaps from few measurements
#
# 4,604 measured band gaps (Matbench `expt_gap`, bundled; half are metals with 0 eV). Every
# score here is 5-fold cross-validated: each composition is predicted once, by models that never
# saw it. In each fold the pretrained model (a deep ensemble for uncertainty), the same model
# from scratch, a random forest on Magpie composition features and the mean predictor all learn
# from the **same** `N` labels. The Matbench leaderboard with all labels: the best
# composition-only models ≈0.33–0.35 eV, random forest ≈0.45 eV, dummy ≈1.14 eV.

# %% tags=["parameters"]
pretrained = "materials.tiny"  # the shipped checkpoint, or your own from 01_pretrain ("runs/materials_pretrain/model")
data_path = "expt_gap"  # bundled set or a CSV of measured values (eV)
data = ""  # old spelling of data_path (kept so that `-p data ...` still works)
target = ""  # value column of a CSV (empty: 'target')
budgets = [50, 200, 1000, None]  # labels per fold (None: all)
folds = 5
members = 3  # ensemble members
steps = 1000  # max fine-tuning steps per member
seed = 0
out_dir = "runs/materials_finetune"

# %%
from pathlib import Path

import pandas as pd

from hfmi_kit.domains.materials import finetune, module_technologies
from hfmi_kit.domains.materials.plots import error_by_chemistry, parity
from hfmi_kit.domains.materials.tasks import curve_rows
from hfmi_kit.viz.core import label_efficiency

out = Path(out_dir)
results, rows = {}, []
for b in budgets:
    name = f"n{b or 'all'}"
    results[name] = finetune(ckpt=pretrained, data=data or data_path, target=target or None, out=out / name, labels=b,
                             folds=folds, members=members, steps=steps, seed=seed, baselines=True,
                             final=b == budgets[-1], progress=False)
    rows += curve_rows(results[name])
keys = ["labels_per_fold", "mae_ev", "mae_ev_scratch", "mae_ev_rf", "mae_ev_dummy", "rmse_ev", "rmse_ev_rf",
        "coverage_1sigma", "coverage_2sigma", "spearman_error_uncertainty", "rows_rejected"]
pd.DataFrame({n: {k: m.get(k) for k in keys} for n, m in results.items()}).round(3)

# %%
label_efficiency(rows, "mae_ev", xlabel="labels per fold")

# %% [markdown]
# Out-of-fold predictions of the last budget: parity (colour: the ensemble's uncertainty) and
# the error by chemical family for every method.

# %%
last = out / f"n{budgets[-1] or 'all'}"
cv = pd.read_csv(last / "cv_predictions.csv")
parity(cv)

# %%
error_by_chemistry(cv, methods={"pretrained": "prediction_ev", "scratch": "prediction_scratch_ev",
                                "random forest": "prediction_rf_ev"})

# %% [markdown]
# What a cell could reach: the Shockley–Queisser limit at each technology's absorber gap against
# the modules of the CEC database (shipped with pvlib).

# %%
module_technologies().round(2)
