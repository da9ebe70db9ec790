"""Shared fixtures: small generated climate data and one tiny pretrain + fine-tune per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HFMI_TEST", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def climate_zarr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hfmi_kit.domains.climate import GeneratorConfig, generate, write_dataset

    out = tmp_path_factory.mktemp("climate")
    return write_dataset(generate(GeneratorConfig(years=10, spinup_years=8, seed=3)), out / "climate.zarr")


@pytest.fixture(scope="session")
def climate_runs(climate_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny pretrain (120 steps) and fine-tune (120 steps) through the CLI."""
    from hfmi_kit.cli import main

    root = tmp_path_factory.mktemp("climate_runs")
    assert main(["pretrain", "climate", "--data", str(climate_zarr), "--out", str(root / "pre"),
                 "--steps", "120", "--seed", "0"]) == 0
    assert main(["finetune", "climate", "--from", str(root / "pre" / "model"), "--data", str(climate_zarr),
                 "--out", str(root / "ft"), "--steps", "120"]) == 0
    return {"data": climate_zarr, "pre": root / "pre", "ft": root / "ft", "root": root}


@pytest.fixture(scope="session")
def small_scorecard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``hfmi scorecard --budget small`` of every domain (3 seeds), plus the what-if and discovery
    runs the 03 notebooks write: the results directory the dashboard tests open too."""
    from hfmi_kit.cli import main
    from hfmi_kit.viz.examples import add_extras

    out = tmp_path_factory.mktemp("scorecard") / "results"
    assert main(["scorecard", "--budget", "small", "--out", str(out)]) == 0
    add_extras(out)
    return out
