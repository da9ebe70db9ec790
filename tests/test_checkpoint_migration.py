"""Checkpoints written by an older hfmi_kit still load: config schema 1 (committed, written at
fa16eb5) and schema 2 (b1e5c3c) are migrated to the current schema; the schema-1 ensemble
predicts exactly as it did."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hfmi_kit.train.pretrained import SCHEMA_VERSION, ModelConfig, migrate_config, read_config, save_pretrained

V1 = Path(__file__).parent / "data" / "checkpoints_v1"
V2 = Path(__file__).parent / "data" / "checkpoints_v2"


def test_a_schema_1_materials_ensemble_loads_and_predicts_as_it_did(tmp_path):
    from hfmi_kit.domains.materials.tasks import load_ensemble, predict_table

    ck = tmp_path / "v1"
    shutil.copytree(V1 / "materials_band_gap", ck)
    raw = json.loads((ck / "config.json").read_text())
    assert raw["schema_version"] == 1 and "uncertainty_scale" in raw["geometry"]
    cfg = read_config(ck)
    assert cfg["schema_version"] == SCHEMA_VERSION
    assert cfg["processors"]["calibration"]["uncertainty_scale"] == raw["geometry"]["uncertainty_scale"]
    assert "uncertainty_scale" not in cfg["geometry"]
    model, _ = load_ensemble(ck)
    assert len(model.members) == 1
    expected = json.loads((ck / "expected_predictions.json").read_text())
    got = predict_table(ck, [r["formula"] for r in expected])
    np.testing.assert_allclose(got["prediction_ev"], [r["prediction_ev"] for r in expected], atol=2e-6)
    # the recalibration (x2.0) reaches the uncertainty: without it the numbers would halve
    np.testing.assert_allclose(got["uncertainty_ev"], [r["uncertainty_ev"] for r in expected], atol=2e-6)


def test_a_schema_1_carbon_config_keeps_its_interval_calibration():
    raw = json.loads((V1 / "carbon_biomass" / "config.json").read_text())
    cfg = migrate_config(raw)
    assert cfg["processors"]["calibration"] == raw["calibration"] and "calibration" not in cfg
    assert cfg["geometry"] == raw["geometry"] and cfg["schema_version"] == SCHEMA_VERSION


def test_a_migrated_config_saved_again_reads_back_unchanged(tmp_path):
    import torch

    raw = json.loads((V1 / "carbon_biomass" / "config.json").read_text())
    mc = ModelConfig.from_dict(migrate_config(raw))
    assert mc.family == "carbon_net" and mc.size == "tiny" and mc.processors["calibration"]["width_factor"] > 0
    path = save_pretrained(torch.nn.Linear(2, 2), tmp_path / "m", config=mc)
    again = read_config(path)
    assert ModelConfig.from_dict(again) == mc


def test_a_config_newer_than_the_code_is_refused(tmp_path):
    from hfmi_kit.errors import CheckpointError

    with pytest.raises(CheckpointError, match="newer than this hfmi_kit"):
        migrate_config({"schema_version": SCHEMA_VERSION + 1})


def test_a_recorded_run_writes_its_config_once_with_the_record(tmp_path, monkeypatch):
    import torch

    from hfmi_kit.train import provenance

    @provenance.recorded("migrationtest", "finetune")
    def task(*, data: str, out: str, seed: int = 0) -> dict:
        save_pretrained(torch.nn.Linear(2, 2), Path(out) / "model",
                        config=ModelConfig(domain="migrationtest", task="t", model_type="x.tiny"))
        return {}

    def refuse(*a, **k):
        raise AssertionError("config.json rewritten after the run")

    monkeypatch.setattr(provenance, "update_config", refuse)
    (tmp_path / "d.csv").write_text("a\n1\n")
    try:
        task(data=str(tmp_path / "d.csv"), out=str(tmp_path / "run"), seed=3)
    finally:
        provenance.ENTRY_POINTS.pop("migrationtest.finetune", None)
    rec = read_config(tmp_path / "run" / "model")["reproduce"]
    assert rec["entry"] == "migrationtest.finetune" and rec["kwargs"] == {"data": str(tmp_path / "d.csv"), "seed": 3}
    assert "How to reproduce" in (tmp_path / "run" / "model" / "MODEL_CARD.md").read_text()


def test_a_schema_2_climate_config_keeps_its_normalisation_among_the_processors(tmp_path):
    from hfmi_kit.domains.climate.tasks import _check_climate_config, predictor

    raw = json.loads((V2 / "climate_seaice" / "config.json").read_text())
    assert raw["schema_version"] == 2 and "normalisation" in raw["geometry"]
    cfg = migrate_config(raw)
    assert cfg["processors"]["normalisation"] == raw["geometry"]["normalisation"]
    assert cfg["processors"]["target_normalisation"] == raw["processors"]["target_normalisation"]
    assert "normalisation" not in cfg["geometry"] and cfg["schema_version"] == SCHEMA_VERSION
    _check_climate_config(cfg, V2 / "climate_seaice")  # what every climate command reads first
    import torch

    pred = predictor(torch.nn.Linear(1, 1), cfg)  # its normalisation round-trips physical values
    st = cfg["processors"]["normalisation"]["tas"]
    x = torch.full((2, 1, 3, 4), 0.5)
    back = pred.denormalise(x, ["tas"])["tas"]
    assert back.shape == (2, 3, 4) and np.allclose(back, 0.5 * st["std"] + st["mean"])
