"""Scale-out on the CPU with gloo: one process, 2-process DDP and 2-process FSDP2 reach the same
losses; sharded (DCP) checkpoints resume on another number of processes and convert offline to
the single-file form; a pre-emption signal checkpoints and the rerun resumes; a kill -9 in the
middle of writing a checkpoint resumes from the last complete one, bit-exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

JOB = str(Path(__file__).with_name("dist_job.py"))
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def run(out: Path, *, nproc: int = 1, env: dict[str, str] | None = None, args: tuple[str, ...] = ("train",),
        timeout: int = 300) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, JOB, args[0], str(out), *args[1:]]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    single = run(root / "single", env={"BS": "16"})
    ddp = run(root / "ddp", nproc=2, env={"BS": "8", "HFMI_STRATEGY": "ddp"})
    fsdp = run(root / "fsdp", nproc=2, env={"BS": "8", "HFMI_STRATEGY": "fsdp"})
    for name, r in (("single", single), ("ddp", ddp), ("fsdp", fsdp)):
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
    return root


def test_ddp_and_fsdp_reach_the_single_process_losses(runs):
    res = {k: json.loads((runs / k / "losses.json").read_text()) for k in ("single", "ddp", "fsdp")}
    assert res["ddp"]["world_size"] == 2 and res["fsdp"]["sharded"] and not res["ddp"]["sharded"]
    base = res["single"]["losses"]
    assert len(base) == 40 and res["single"]["final_loss"] < 0.5 * base[0]  # it learned
    for k in ("ddp", "fsdp"):
        # the same global batches: per-step losses agree to float round-off, not just at the end
        assert res[k]["losses"] == pytest.approx(base, rel=1e-4, abs=1e-6), k
        assert res[k]["final_loss"] == pytest.approx(res["single"]["final_loss"], rel=1e-4)
    # weights: AdamW's normalised steps amplify round-off in near-zero gradients to ~1e-3 after 40 steps
    w1 = weights(runs / "single" / "model")
    for k in ("ddp", "fsdp"):
        wk = weights(runs / k / "model")
        assert set(w1) == set(wk) and max(float((w1[n] - wk[n]).abs().max()) for n in w1) < 5e-3, k


def test_sharded_checkpoints_convert_offline_and_resume_on_one_process(runs, tmp_path):
    ck = runs / "fsdp" / "checkpoints"
    last = ck / (ck / "latest").read_text().strip()
    assert (last / "sharded").is_dir() and not (last / "model.safetensors").exists()
    assert json.loads((last / "config.json").read_text())["checkpoint_format"] == "dcp-sharded"
    r = run(tmp_path / "converted", args=("convert", str(last)))
    assert r.returncode == 0, r.stderr[-3000:]
    conv, final = weights(tmp_path / "converted"), weights(runs / "fsdp" / "model")
    assert all(torch.equal(conv[k], final[k]) for k in final)  # the step-40 shards are the final model
    from hfmi_kit.train import load_pretrained

    sys.path.insert(0, str(Path(JOB).parent))
    import dist_job  # noqa: F401  (registers toy_net)

    assert load_pretrained(tmp_path / "converted") is not None
    # a 2-process FSDP checkpoint of step 20 resumes in one process and finishes the run
    work = tmp_path / "resume"
    (work / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(ck / "step-00000020", work / "checkpoints" / "step-00000020")
    (work / "checkpoints" / "latest").write_text("step-00000020\n")
    r = run(work, env={"BS": "16", "RESUME": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((work / "losses.json").read_text())
    single = json.loads((runs / "single" / "losses.json").read_text())
    assert len(res["losses"]) == 20  # steps 21..40 only
    assert res["final_loss"] == pytest.approx(single["final_loss"], rel=1e-3)


def test_preemption_signal_checkpoints_and_the_rerun_resumes_bit_exact(runs, tmp_path):
    out = tmp_path / "pre"
    e = {"SLOW": "0.01", "CKPT_EVERY": "1000"}
    p = subprocess.Popen([sys.executable, JOB, "train", str(out)], env={**os.environ, "OMP_NUM_THREADS": "1", **e},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        f = out / "metrics.jsonl"
        if f.is_file() and len(f.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 85, err[-2000:]  # checkpointed; asks to be requeued
    assert "SIGUSR1 received" in err
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped = int(latest.split("-")[1])
    assert 5 <= stopped < 40
    r = run(out, env={**e, "RESUME": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = weights(out / "model"), weights(runs / "single" / "model")
    assert all(torch.equal(a[k], b[k]) for k in b)  # the same weights as the uninterrupted run


def test_kill9_while_writing_a_checkpoint_resumes_from_the_last_complete_one(runs, tmp_path):
    out = tmp_path / "k9"
    marker = tmp_path / "k9.stalled"
    p = subprocess.Popen([sys.executable, JOB, "train", str(out)],
                         env={**os.environ, "OMP_NUM_THREADS": "1", "STALL_ON_SAVE": "2"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the second checkpoint write never started"
    p.kill()  # SIGKILL: no handler, no cleanup
    p.communicate(timeout=60)
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-00000010"  # the complete one
    assert not (ck / "step-00000020").exists() and list(ck.glob(".step-00000020.tmp-*"))  # half-written, aside
    r = run(out, env={"RESUME": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(ck.glob(".step-*.tmp-*"))  # the leftovers were cleared on resume
    a, b = weights(out / "model"), weights(runs / "single" / "model")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_preemption_request_file_stops_the_run_like_a_signal(tmp_path):
    # what the SLURM script does: it cannot signal papermill kernels behind torchrun, so it creates
    # the file HFMI_PREEMPT_FILE names, and every training process checks for it after each step
    flag = tmp_path / "preempt"
    p = subprocess.Popen([sys.executable, JOB, "train", str(tmp_path / "run")],
                         env={**os.environ, "OMP_NUM_THREADS": "1", "SLOW": "0.01", "HFMI_PREEMPT_FILE": str(flag)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").is_file():
        time.sleep(0.05)
    flag.touch()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 85 and "pre-emption request" in err, err[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_hfmi_pretrain_with_nproc_and_fsdp_then_convert(tmp_path):
    from hfmi_kit.domains.climate import GeneratorConfig, generate, write_dataset

    data = write_dataset(generate(GeneratorConfig(years=5, spinup_years=2, seed=0)), tmp_path / "c.zarr")
    out = tmp_path / "pre"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "pretrain", "climate", "--data", str(data), "--out",
                        str(out), "--steps", "6", "--batch-size", "4", "--nproc", "2", "--strategy", "fsdp"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from hfmi_kit.train import load_pretrained, read_config

    assert read_config(out / "model")["domain"] == "climate" and load_pretrained(out / "model") is not None
    assert json.loads((out / "metrics.json").read_text())["train_loss"] > 0
    step = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert (step / "sharded").is_dir()
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "convert", str(step), "--out", str(tmp_path / "conv")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(tmp_path / "conv"), weights(out / "model")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)  # the last step is the final model


def test_a_sharded_checkpoint_cannot_run_code_when_loaded(runs, tmp_path):
    import pickle
    import shutil

    ck = runs / "fsdp" / "checkpoints"
    bad = tmp_path / "step"
    shutil.copytree(ck / (ck / "latest").read_text().strip(), bad)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (bad / "sharded" / ".metadata").write_bytes(pickle.dumps(Evil()))
    r = run(tmp_path / "out", args=("convert", str(bad)))
    assert r.returncode != 0 and "unsafe checkpoint metadata" in r.stderr and "refusing posix.system" in r.stderr
    assert not marker.exists()


def test_ddp_stopped_part_way_resumes_exactly(runs, tmp_path):
    # two processes stop at step 17 (mid-epoch, between checkpoints), a new pair resumes: the same
    # weights as the uninterrupted 2-process run, bit for bit (sampler position, RNG per rank)
    env = {"BS": "8", "HFMI_STRATEGY": "ddp"}
    r = run(tmp_path / "d", nproc=2, env={**env, "UNTIL": "17"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "d" / "checkpoints" / "latest").read_text().strip() == "step-00000017"
    r = run(tmp_path / "d", nproc=2, env={**env, "RESUME": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(tmp_path / "d" / "model"), weights(runs / "ddp" / "model")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_two_nodes_meet_through_the_batch_scripts_rendezvous(runs, tmp_path):
    """Two torchrun agents, one per "node" (both on this machine), started with the flags the
    SLURM batch script gives ``srun`` for ``--nodes 2``, meet through the c10d rendezvous on the
    head node and train like the 2-process DDP run (the same global batches, the same losses)."""
    import shlex
    import socket

    from hfmi_kit.launch.slurm import SlurmJob, batch_script

    script = batch_script(SlurmJob(notebook="notebooks/climate/01_pretrain.py", nodes=2), "run nb.py")
    line = next(x for x in script.splitlines() if x.startswith("srun "))
    flags = shlex.split(line.split("torch.distributed.run", 1)[1].split(" -m hfmi_kit.cli", 1)[0])
    assert "--nnodes=2" in flags and "--rdzv-backend=c10d" in flags
    # the head node as the script finds it from SLURM_JOB_NODELIST (here the one local node)
    head_line = next(x for x in script.splitlines() if x.startswith("HEAD="))
    head = subprocess.run(["bash", "-c", f"{head_line}; echo $HEAD"], capture_output=True, text=True,
                          env={**os.environ, "SLURM_JOB_NODELIST": "localhost"}).stdout.strip()
    assert head == "localhost"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [f.replace("$HEAD:29500", f"127.0.0.1:{port}").replace("${SLURM_JOB_ID}", "two-nodes") for f in flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BS": "8", "HFMI_STRATEGY": "ddp"}
    out = tmp_path / "two_nodes"
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *flags, JOB, "train", str(out)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        results = [a.communicate(timeout=300) for a in agents]
    finally:
        for a in agents:
            a.kill()
    for a, (_, err) in zip(agents, results):
        assert a.returncode == 0, err[-3000:]
    got = json.loads((out / "losses.json").read_text())
    ddp = json.loads((runs / "ddp" / "losses.json").read_text())
    assert got["world_size"] == 2 and not got["sharded"]
    assert got["losses"] == pytest.approx(ddp["losses"], rel=1e-4, abs=1e-6)
