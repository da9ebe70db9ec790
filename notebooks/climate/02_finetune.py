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
# # Climate 2: fine-tune forecasts with few labels, and a CO2 what-if
#
# The forecaster starts from the pretrained backbone and learns multi-step forecasts (lead
# times 1..k by autoregressive rollout) from a fraction of the training years. The same
# architecture trained from scratch on the same years, persistence and climatology are the
# baselines; all are scored on held-out years with the latitude-weighted RMSE and ACC
# (WeatherBench 2). Then a what-if: double CO2 and roll an ensemble out.
#
# By default it starts from `climate.tiny`, the checkpoint that ships with hfmi_kit (pretrained on
# the generated example run of 20 years; `hfmi info --shipped`), and fine-tunes on that run, made
# again here with the same years held out. Give `pretrained` the folder `01_pretrain` wrote, or
# `data_path` a CF file or store of the same variables, to change either.

# %% tags=["parameters"]
pretrained = "climate.tiny"  # the shipped checkpoint, or the folder 01_pretrain wrote (runs/climate_pretrain/model)
data_path = ""  # empty: the data recorded in the checkpoint (for climate.tiny: its generated run, made again)
label_fraction = 0.25  # fraction of training years with labels
steps = 150
batch_size = 16  # windows per optimiser step
mode = "full"  # full, frozen or linear_probe
leads = 6  # forecast lead times (steps of the data: months here)
compare_scratch = True  # also train the same model from scratch
whatif_members = 4
seed = 0
out_dir = "runs/climate_finetune"

# %%
import json
from pathlib import Path

import pandas as pd

from hfmi_kit.checkpoints import recorded_data
from hfmi_kit.domains.climate import finetune, whatif
from hfmi_kit.domains.climate.plots import lead_step, skill_vs_lead
from hfmi_kit.viz.core import label_efficiency

out = Path(out_dir)
if not data_path:
    data_path = recorded_data(pretrained, out / "data")

runs = {"pretrained": pretrained}
if compare_scratch:
    runs["scratch"] = None
results = {}
for name, src in runs.items():
    results[name] = finetune(ckpt=src, data=data_path, out=out / name, label_fraction=label_fraction,
                             steps=steps, batch_size=batch_size, mode=mode, leads=leads, seed=seed)
keys = ["rmse", "rmse_persistence", "rmse_climatology", "acc", "seaice_extent_mae"]
pd.DataFrame({n: {k: m[k] for k in keys} for n, m in results.items()}).round(3)

# %%
skill_vs_lead(results["pretrained"], "tas", step=lead_step(out / "pretrained" / "forecast.nc"))

# %%
rows = [{"method": n, "labels": label_fraction, "rmse": m["rmse"]} for n, m in results.items()]
label_efficiency(rows, "rmse", xlabel="fraction of training years labelled")

# %% [markdown]
# ## What-if: double CO2, ensemble of perturbed initial states

# %%
w = whatif(ckpt=out / "pretrained" / "model", data=data_path, out=out / "whatif", co2_factor=2.0,
           horizon=12, average_from=6, members=whatif_members, seed=seed)
print(json.dumps({k: round(v, 3) for k, v in w.items()}, indent=1))
