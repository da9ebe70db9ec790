"""Carbon end to end on a generated region: pretrain, fine-tune on plots with baselines, maps in
real formats (cloud-optimised GeoTIFF, CF NetCDF), the budget, evaluation and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

rasterio = pytest.importorskip("rasterio")
pytest.importorskip("laspy")

from hfmi_kit.domains.carbon import LandscapeConfig, evaluate, finetune, generate_region, pretrain  # noqa: E402
from hfmi_kit.errors import ConfigError, DataError  # noqa: E402
from hfmi_kit.train import read_config  # noqa: E402


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    return generate_region(tmp_path_factory.mktemp("carbon") / "r", LandscapeConfig(size=64, plots=70, seed=2))


@pytest.fixture(scope="module")
def pretrained(region, tmp_path_factory):
    return pretrain(data=region, out=tmp_path_factory.mktemp("pre"), steps=40, batch_size=8, progress=False)


def test_finetune_learns_biomass_and_writes_maps_and_budget(pretrained, region, tmp_path):
    m = finetune(ckpt=pretrained, data=region, out=tmp_path, labels=30, steps=160, baselines=True,
                 calibration_folds=2, progress=False)
    for k in ("rmse_mg_ha", "rmse_mg_ha_rf", "rmse_mg_ha_scratch", "coverage_90", "budget_error_pct", "bias_mg_ha",
              "r2", "rmse_mg_ha_map", "change_in_interval"):
        assert k in m and np.isfinite(m[k]), k
    assert m["r2"] > 0.2 and m["r2_map"] > 0.2  # it learned biomass, not the mean
    # the 90 % interval is calibrated by cross-conformal fits on the training plots only; its
    # coverage is then measured on the held-out pixels of the true map
    # (scored per cell of the held-out folds' plots: 25 cells of 20 m per 1-ha plot, two epochs)
    assert m["calibration_scores"] == 2 * 25 * 30 and np.isfinite(m["calibration_width_factor"])
    assert 0.75 <= m["coverage_90"] <= 0.99
    # the default from a checkpoint: of the frozen-encoder network head, a forest on the pretrained
    # embedding and the two averaged, the one with the lowest plot RMSE cross-validated on the
    # training plots (the calibration's folds), saved as one model
    tr = read_config(tmp_path / "model")["training"]
    cv = {h: m[f"head_cv_rmse_mg_ha_{h}"] for h in ("network", "forest", "ensemble")}
    assert tr["head_requested"] == "auto" and tr["head"] == min(cv, key=cv.get) and tr["head_cv_rmse_mg_ha"] == cv
    assert all(0 < v < 200 for v in cv.values())
    family = "carbon_ensemble" if tr["head"] == "ensemble" else "carbon_net"
    assert read_config(tmp_path / "model")["model_type"] == f"{family}.tiny"
    assert tr["mode"] == "frozen"
    assert m["labelled_plots"] == 30 and m["test_plots"] > 15
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
    # gross losses and gains are model-assisted from the stem-mapped plots' own cell changes: map
    # differencing alone inflates the losses (noise in two maps), the plots' residuals correct it
    gross = b[b["quantity"].str.startswith(("losses", "gains"))]
    assert len(gross) == 2 and (gross["plots"] == m["test_plots"]).all()
    assert (gross["lower_90"] < gross["value"]).all() and (gross["value"] < gross["upper_90"]).all()
    assert m["losses_map_only_error_pct"] < -50 and abs(m["losses_error_pct"]) < abs(m["losses_map_only_error_pct"])

    ev = evaluate(ckpt=tmp_path / "model", data=region, out=tmp_path / "ev")
    assert ev["test_plots"] == 70 - 30 and ev["rmse_mg_ha"] == pytest.approx(m["rmse_mg_ha"], rel=0.25)
    assert ev["coverage_90"] == pytest.approx(m["coverage_90"])  # the calibrated interval travels with the model


def test_forest_head_walks_the_trees_like_scikit_learn_and_old_checkpoints_load():
    from sklearn.ensemble import RandomForestRegressor

    from hfmi_kit.domains.carbon.model import CarbonNet
    from hfmi_kit.models import SIZES

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 71)).astype(np.float32)
    y = 100 * np.abs(X[:, 0]) + 20 * (X[:, 3] > 0.5) + rng.normal(0, 5, 400)
    rf = RandomForestRegressor(n_estimators=20, min_samples_leaf=2, max_features=1 / 3, random_state=0).fit(X, y)
    net = CarbonNet(size=SIZES["tiny"], groups=[f"s:{i}" for i in range(7)])
    assert not net.has_forest
    net.set_forest(rf)
    Xt = rng.normal(size=(300, 71)).astype(np.float32)
    per_tree = net.forest_predict(torch.from_numpy(Xt)).numpy()
    assert per_tree.shape == (20, 300)
    np.testing.assert_allclose(per_tree.mean(0), rf.predict(Xt), rtol=1e-10)
    np.testing.assert_allclose(per_tree[3], rf.estimators_[3].predict(Xt), rtol=1e-10)
    np.testing.assert_array_equal(net.forest_predict(torch.from_numpy(Xt), chunk=7).numpy(), per_tree)
    # the trees travel as tensors: a model built with the recorded sizes loads them strictly
    again = CarbonNet(size=SIZES["tiny"], groups=net.groups, forest_trees=20, forest_nodes=int(net.forest_left.numel()))
    with pytest.raises(DataError, match="do not form trees"):  # still all zeros: node 0 is its own child
        again.forest_predict(torch.from_numpy(Xt))
    again.load_state_dict(net.state_dict())
    np.testing.assert_allclose(again.forest_predict(torch.from_numpy(Xt)).numpy(), per_tree)
    rf2 = RandomForestRegressor(n_estimators=5, random_state=1).fit(X, -y)  # a new forest replaces the packed one
    again.set_forest(rf2)
    np.testing.assert_allclose(again.forest_predict(torch.from_numpy(Xt)).numpy().mean(0), rf2.predict(Xt), rtol=1e-10)
    # a network-head checkpoint written before the forest head existed has no forest tensors
    old = {k: v for k, v in CarbonNet(size=SIZES["tiny"], groups=net.groups).state_dict().items()
           if not k.startswith("forest_")}
    plain = CarbonNet(size=SIZES["tiny"], groups=net.groups)
    plain.load_state_dict(old)
    assert not plain.has_forest


def test_finetune_bad_parameters(pretrained, region, tmp_path):
    with pytest.raises(ConfigError, match="--labels must lie"):
        finetune(ckpt=pretrained, data=region, out=tmp_path, labels=1000, steps=2, progress=False)
    with pytest.raises(ConfigError, match="unknown baselines"):
        finetune(ckpt=pretrained, data=region, out=tmp_path, labels=10, steps=2, baselines=["svm"], progress=False)
    with pytest.raises(ConfigError, match="unknown head 'svm'; expected one of auto, ensemble, forest, network"):
        finetune(ckpt=pretrained, data=region, out=tmp_path, labels=10, head="svm", progress=False)
    for head in ("forest", "ensemble", "auto"):
        with pytest.raises(ConfigError, match=f"an? {head} head .* needs a checkpoint"):
            finetune(ckpt=None, data=region, out=tmp_path, labels=10, head=head, progress=False)


def test_cli_finetune_from_scratch(region, tmp_path):
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "finetune", "carbon", "--from", "scratch", "--data",
                        str(region), "--out", str(tmp_path / "ft"), "--labels", "20", "--steps", "10", "--baselines",
                        "--head", "network"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert {"rmse_mg_ha", "rmse_mg_ha_rf", "coverage_90", "budget_error_pct"} <= set(m)
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "finetune", "carbon", "--from", "scratch", "--data",
                        str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "region.json" in r.stderr
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "finetune", "carbon", "--from", "scratch", "--data",
                        str(region), "--out", str(tmp_path / "y"), "--head", "forest"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "a forest head" in r.stderr and "needs a checkpoint" in r.stderr
    assert not (tmp_path / "y" / "model").exists()


def test_the_shipped_checkpoint_fine_tunes_on_its_region_made_again_and_evaluates(tmp_path, capsys):
    """``carbon.tiny`` ships with the package: listed, loaded strictly, and fine-tuned from by
    name without ``--data``: the generated region it was pretrained on is made again, byte for
    byte the one its record names (so the same plots are held out); the result evaluates."""
    from shipped import shipped_checkpoint

    from hfmi_kit.cli import main
    from hfmi_kit.train.provenance import digest

    ckpt, cfg = shipped_checkpoint("carbon.tiny", {"seed": 0, "small": True})
    ft = tmp_path / "ft"
    assert main(["finetune", "carbon", "--from", "carbon.tiny", "--out", str(ft), "--labels", "10", "--steps", "5",
                 "--calibration-folds", "2"]) == 0
    assert "generating the example data carbon.tiny was pretrained on (seed 0)" in capsys.readouterr().out
    made = ft / "data" / "carbon_region"
    assert digest(made) == cfg["reproduce"]["inputs"]["data"]["sha256"]
    assert read_config(ft / "model")["training"]["from"] == str(ckpt)
    assert main(["evaluate", "carbon", "--ckpt", str(ft / "model"), "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert np.isfinite(ev["rmse_mg_ha"]) and ev["rmse_mg_ha"] > 0
