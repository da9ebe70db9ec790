"""Shared fixtures: small generated climate data and one tiny pretrain + fine-tune per session.

The suite runs on ``-n auto`` pytest-xdist workers (pyproject), each test file as one unit, so
module fixtures are built once; the small scorecard, shared by three files, is built once per run
under a file lock (see :func:`shared_dir`). Each worker gets its share of the cores for torch.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HFMI_TEST", "1")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_THREADS)
if _WORKERS > 1:  # and for the processes tests start (kernels, CLI runs, torchrun, SLURM jobs): more
    # OpenMP threads than cores across workers make them spin-wait on each other, many times slower
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = str(_THREADS)

REPO = Path(__file__).resolve().parents[1]
# xdist hands out whole files in collection order: the longest first, and the other users of the
# shared scorecard last, so that no worker sits waiting for its lock
_FIRST = ("test_dashboard.py", "test_notebooks.py", "test_slurm.py")
_LAST = ("test_explain.py", "test_scorecard.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the test files for the xdist workers (see ``_FIRST`` and ``_LAST``); stable otherwise."""
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _FIRST.index(name) if name in _FIRST else len(_FIRST) + 1 if name in _LAST else len(_FIRST)

    items.sort(key=rank)


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``name`` under the run's base temporary directory, made by ``build`` once for all xdist
    workers (the first to take the lock builds it; the others wait, then reuse it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    out = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / f"{name}.done").exists():
                shutil.rmtree(out, ignore_errors=True)  # what a failed build by another worker left
                build(out)
                (root / f"{name}.done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


@pytest.fixture(scope="session")
def climate_zarr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hfmi_kit.domains.climate import GeneratorConfig, generate, write_dataset

    out = tmp_path_factory.mktemp("climate")
    return write_dataset(generate(GeneratorConfig(years=10, spinup_years=8, seed=3)), out / "climate.zarr")


@pytest.fixture(scope="session")
def climate_runs(climate_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny pretrain (120 steps) and fine-tune (40 steps) through the CLI, at batch 4 (at the
    default 16 the same runs take 3x as long and learn as much: next-step loss 0.013 against 0.018
    of persistence's, lead-1 RMSE 0.493 K either way, persistence 1.66 K)."""
    from hfmi_kit.cli import main

    root = tmp_path_factory.mktemp("climate_runs")
    assert main(["pretrain", "climate", "--data", str(climate_zarr), "--out", str(root / "pre"),
                 "--steps", "120", "--seed", "0", "--batch-size", "4"]) == 0
    assert main(["finetune", "climate", "--from", str(root / "pre" / "model"), "--data", str(climate_zarr),
                 "--out", str(root / "ft"), "--steps", "40", "--batch-size", "4"]) == 0
    return {"data": climate_zarr, "pre": root / "pre", "ft": root / "ft", "root": root}


@pytest.fixture(scope="session")
def small_scorecard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``hfmi scorecard --budget small`` of every domain (3 seeds), plus the what-if and discovery
    runs the 03 notebooks write: the results directory the dashboard tests open too."""
    from hfmi_kit.cli import main
    from hfmi_kit.viz.examples import add_extras

    def build(out: Path) -> None:
        assert main(["scorecard", "--budget", "small", "--out", str(out)]) == 0
        add_extras(out)

    return shared_dir(tmp_path_factory, "scorecard_results", build)
