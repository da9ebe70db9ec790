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
# # Climate 1: pretrain a coupled atmosphere-ocean-sea-ice foundation model
#
# Bring any CF NetCDF/Zarr with a time axis and a lat-lon grid (`data_path`), or leave it
# empty to generate the synthetic coupled system. Pretraining combines masked reconstruction
# across variables and space-time patches with next-step prediction. Normalisation statistics
# (computed lazily with dask on the training years) are stored in the checkpoint.

# %% tags=["parameters"]
data_path = ""  # CF NetCDF/Zarr; empty: generate synthetic data into out_dir
variables = None  # list of variables to use, or None for every variable on the grid
config = "tiny"  # model size: tiny, small, base
steps = 150  # optimiser steps
batch_size = 16  # windows per optimiser step
years = 12  # years to generate when data_path is empty
seed = 0
out_dir = "runs/climate_pretrain"

# %%
import json
from pathlib import Path

import xarray as xr

from hfmi_kit.domains.climate import GeneratorConfig, generate, pretrain, write_dataset
from hfmi_kit.viz.core import loss_curve

out = Path(out_dir)
if not data_path:
    data_path = str(write_dataset(generate(GeneratorConfig(years=years, spinup_years=8, seed=seed)),
                                  out / "climate.zarr"))
xr.open_zarr(data_path) if data_path.endswith(".zarr") else xr.open_dataset(data_path)

# %%
ckpt = pretrain(data=data_path, out=out, config=config, steps=steps, batch_size=batch_size, seed=seed,
                variables=variables)
print("checkpoint:", ckpt)
print(json.dumps(json.loads((ckpt / "config.json").read_text())["metrics"], indent=2))

# %%
loss_curve(out / "metrics.jsonl", keys=("loss", "mae_loss", "next_step_loss"))
