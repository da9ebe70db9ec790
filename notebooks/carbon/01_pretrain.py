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
# # Carbon 1: one model for every source, pretrained without labels
#
# A region folder holds, per epoch, an optical image (GeoTIFF, UTM, clouds declared nodata), a
# radar image (GeoTIFF on a geographic lat/lon grid), an airborne lidar point cloud (LAZ, in
# flight strips), field plots with every tree measured (CSV) and a CO2 station record (CSV).
# `region.json` describes each source (bands, units, normalisation) and the target grid. Leave
# `data_path` empty to generate a landscape with known biomass (trees by the Chave et al. 2014
# allometry, sensors that saturate, two epochs with clear-cuts, a fire and regrowth).
#
# Pretraining hides whole sources of unlabelled tiles and reconstructs them from the others;
# missing data (clouds, no lidar) are absent tokens, never zeros. Plots are not read.

# %% tags=["parameters"]
data_path = ""  # region folder; empty: generate one into out_dir
size = 128  # generated region side [pixels of 20 m]
plots = 300  # generated 1-ha field plots (at most half of the region's 100 m cells)
config = "tiny"
steps = 300
seed = 0
out_dir = "runs/carbon_pretrain"

# %%
import json
from pathlib import Path

from hfmi_kit.domains.carbon import LandscapeConfig, generate_region, prepare, pretrain
from hfmi_kit.domains.carbon.plots import sources
from hfmi_kit.domains.carbon.sources import open_region, read_station
from hfmi_kit.viz.core import loss_curve

out = Path(out_dir)
if not data_path:
    data_path = str(generate_region(out / "region", LandscapeConfig(size=size, plots=plots, seed=seed)))
region = open_region(data_path)
print(json.dumps({k: region.meta[k] for k in ("name", "epochs", "grid")}, indent=1))
prep = prepare(data_path)
print("target grid:", prep.grid.describe())
sources(prep, 0)

# %% [markdown]
# The station's CO2 record: the Mauna Loa background (the real record that statsmodels ships)
# plus the region's own seasonal drawdown.

# %%
station = read_station(region)
station.set_index("date")[["co2_ppm", "background_ppm"]].plot(figsize=(8, 3), title="station CO2 [ppm]")

# %%
ckpt = pretrain(data=data_path, out=out, config=config, steps=steps, seed=seed)
print("checkpoint:", ckpt)
loss_curve(out / "metrics.jsonl")
