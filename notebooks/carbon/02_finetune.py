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
# # Carbon 2: biomass from a few field plots
#
# A fixed 30 % of the plots is held out for scoring and for the model-assisted budget. The plots
# are 1 ha with every stem mapped, so each 20 m cell they cover has its own biomass. From `N`
# plots (each measured at both epochs) the pretrained model is given three candidate heads: its
# quantile head fine-tuned with the encoder frozen, a random forest on the frozen network's
# per-pixel embedding (the trees' spread gives its quantiles), and the two averaged; the one with
# the lowest plot RMSE cross-validated on the training plots is kept, and the 90 % interval is
# calibrated on the same folds. The same plots train the network from scratch and a random forest on
# the pixel's raw source values (the same forest settings).
# Scores on held-out plots compare each plot's biomass with the map's mean over the plot.
#
# By default it starts from `carbon.tiny`, the checkpoint that ships with hfmi_kit (pretrained on
# the generated example region; `hfmi info --shipped`), and fine-tunes on that region, made again
# here with the same plots held out. Give `pretrained` the folder `01_pretrain` wrote, or
# `data_path` a region folder of your own, to change either.

# %% tags=["parameters"]
pretrained = "carbon.tiny"  # the shipped checkpoint, or the folder 01_pretrain wrote (runs/carbon_pretrain/model)
data_path = ""  # empty: the region recorded in the checkpoint (for carbon.tiny: its generated region, made again)
budgets = [20, 50, 150]  # field plots
steps = 300
calibration_folds = 5  # cross-conformal folds calibrating the 90 % interval (0: none)
seed = 0
out_dir = "runs/carbon_finetune"

# %%
from pathlib import Path

import pandas as pd

from hfmi_kit.checkpoints import recorded_data
from hfmi_kit.domains.carbon import finetune
from hfmi_kit.viz.core import label_efficiency

out = Path(out_dir)
if not data_path:
    data_path = recorded_data(pretrained, out / "data")
results = {}
for n in budgets:
    results[n] = finetune(ckpt=pretrained, data=data_path, out=out / f"n{n}", labels=n, steps=steps, seed=seed,
                          baselines=True, calibration_folds=calibration_folds, progress=False)
keys = ["rmse_mg_ha", "rmse_mg_ha_scratch", "rmse_mg_ha_rf", "bias_mg_ha", "r2", "rmse_mg_ha_map", "coverage_90",
        "budget_error_pct", "budget_in_interval", "change_in_interval"]
pd.DataFrame({f"N={n}": {k: m.get(k) for k in keys} for n, m in results.items()}).round(3)

# %%
rows = []
for n, m in results.items():
    for method, key in (("pretrained", "rmse_mg_ha"), ("scratch", "rmse_mg_ha_scratch"),
                        ("random forest", "rmse_mg_ha_rf")):
        rows.append({"method": method, "labels": n, "rmse_mg_ha": m[key]})
label_efficiency(rows, "rmse_mg_ha", xlabel="field plots")

# %%
pd.read_csv(out / f"n{budgets[-1]}" / "budget.csv").round(1)
