"""Explanations: each method passes the model-randomisation sanity check and the deletion test
on the small scorecard's fine-tuned models (real runs)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hfmi_kit.explain import randomization_check, randomized_copy
from hfmi_kit.train import load_pretrained

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


def test_materials_element_attributions(small_scorecard):
    from hfmi_kit.domains.materials import chem, load_property_csv
    from hfmi_kit.domains.materials import explain as ex

    model = load_pretrained(small_scorecard / "runs" / "materials" / "pretrained_n150_s0" / "model").eval()
    table = load_property_csv(small_scorecard / "data" / "expt.csv")
    arrays = chem.encode(table.parsed[:150])
    for c in ex.checks(model, arrays):
        assert c.passed, c
    (att,) = ex.explain_formulas(model, ["CdTe"])
    assert set(att) == {"Cd", "Te"} and all(np.isfinite(v) for v in att.values())


def test_carbon_source_attributions(small_scorecard):
    from hfmi_kit.domains.carbon import explain as ex
    from hfmi_kit.domains.carbon.tasks import prepare

    model = load_pretrained(small_scorecard / "runs" / "carbon" / "pretrained_n30_s0" / "model").eval()
    prep = prepare(small_scorecard / "data" / "carbon_region", tile=model.tile, groups=model.groups)
    batch = ex.tiles(prep, model, n=6)
    for c in ex.checks(model, batch):
        assert c.passed, c
    src = ex.source_attributions(model, batch)
    assert set(src) == {"optical", "radar", "lidar"} and all(v >= 0 for v in src.values())
    assert pd.Series(src).sum() > 0


def test_climate_forecast_attributions(small_scorecard):
    from hfmi_kit.domains.climate import explain as ex

    model, batch = ex.samples(small_scorecard / "runs" / "climate" / "pretrained_n1_s0" / "model",
                              small_scorecard / "data" / "climate.zarr", n=4)
    for c in ex.checks(model, batch, var="tas"):
        assert c.passed, c
    share, amap = ex.importance(model, batch, var="tas")
    assert set(share) == set(model.variables) and abs(sum(share.values()) - 1) < 1e-6
    assert amap.shape == tuple(model.tokenizer.grid) and np.isfinite(amap).all()


def test_radiology_voxel_attributions(small_scorecard):
    from hfmi_kit.domains.radiology import explain as ex

    model, image, mask = ex.crops(small_scorecard / "runs" / "radiology" / "pretrained_n3_s0" / "model",
                                  small_scorecard / "data" / "radiology_study", n=2)
    assert image.shape[0] == 2 and mask.sum() > 0
    for c in ex.checks(model, image, mask):
        assert c.passed, c
