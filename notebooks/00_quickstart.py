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
# # hfmi_kit quickstart
#
# In a few minutes on a laptop CPU: generate a small synthetic coupled climate (air temperature,
# ocean mixed layer, sea ice, seasonal sunlight and a CO2 forcing) as CF Zarr, pretrain a tiny
# foundation model on it without labels, fine-tune a forecaster, and compare it with the
# baselines forecasters always beat first: persistence and climatology.

# %% tags=["parameters"]
out_dir = "quickstart_run"  # where data, checkpoints and results go
years = 12  # years of synthetic climate to generate
pretrain_steps = 150  # optimiser steps of pretraining
finetune_steps = 150  # optimiser steps of fine-tuning
batch_size = 16  # windows per optimiser step (both stages)
seed = 0

# %%
from pathlib import Path

from hfmi_kit.domains.climate import GeneratorConfig, finetune, generate, pretrain, write_dataset
from hfmi_kit.domains.climate.plots import forecast_maps, lead_step, skill_vs_lead

out = Path(out_dir)
data = write_dataset(generate(GeneratorConfig(years=years, spinup_years=8, seed=seed)), out / "climate.zarr")
print("data:", data)

# %% [markdown]
# ## Pretrain: masked reconstruction + next-step prediction on unlabelled data

# %%
ckpt = pretrain(data=data, out=out / "pretrain", steps=pretrain_steps, batch_size=batch_size, seed=seed)
print("checkpoint:", ckpt)

# %% [markdown]
# ## Fine-tune a multi-step forecaster and score it on held-out years

# %%
metrics = finetune(ckpt=ckpt, data=data, out=out / "finetune", steps=finetune_steps, batch_size=batch_size,
                   seed=seed)
for k in ("rmse", "rmse_persistence", "rmse_climatology", "acc"):
    print(f"{k:20s} {metrics[k]:.3f}")

# %%
skill_vs_lead(metrics, "tas", step=lead_step(out / "finetune" / "forecast.nc"))

# %%
forecast_maps(out / "finetune" / "forecast.nc", "tas")
