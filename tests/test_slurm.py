"""Batch runs against a real single-node SLURM (Debian's slurm-wlm and munge, started here on
localhost): a notebook submitted with ``hfmi submit`` completes and its executed copy holds its
metrics; a 4-run sweep as a SLURM job array; a local sweep with its summary table; and the
batch script itself (``--dry-run``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from hfmi_kit.cli import main

REPO = Path(__file__).resolve().parents[1]
NB = REPO / "notebooks" / "climate" / "01_pretrain.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_ok() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                                       timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """slurmctld + slurmd on 127.0.0.1 with their own config, ports and spool; torn down after."""
    if not all(shutil.which(x) for x in ("slurmctld", "slurmd", "munged", "sbatch")):
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge; .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("spool", "state"):
        (d / sub).mkdir()
    if not _munge_ok():
        key = Path("/etc/munge/munge.key")
        if not key.is_file():  # some package installs leave the key to the admin
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "-R", "munge:munge", "/run/munge", "/etc/munge"], check=False)
        started = subprocess.run(["munged", "--force"], check=False, capture_output=True, text=True)
        for _ in range(50):
            if _munge_ok():
                break
            time.sleep(0.1)
        if not _munge_ok():
            pytest.skip(f"munged could not be started here: {started.stderr.strip()[:300]}")
    mem = int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 2)
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=hfmitest", "SlurmctldHost=localhost(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill",
        "MpiDefault=none", "ReturnToService=2", f"SlurmctldPidFile={d}/slurmctld.pid",
        f"SlurmdPidFile={d}/slurmd.pid", f"SlurmdSpoolDir={d}/spool", f"StateSaveLocation={d}/state",
        f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.log",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none", "MinJobAge=600", "KillWait=10",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem} State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        for daemon in ("slurmctld", "slurmd"):
            r = subprocess.run([daemon], env=env, capture_output=True, text=True)
            if r.returncode != 0:  # the machine cannot host SLURM: not a failure of hfmi's scripts
                pytest.skip(f"{daemon} could not be started here: {r.stderr.strip()[:300]}")
        for _ in range(100):
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            if r.stdout.strip() == "idle":
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the SLURM node never became idle: {r.stdout} {r.stderr}\n{(d / 'slurmd.log').read_text()}")
        yield env
    finally:
        for pid in ("slurmd.pid", "slurmctld.pid"):
            f = d / pid
            if f.is_file():
                subprocess.run(["kill", f.read_text().strip()], check=False)


def _wait(env: dict[str, str], job: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True)
        if not r.stdout.strip():
            return
        time.sleep(1)
    pytest.fail(f"job {job} still queued or running after {timeout} s")


def _hfmi(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hfmi_kit.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_submit_dry_run_prints_the_batch_script():
    from hfmi_kit.launch.slurm import SlurmJob, batch_script, run_command

    job = SlurmJob(notebook=str(NB), partition="gpu", nodes=2, gpus_per_node=4, time="02:00:00", strategy="fsdp")
    s = batch_script(job, run_command(str(NB), {"steps": 1000, "variables": ["tas", "tos"]}, "/x/out.ipynb"))
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=B:USR1@120", "export HFMI_STRATEGY=fsdp", "--nnodes=2 --nproc-per-node=4",
                 "--rdzv-backend=c10d", "source environments/hpc_setup.sh", "HFMI_RESUME=1"):
        assert line in s, line
    assert "-p steps 1000" in s and "'[tas, tos]'" in s
    with pytest.raises(Exception, match="--time"):
        batch_script(SlurmJob(notebook=str(NB), time="soon"), "run x")


def test_a_notebook_submitted_to_slurm_completes_with_its_metrics(slurm, tmp_path):
    out = tmp_path / "nb.ipynb"
    r = _hfmi(["submit", str(NB), "-p", "out_dir", str(tmp_path / "run"), "-p", "steps", "10", "-p", "years", "6",
               "-p", "variables", "[tas, tos, siconc, rsdt]", "-o", str(out), "--time", "00:15:00",
               "--cpus-per-task", "2", "--workdir", str(tmp_path)], slurm)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split()[-1]
    _wait(slurm, job)
    log = next(tmp_path.glob("slurm-*.out")).read_text()
    assert out.is_file(), log[-3000:]
    nb = nbformat.read(out, as_version=4)
    text = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "train_loss" in text, log[-3000:]  # the executed notebook holds the metrics
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_a_sweep_of_two_runs_as_a_slurm_job_array(slurm, tmp_path):
    sw = tmp_path / "sweep"
    r = _hfmi(["sweep", str(NB), "-p", "steps", "5,10", "-p", "seed", "0", "-p", "years", "6",
               "-p", "variables", "[[tas, tos, siconc, rsdt]]", "--out", str(sw), "--slurm",
               "--cpus-per-task", "1", "--time", "00:15:00"], slurm)
    assert r.returncode == 0, r.stderr
    job = r.stdout.split("job array ")[1].split()[0]
    _wait(slurm, job)
    r = _hfmi(["sweep", "--collect", "--out", str(sw)], slurm)
    assert r.returncode == 0, r.stderr
    rows = list(__import__("csv").DictReader(open(sw / "summary.csv")))
    logs = "\n".join(p.read_text()[-1500:] for p in sw.glob("slurm-*.out"))
    assert len(rows) == 2 and all(row["status"] == "done" for row in rows), logs
    assert {(row["steps"], row["seed"]) for row in rows} == {("5", "0"), ("10", "0")}
    assert all(float(row["train_loss"]) > 0 for row in rows)
    assert all((sw / row["run"] / "01_pretrain.ipynb").is_file() for row in rows)


def test_a_local_sweep_collects_a_summary_and_marks_failures(tmp_path):
    nb = tmp_path / "tiny.py"
    nb.write_text("# %% tags=[\"parameters\"]\nx = 1\ny = 1\nout_dir = 'o'\n\n# %%\nimport json, pathlib\n"
                  "assert x != 3, 'x=3 is refused'\np = pathlib.Path(out_dir); p.mkdir(parents=True, exist_ok=True)\n"
                  "(p / 'metrics.json').write_text(json.dumps({'score': x * y}))\n")
    code = main(["sweep", str(nb), "-p", "x", "1,2,3", "-p", "y", "10,20", "--out", str(tmp_path / "sw")])
    assert code == 1  # one parameter value fails: the sweep says so, the others are kept
    rows = list(__import__("csv").DictReader(open(tmp_path / "sw" / "summary.csv")))
    assert len(rows) == 6
    done = {(r["x"], r["y"]): float(r["score"]) for r in rows if r["status"] == "done"}
    assert done == {("1", "10"): 10.0, ("1", "20"): 20.0, ("2", "10"): 20.0, ("2", "20"): 40.0}
    assert sorted(r["status"] for r in rows).count("failed") == 2
    assert "| run |" in (tmp_path / "sw" / "summary.md").read_text()


def test_a_signalled_slurm_job_checkpoints_requeues_itself_and_the_rerun_resumes(slurm, tmp_path):
    """What happens near the time limit (SLURM signals the batch shell; sent by hand here, with
    scancel, so the test does not wait for a real limit): the run checkpoints and stops, the script
    resubmits itself with HFMI_RESUME=1, and the second job's notebook resumes training."""
    run_dir, out = tmp_path / "run", tmp_path / "nb.ipynb"
    r = _hfmi(["submit", str(NB), "-p", "out_dir", str(run_dir), "-p", "steps", "120", "-p", "years", "6",
               "-p", "variables", "[tas, tos, siconc, rsdt]", "-o", str(out), "--time", "00:20:00",
               "--cpus-per-task", "2", "--workdir", str(tmp_path), "--job-name", "hfmi-preempt"], slurm)
    assert r.returncode == 0, r.stderr
    first = r.stdout.strip().split()[-1]
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and log.read_text().count('"train"') >= 2):
        time.sleep(0.5)
    assert log.is_file(), "training never started"
    subprocess.run(["scancel", "--batch", "--signal=USR1", first], env=slurm, check=True)
    _wait(slurm, first)
    deadline = time.time() + 600
    while time.time() < deadline:  # the resubmitted job, then its end
        q = subprocess.run(["squeue", "-h", "-n", "hfmi-preempt", "-o", "%i"], env=slurm, capture_output=True,
                           text=True).stdout.split()
        if not q:
            break
        time.sleep(1)
    text = "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))
    assert "pre-empted" in text and "resubmitting with HFMI_RESUME=1" in text, text[-3000:]
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines() if '"train"' in x]
    assert steps == sorted(set(steps)) and steps[-1] == 120, steps  # continued, never restarted
    assert len(list(tmp_path.glob("slurm-*.out"))) == 2  # two jobs: the signalled one and its requeue
    nb = nbformat.read(out, as_version=4)
    assert "train_loss" in json.dumps([c.get("outputs", []) for c in nb.cells])
