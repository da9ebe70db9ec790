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
# # Carbon 3: maps, change and the budget
#
# The fine-tuned model's biomass map with its 90 % interval width next to the truth, the carbon
# change between the epochs (losses are sources, gains are sinks) and the regional budget with
# model-assisted 90 % intervals. The maps on disk are cloud-optimised GeoTIFFs with their CRS
# (they open in QGIS) and one CF NetCDF.

# %% tags=["parameters"]
finetuned = "runs/carbon_finetune/n150/model"
data_path = ""  # empty: the region recorded in the checkpoint
out_dir = "runs/carbon_visualize"

# %%
from pathlib import Path

import pandas as pd
import rasterio
import xarray as xr

from hfmi_kit.domains.carbon import evaluate, map_region
from hfmi_kit.domains.carbon.plots import biomass_maps, budget_plot, change_map
from hfmi_kit.train import read_config

cfg = read_config(finetuned)
if not data_path:
    data_path = cfg["training"]["data"]
model, prep, maps = map_region(finetuned, data_path)  # the 90 % interval as calibrated at fine-tuning
biomass_maps(prep, maps)

# %%
change_map(prep, maps)

# %%
metrics = evaluate(ckpt=finetuned, data=data_path, out=out_dir)
rows = pd.read_csv(Path(out_dir) / "budget.csv")
budget_plot(rows.to_dict("records"))

# %%
rows.round(1)

# %%
with rasterio.open(Path(out_dir) / "maps" / f"agb_{prep.epochs[-1]}.tif") as src:
    print(src.crs, src.res, src.descriptions, src.tags(1), "overviews:", src.overviews(1))
print(xr.open_dataset(Path(out_dir) / "maps" / "carbon.nc"))
