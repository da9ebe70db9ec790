"""Resume from the command line, as a cluster kill leaves it: ``hfmi pretrain`` in a subprocess is
SIGKILLed after a mid-run step checkpoint, resumed with ``--resume`` in a new process, and every
tensor of the final model is compared bit for bit with an uninterrupted run of the same seed
(climate, carbon, and climate under ``--nproc 2``).

The climate runs checkpoint at the end of an epoch on purpose: there, the resumed loader used to
see only the samples the epoch's last, dropped, partial batch holds and trained on them (8 of 95
tensors equal after 40 steps).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def hfmi(*args: str) -> list[str]:
    return [sys.executable, "-m", "hfmi_kit.cli", *args]


def run_to_end(args: list[str], timeout: int = 600) -> None:
    r = subprocess.run(hfmi(*args), env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]


def kill_after_first_checkpoint(args: list[str], out: Path, timeout: int = 600) -> int:
    """Start the command in its own process group, SIGKILL the group as soon as a step checkpoint
    is complete (``checkpoints/latest`` written); return that checkpoint's step."""
    p = subprocess.Popen(hfmi(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + timeout
    try:
        while not latest.is_file() and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # no handler, no cleanup, every process of the run
        p.wait(timeout=60)
    assert latest.is_file(), p.stderr.read().decode()[-3000:] if p.stderr else "no checkpoint written"
    assert not (out / "model").exists(), "the run finished before it was killed"
    return int(latest.read_text().strip().split("-")[1])


def straight_then_killed_then_resumed(common: list[str], tmp: Path, every: int, steps: int) -> None:
    """Run ``common`` to the end; run it again, SIGKILL it after a checkpoint, resume it: the same weights."""
    run_to_end([*common, "--out", str(tmp / "straight")])
    killed = tmp / "killed"
    step = kill_after_first_checkpoint([*common, "--out", str(killed)], killed)
    assert every <= step < steps
    run_to_end([*common, "--out", str(killed), "--resume"])
    assert_bit_equal(tmp / "straight" / "model", killed / "model")


def assert_bit_equal(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb)
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ: {differ[:5]}"


@pytest.fixture(scope="module")
def carbon_region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hfmi_kit.domains import get_domain

    return get_domain("carbon").example_data(tmp_path_factory.mktemp("carbon"), seed=0)


def climate_batches_per_epoch(store: Path, batch: int, ranks: int = 1) -> int:
    """Full batches per epoch of ``hfmi pretrain climate`` (context 2) on each of ``ranks`` processes."""
    from hfmi_kit.domains.climate import data as cdata

    d = cdata.load_climate(store)
    split = cdata.split_years(d)
    tens = cdata.to_tensors(d, cdata.Normaliser(cdata.compute_stats(store, d, time_index=split.train)))
    n = len(cdata.ForecastWindows(tens, split.train, context=2))
    per_rank = -(-n // ranks)
    assert per_rank % batch, "the epoch must end in a partial batch for this test to mean something"
    return per_rank // batch


@pytest.mark.parametrize("domain", ["climate", "carbon"])
def test_sigkill_after_a_mid_run_checkpoint_then_resume_is_bit_exact(domain, climate_zarr, carbon_region, tmp_path):
    data = climate_zarr if domain == "climate" else carbon_region
    every = climate_batches_per_epoch(climate_zarr, 8) if domain == "climate" else 6  # climate: at an epoch's end
    steps = every + 3
    common = ["pretrain", domain, "--data", str(data), "--config", "tiny", "--steps", str(steps), "--batch-size",
              "8", "--checkpoint-every", str(every), "--seed", "3"]
    straight_then_killed_then_resumed(common, tmp_path, every, steps)


def test_sigkill_of_a_two_process_run_then_resume_on_two_processes_is_bit_exact(climate_zarr, tmp_path):
    every = climate_batches_per_epoch(climate_zarr, 8, ranks=2)  # each rank's epoch ends at a checkpoint
    steps = every + 3
    common = ["pretrain", "climate", "--data", str(climate_zarr), "--config", "tiny", "--steps", str(steps),
              "--batch-size", "8", "--checkpoint-every", str(every), "--seed", "5", "--nproc", "2"]
    straight_then_killed_then_resumed(common, tmp_path, every, steps)


def test_sigkill_of_radiology_pretraining_from_a_store_in_workers_then_resume_is_bit_exact(tmp_path):
    """The patch stream of a volume store (crops read by two DataLoader workers) resumes at the same crop."""
    pytest.importorskip("zarr")
    pytest.importorskip("nibabel")
    from hfmi_kit.domains.radiology import StudyConfig, generate_study
    from hfmi_kit.domains.radiology import store as rstore

    study = generate_study(tmp_path / "study", StudyConfig(unlabelled=2, labelled=1, spacing_scale=1.8, seed=2,
                                                            dicom_subject=None))
    store = rstore.prepare(sources=[study], out=tmp_path / "study.zarr", chunk=16, progress=False)
    common = ["pretrain", "radiology", "--data", str(store), "--steps", "9", "--batch-size", "2", "--crop", "16",
              "--workers", "2", "--checkpoint-every", "6", "--seed", "4"]
    straight_then_killed_then_resumed(common, tmp_path, 6, 9)
