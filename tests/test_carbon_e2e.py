"""Carbon end to end on a generated region: pretrain, fine-tune on plots with baselines, maps in
real formats (cloud-optimised GeoTIFF, CF NetCDF), the budget, evaluation and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

rasterio = pytest.importorskip("rasterio")
pytest.importorskip("laspy")

from hfmi_kit.domains.carbon import LandscapeConfig, evaluate, finetune, generate_region, pretrain  # noqa: E402
from hfmi_kit.errors import ConfigError  # noqa: E402
from hfmi_kit.train import read_config  # noqa: E402


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    return generate_region(tmp_path_factory.mktemp("carbon") / "r", LandscapeConfig(size=64, plots=150, seed=2))


@pytest.fixture(scope="module")
def pretrained(region, tmp_path_factory):
    return pretrain(data=region, out=tmp_path_factory.mktemp("pre"), steps=40, batch_size=8, progress=False)


def test_finetune_learns_biomass_and_writes_maps_and_budget(pretrained, region, tmp_path):
    m = finetune(ckpt=pretrained, data=region, out=tmp_path, labels=60, steps=160, baselines=True,
                 calibration_folds=3, progress=False)
    for k in ("rmse_mg_ha", "rmse_mg_ha_rf", "rmse_mg_ha_scratch", "coverage_90", "budget_error_pct", "bias_mg_ha",
              "r2", "rmse_mg_ha_map", "change_in_interval"):
        assert k in m and np.isfinite(m[k]), k
    assert m["r2"] > 0.2 and m["r2_map"] > 0.2  # it learned biomass, not the mean
    # the 90 % interval is calibrated by cross-conformal fits on the training plots only; its
    # coverage is then measured on the held-out pixels of the true map
    assert m["calibration_scores"] == 2 * 60 and np.isfinite(m["calibration_width_factor"])
    assert 0.75 <= m["coverage_90"] <= 0.99
    assert read_config(tmp_path / "model")["training"]["mode"] == "frozen"  # the default from a checkpoint
    assert m["labelled_plots"] == 60 and m["test_plots"] > 30
    assert read_config(tmp_path / "model")["training"]["plots"][:1]

    with rasterio.open(tmp_path / "maps" / "agb_2001.tif") as src:
        assert src.crs.to_epsg() == 32633 and src.count == 4
        assert src.descriptions == ("agb_q05", "agb_q50", "agb_q95", "agb_mean")
        q = src.read()
        assert (q[0] <= q[1]).all() and (q[1] <= q[2]).all()  # monotone quantiles
        assert src.tags(1)["units"] == "Mg ha-1" and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    import xarray as xr

    ds = xr.open_dataset(tmp_path / "maps" / "carbon.nc")
    assert ds["carbon"].attrs["grid_mapping"] == "spatial_ref" and "crs_wkt" in ds["spatial_ref"].attrs
    assert ds.sizes["time"] == 2 and ds["agb_q50"].attrs["units"] == "Mg ha-1"
    b = pd.read_csv(tmp_path / "budget.csv")
    assert set(b["unit"]) == {"Mg C"} and b["quantity"].str.startswith("net change").any()
    stock = b[b["quantity"].str.startswith("carbon stock")]
    assert (stock["lower_90"] < stock["value"]).all() and (stock["value"] < stock["upper_90"]).all()

    ev = evaluate(ckpt=tmp_path / "model", data=region, out=tmp_path / "ev")
    assert ev["test_plots"] == 150 - 60 and ev["rmse_mg_ha"] == pytest.approx(m["rmse_mg_ha"], rel=0.25)
    assert ev["coverage_90"] == pytest.approx(m["coverage_90"])  # the calibrated interval travels with the model


def test_finetune_bad_parameters(pretrained, region, tmp_path):
    with pytest.raises(ConfigError, match="--labels must lie"):
        finetune(ckpt=pretrained, data=region, out=tmp_path, labels=1000, steps=2, progress=False)
    with pytest.raises(ConfigError, match="unknown baselines"):
        finetune(ckpt=pretrained, data=region, out=tmp_path, labels=10, steps=2, baselines=["svm"], progress=False)


def test_cli_finetune_from_scratch(region, tmp_path):
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "finetune", "carbon", "--from", "scratch", "--data",
                        str(region), "--out", str(tmp_path / "ft"), "--labels", "20", "--steps", "10", "--baselines"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert {"rmse_mg_ha", "rmse_mg_ha_rf", "coverage_90", "budget_error_pct"} <= set(m)
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "finetune", "carbon", "--from", "scratch", "--data",
                        str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "region.json" in r.stderr
