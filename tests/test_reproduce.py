"""Reproduction from a model card: the record a run leaves, ``hfmi reproduce`` matching the card
on CPU, and what it says when an input or a metric differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hfmi_kit.cli import main
from hfmi_kit.errors import CheckpointError
from hfmi_kit.train import read_config
from hfmi_kit.train.provenance import digest, reproduce


@pytest.fixture(scope="module")
def tiny(climate_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repro")
    data = root / "climate.zarr"
    shutil.copytree(climate_zarr, data)  # a copy this test may change
    assert main(["pretrain", "climate", "--data", str(data), "--out", str(root / "pre"), "--steps", "8",
                 "--seed", "1"]) == 0
    assert main(["finetune", "climate", "--from", str(root / "pre" / "model"), "--data", str(data), "--out",
                 str(root / "ft"), "--steps", "8", "--seed", "2", "--label-fraction", "0.5"]) == 0
    return {"root": root, "data": data, "pre": root / "pre" / "model", "ft": root / "ft" / "model"}


def test_a_run_records_what_reproduces_it(tiny):
    cfg = read_config(tiny["ft"])
    rec = cfg["reproduce"]
    assert rec["function"] == "hfmi_kit.domains.climate.tasks.finetune" and rec["command"] == "finetune"
    assert rec["kwargs"]["seed"] == 2 and rec["kwargs"]["label_fraction"] == 0.5 and rec["kwargs"]["steps"] == 8
    assert rec["inputs"]["data"]["sha256"] == digest(tiny["data"])
    assert rec["inputs"]["ckpt"]["sha256"] == digest(tiny["pre"] / "model.safetensors")
    assert cfg["code_version"] and cfg["environment"]["torch"]
    card = (tiny["ft"] / "MODEL_CARD.md").read_text()
    assert "## How to reproduce" in card and "hfmi reproduce" in card and rec["inputs"]["data"]["sha256"][:16] in card


def test_reproduce_matches_the_card_to_the_printed_digits(tiny, tmp_path, capsys):
    assert main(["reproduce", str(tiny["pre"]), "--out", str(tmp_path / "pre")]) == 0
    assert main(["reproduce", str(tiny["ft"]), "--out", str(tmp_path / "ft")]) == 0
    out = capsys.readouterr().out
    assert "every metric matches the model card" in out and "| rmse |" in out
    rep = json.loads((tmp_path / "ft" / "reproduction.json").read_text())
    assert rep["matches"] and len(rep["metrics"]) > 20
    assert all(r["difference"] == 0.0 for r in rep["metrics"]), [r for r in rep["metrics"] if r["difference"]]


def test_reproduce_reports_changed_inputs_and_differing_metrics(tiny, tmp_path, capsys):
    # a metric the card claims but the run does not give: reported, exit 3
    fake = tmp_path / "fake"
    shutil.copytree(tiny["pre"], fake)
    cfg = json.loads((fake / "config.json").read_text())
    cfg["metrics"]["train_loss"] += 0.01
    (fake / "config.json").write_text(json.dumps(cfg))
    assert main(["reproduce", str(fake), "--out", str(tmp_path / "r1")]) == 3
    out = capsys.readouterr().out
    assert "| train_loss |" in out and "NO" in out and "1 of" in out
    # a changed data file: refused with the input named, or run and reported when allowed
    attrs = tiny["data"] / ".zattrs"
    z = json.loads(attrs.read_text())
    z["history"] = str(z.get("history", "")) + "; edited after training"
    attrs.write_text(json.dumps(z))
    assert main(["reproduce", str(tiny["pre"]), "--out", str(tmp_path / "r2")]) == 1
    assert "data:" in capsys.readouterr().err
    rep = reproduce(tiny["pre"], tmp_path / "r3", allow_changed_inputs=True)
    assert rep.input_changes and "changed" in rep.input_changes[0]
    with pytest.raises(CheckpointError, match="no reproduction record"):
        c = json.loads((fake / "config.json").read_text())
        del c["reproduce"]
        (fake / "config.json").write_text(json.dumps(c))
        reproduce(fake, tmp_path / "r4")
