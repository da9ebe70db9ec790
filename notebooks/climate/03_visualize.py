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
# # Climate 3: look at forecasts, skill and what-if responses
#
# Everything here reads the files a run wrote (CF NetCDF forecasts, `metrics.json`,
# `whatif.nc`), so it works on any finished run, local or from the cluster.

# %% tags=["parameters"]
run_dir = "runs/climate_finetune/pretrained"  # a fine-tuning output directory
whatif_dir = "runs/climate_finetune/whatif"  # a what-if output directory ("" to skip)
variable = "tas"
projection = "plate-carree"  # maps: plate-carree, robinson, mollweide, north-polar, south-polar (sea ice)

# %%
import json
from pathlib import Path

import xarray as xr

from hfmi_kit.domains.climate.plots import forecast_maps, lead_step, skill_vs_lead, whatif_maps

run = Path(run_dir)
fc = xr.open_dataset(run / "forecast.nc")
metrics = json.loads((run / "metrics.json").read_text())
fc

# %% [markdown]
# ## Forecast maps (move the lead-time slider)

# %%
forecast_maps(fc, variable, projection=projection)

# %% [markdown]
# ## Skill against lead time: model vs persistence and climatology

# %%
step = lead_step(fc)  # what a lead counts: "1 month" for monthly data
skill_vs_lead(metrics, variable, "rmse", step=step) + skill_vs_lead(metrics, variable, "acc", step=step)

# %% [markdown]
# ## What-if response and its spread

# %%
whatif_maps(Path(whatif_dir) / "whatif.nc", variable, projection=projection) if whatif_dir else None
