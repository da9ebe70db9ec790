"""Explanations: ``hfmi explain`` of each domain passes the model-randomisation sanity check and
the deletion test on held-out data of the small scorecard's fine-tuned models (real runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hfmi_kit.cli import main
from hfmi_kit.explain import randomization_check, randomized_copy
from hfmi_kit.train import load_pretrained, read_config

pytest.importorskip("captum")


def test_randomization_check_itself():
    a = np.arange(20.0)
    assert not randomization_check(a, a + 0.1).passed  # unchanged ranking: the method ignores the model
    assert randomization_check(a, np.random.default_rng(0).permutation(a)).passed
    # several randomised copies: the mean |rho| is tested, so one copy ranking alike by chance
    # does not fail a method, and a method that ignores the model fails with every copy alike
    perms = [np.random.default_rng(i).permutation(a) for i in range(3)]
    assert not randomization_check(a, [a + 0.1, a * 2, a - 1]).passed
    assert randomization_check(a, perms).passed
    assert not randomization_check(a, [a, a, perms[0]]).passed  # two copies of three rank exactly alike
    net = __import__("torch").nn.Linear(4, 2)
    rnd = randomized_copy(net)
    assert not np.allclose(net.weight.detach().numpy(), rnd.weight.detach().numpy())


def test_materials_element_attributions(small_scorecard, tmp_path):
    from hfmi_kit.domains.materials import explain as ex
    from hfmi_kit.domains.materials import load_property_csv

    ckpt = small_scorecard / "runs" / "materials" / "pretrained_n150_s0" / "model"
    rec = _explain("materials", ckpt, tmp_path, "--data", str(small_scorecard / "data" / "expt.csv"))
    assert rec["unit"] == "composition" and rec["examples"] == 150
    table = load_property_csv(small_scorecard / "data" / "expt.csv")
    trained = set(read_config(ckpt)["training"]["formulas"])
    assert rec["held_out"] == len(table) - len(trained & set(table.reduced)) < len(table)  # training ones left out
    (att,) = ex.explain_formulas(load_pretrained(ckpt).eval(), ["CdTe"])
    assert set(att) == {"Cd", "Te"} and all(np.isfinite(v) for v in att.values())


def _explain(domain: str, ckpt: Path, out: Path, *extra: str) -> dict:
    """``hfmi explain`` of a fine-tuned checkpoint; its explanation.json, after checking
    importance.csv holds the same shares."""
    assert main(["explain", domain, "--ckpt", str(ckpt), "--out", str(out), *extra]) == 0
    rec = json.loads((out / "explanation.json").read_text())
    csv = pd.read_csv(out / "importance.csv")
    assert dict(zip(csv["input"], csv["share"])) == pytest.approx(rec["importance"], rel=1e-5)
    assert abs(sum(rec["importance"].values()) - 1) < 1e-6 and all(v >= 0 for v in rec["importance"].values())
    assert rec["domain"] == domain and rec["held_out"] >= rec["examples"] >= 1
    for c in rec["checks"]:  # model randomisation and deletion, each with its figure
        assert c["passed"], c
    assert [c["name"] for c in rec["checks"]] == ["model randomisation", "deletion"] and rec["passed"]
    return rec


def test_carbon_source_attributions(small_scorecard, tmp_path):
    rec = _explain("carbon", small_scorecard / "runs" / "carbon" / "pretrained_n30_s0" / "model", tmp_path)
    assert set(rec["importance"]) == {"optical", "radar", "lidar"} and rec["unit"] == "tile"
    assert sum(rec["detail"][f"{s}_mg_ha"] for s in ("optical", "radar", "lidar")) > 0


def test_climate_forecast_attributions(small_scorecard, tmp_path):
    ckpt = small_scorecard / "runs" / "climate" / "pretrained_n1_s0" / "model"
    rec = _explain("climate", ckpt, tmp_path)
    assert set(rec["importance"]) == set(read_config(ckpt)["geometry"]["state_variables"])
    assert "tas" in rec["question"] and rec["examples"] == 4
    assert 0 <= rec["detail"]["tropics_share"] <= 1 and rec["detail"]["self_share"] == rec["importance"]["tas"]


def test_radiology_voxel_attributions(small_scorecard, tmp_path):
    ckpt = small_scorecard / "runs" / "radiology" / "pretrained_n3_s0" / "model"
    rec = _explain("radiology", ckpt, tmp_path, "--data", str(small_scorecard / "data" / "radiology_study"))
    assert set(rec["importance"]) == set(read_config(ckpt)["geometry"]["modalities"]) and rec["examples"] == 2
    # the tumour evidence is attributed to the lesion far above its share of the crop's voxels
    assert rec["detail"]["inside_tumour_share"] > 5 * rec["detail"]["tumour_voxel_share"], rec["detail"]


def test_explain_refuses_what_it_cannot_explain(small_scorecard, tmp_path, capsys):
    runs = small_scorecard / "runs"
    for args, msg in (
            (["materials", "--ckpt", str(runs / "materials" / "pretrain" / "model")],
             "not a fine-tuned materials model (task 'pretrain'"),
            (["climate", "--ckpt", str(runs / "carbon" / "pretrained_n10_s0" / "model")],
             "a 'carbon' checkpoint, not a climate one"),
            (["climate", "--ckpt", str(runs / "climate" / "pretrained_n1_s0" / "model"), "--variable", "zg"],
             "the model forecasts ['siconc', 'tas', 'tos'], not 'zg'"),
            (["carbon", "--ckpt", str(runs / "carbon" / "pretrained_n10_s0" / "model"), "--variable", "tas"],
             "variable is not an option of the carbon explanation"),
            (["carbon", "--ckpt", str(runs / "carbon" / "pretrained_n10_s0" / "model"), "--examples", "0"],
             "examples must be at least 1")):
        assert main(["explain", *args, "--out", str(tmp_path / "x")]) == 1
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()  # nothing written for a refused request
