"""Pre-flight: ``hfmi plan`` (memory and time before a run; says when it will not fit), its
memory estimate against the measured peak of real training runs (tiny and base, CPU, and the
GPU where there is one, within 20 %), and ``hfmi preflight`` (the notebook with tiny
parameters, then the submit command)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hfmi_kit.cli import main
from hfmi_kit.launch.plan import parse_memory, plan

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_plan_accounts_memory_by_strategy_and_says_when_it_does_not_fit(capsys):
    ddp = plan("1b", tokens=4096, batch_per_device=16, devices=8, device_memory_gb=40)
    fsdp = plan("1b", tokens=4096, batch_per_device=16, devices=8, device_memory_gb=40, strategy="fsdp",
                activation_checkpointing=True)
    assert 0.95e9 < ddp.params < 1.1e9
    assert not ddp.fits and fsdp.fits and fsdp.total_memory < ddp.total_memory / 4
    # weights + grads + AdamW: 16 bytes per parameter, sharded 8 ways under FSDP
    states = sum(v for k, v in fsdp.memory.items() if k.startswith(("weights", "gradients", "AdamW")))
    assert states == pytest.approx(16 * fsdp.params / 8)
    assert ddp.flops_per_sample == fsdp.flops_per_sample and ddp.steps == -(-10**6 // (16 * 8))
    # the optimiser step is the peak when the gradients and AdamW's foreach temporary outweigh the activations
    small = dict(tokens=64, batch_per_device=1, devices=1, dtype="fp32")
    fused, foreach = plan("base", optimizer="fused", **small), plan("base", optimizer="foreach", **small)
    assert foreach.memory["activations"] < foreach.memory["gradients (fp32)"]
    # at the step: weights, gradients, two moments and the temporary, 20 bytes per parameter
    assert foreach.total_memory == pytest.approx(20 * foreach.params) and fused.total_memory < 17 * fused.params
    big = dict(tokens=4096, batch_per_device=16, devices=1, dtype="fp32")
    assert plan("base", optimizer="foreach", **big).total_memory == plan("base", optimizer="fused", **big).total_memory
    with pytest.raises(Exception, match="optimizer must be"):
        plan("tiny", tokens=64, optimizer="sgd")
    assert main(["plan", "1b", "--gpus", "8", "--gpu-memory", "40GB", "--tokens", "4096", "--batch-size", "16"]) == 2
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "--strategy fsdp" in out
    assert main(["plan", "tiny", "--gpus", "1", "--gpu-memory", "16GB"]) == 0
    assert "FITS" in capsys.readouterr().out
    assert parse_memory("80GB") == 80 and parse_memory("1TB") == 1024 and parse_memory("512MiB") == 0.5
    with pytest.raises(Exception, match="memory size"):
        parse_memory("lots")


# benchmarks/plan_memory.py runs more. base at batch 2 with the GPU's default foreach update peaks at the
# optimiser step; with activation checkpointing at the end of the backward; fsdp2 is two gloo processes
@pytest.mark.parametrize("run", ["tiny:32", "base:4", "small:2:foreach", "small:8:ac", "small:4:fsdp2"])
def test_planned_memory_matches_the_measured_peak_within_20_percent(run):
    from plan_memory import measure, parse_run

    kw = parse_run(run)
    r = measure(kw.pop("size"), **kw)
    assert 0.8 <= r["ratio"] <= 1.2, (run, r["measured"] / 2**20, r["predicted"] / 2**20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU in this session")
@pytest.mark.parametrize("run", ["tiny:32", "base:4", "base:16", "base:16:ac"])
def test_planned_memory_matches_the_measured_gpu_peak_within_20_percent(run):
    from plan_memory import measure, parse_run

    kw = parse_run(run)
    r = measure(kw.pop("size"), device="cuda", **kw)
    assert 0.8 <= r["ratio"] <= 1.2, (run, r["measured"] / 2**20, r["predicted"] / 2**20)


def test_preflight_runs_the_notebook_tiny_and_prints_the_submit_command(capsys):
    nb = REPO / "notebooks" / "climate" / "01_pretrain.py"
    assert main(["preflight", str(nb), "-p", "steps", "5000", "-p", "years", "6", "-p", "variables",
                 "[tas, tos, siconc, rsdt]", "--partition", "gpu", "--gpus-per-node", "4", "--time", "12:00:00"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint written and loadable" in out
    assert "hfmi submit" in out and "steps 5000" in out and "--gpus-per-node 4" in out
