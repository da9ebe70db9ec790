"""Batch runs of notebooks: SLURM batch scripts (``hfmi submit``) and parameter sweeps
(``hfmi sweep``) run locally or as a SLURM job array, with a summary table of their metrics.

The batch script loads the project's HPC environment (``environments/hpc_setup.sh``), starts
``torchrun`` on every node through ``srun`` with a c10d rendezvous on the first node, and runs
the notebook with papermill in each process (process 0 writes the executed notebook). SLURM
sends SIGUSR1 to the batch shell shortly before the time limit; the shell creates the file
``HFMI_PREEMPT_FILE`` names, which every training loop checks after each step (a signal would
not reach papermill's kernels behind torchrun on other nodes); the loops checkpoint and stop,
and the script resubmits itself with ``HFMI_RESUME=1`` (``sbatch`` from the batch host, so
``scontrol`` need not exist on compute nodes): the rerun notebook's training calls resume from
their latest checkpoints.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfmi_kit.config import parse_param
from hfmi_kit.errors import REQUEUE_EXIT_CODE, ConfigError, NotebookError

REPO = Path(__file__).resolve().parents[2]
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")


@dataclass
class SlurmJob:
    """What a batch script asks SLURM for and what it runs."""

    notebook: str
    parameters: dict[str, Any] = field(default_factory=dict)
    output: str = ""  # the executed notebook (default: next to the batch script)
    partition: str = ""
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    time: str = "01:00:00"
    job_name: str = ""
    workdir: str = ""  # where the script and logs go
    strategy: str = "auto"  # DDP or FSDP under torchrun
    signal_seconds: int = 120  # SIGUSR1 this long before the time limit
    array: str = ""  # a job array spec ("0-3"); the task id picks a parameter set
    extra: list[str] = field(default_factory=list)  # further #SBATCH lines

    def check(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_task < 1:
            raise ConfigError(f"nodes >= 1, gpus-per-node >= 0, cpus-per-task >= 1; got {self.nodes}, "
                              f"{self.gpus_per_node}, {self.cpus_per_task}")
        if not _TIME.match(self.time):
            raise ConfigError(f"--time {self.time!r}: expected [D-]HH[:MM[:SS]]")
        if self.strategy not in ("auto", "ddp", "fsdp"):
            raise ConfigError(f"strategy must be auto, ddp or fsdp, got {self.strategy!r}")


def batch_script(job: SlurmJob, run_cmd: str) -> str:
    """The ``sbatch`` script for ``job`` that runs ``run_cmd`` in every process under torchrun."""
    job.check()
    name = job.job_name or f"hfmi-{Path(job.notebook).stem}"
    wd = job.workdir or "."
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --nodes={job.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={job.cpus_per_task}",
             f"#SBATCH --time={job.time}", f"#SBATCH --output={wd}/slurm-%j.out", "#SBATCH --open-mode=append",
             f"#SBATCH --signal=B:USR1@{job.signal_seconds}"]
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.array:
        lines.append(f"#SBATCH --array={job.array}")
    lines += [f"#SBATCH {x}" for x in job.extra]
    nproc = max(1, job.gpus_per_node)
    if job.nodes * nproc > 1:
        launch = ("python -m torch.distributed.run "
                  f"--nnodes={job.nodes} --nproc-per-node={nproc} --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 "
                  f"--rdzv-id=${{SLURM_JOB_ID}} -m hfmi_kit.cli {run_cmd}")
    else:  # one process: no torchrun agent in between
        launch = f"python -m hfmi_kit.cli {run_cmd}"
    lines += [
        "# written by `hfmi submit`; see hfmi_kit/launch/slurm.py",
        "set -uo pipefail",
        f"cd {shlex.quote(str(REPO))}",
        f"export HFMI_CUDA={1 if job.gpus_per_node else 0}",
        "if [ -f environments/hpc_setup.sh ] && [ -z \"${HFMI_SKIP_SETUP:-}\" ]; then",
        "  source environments/hpc_setup.sh",
        "  set +e",
        "else",
        f"  export PATH={shlex.quote(str(REPO / '.venv' / 'bin'))}:$PATH",
        "fi",
        f"export HFMI_STRATEGY={job.strategy}",
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        "# SLURM signals this shell before the time limit; the shell raises the pre-emption request",
        "# file, which every training process on every node checks after each step",
        f"export HFMI_PREEMPT_FILE={shlex.quote(wd)}/.preempt-${{SLURM_JOB_ID}}"
        "${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}",
        "trap 'touch \"$HFMI_PREEMPT_FILE\"' USR1 TERM",
        "# rendezvous on the first node of the allocation (no scontrol needed)",
        "HEAD=$(python -c \"import os, re; s = os.environ.get('SLURM_JOB_NODELIST', 'localhost'); "
        "m = re.match(r'([^,\\[]+)(\\[(\\d+))?', s); print(m.group(1) + (m.group(3) or ''))\")",
        f"srun --kill-on-bad-exit=1 {launch} &",
        "PID=$!",
        "wait $PID; RC=$?",
        "while kill -0 $PID 2>/dev/null; do wait $PID; RC=$?; done  # wait returns early when a trap fires",
        f"if [ -f \"$HFMI_PREEMPT_FILE\" ] || [ $RC -eq {REQUEUE_EXIT_CODE} ]; then",
        "  rm -f \"$HFMI_PREEMPT_FILE\"",
        "  echo \"hfmi: pre-empted (exit $RC); resubmitting with HFMI_RESUME=1\"",
        "  sbatch --export=ALL,HFMI_RESUME=1 \"$0\"",
        "  exit 0",
        "fi",
        "exit $RC",
    ]
    return "\n".join(lines) + "\n"


def run_command(notebook: str, parameters: Mapping[str, Any], output: str) -> str:
    """``hfmi run`` arguments for one notebook run (values as YAML)."""
    import yaml

    parts = ["run", shlex.quote(str(Path(notebook).resolve()))]
    for k, v in parameters.items():
        val = yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
        parts += ["-p", shlex.quote(k), shlex.quote(val)]
    parts += ["-o", shlex.quote(str(Path(output).resolve()))]
    return " ".join(parts)


def submit(job: SlurmJob, *, dry_run: bool = False, run_cmd: str | None = None,
           script_name: str | None = None) -> tuple[str, str | None]:
    """Write ``<workdir>/<job name>.sbatch`` (or ``script_name``) and submit it unless ``dry_run``;
    ``run_cmd`` replaces the default ``hfmi run`` of the notebook. Returns the script and SLURM's
    job id (None when dry)."""
    from hfmi_kit.launch.notebook import check_parameters, read_notebook

    if run_cmd is None:  # the job runs the notebook: its parameters must be the notebook's
        check_parameters(read_notebook(job.notebook), job.parameters, source=job.notebook)
    wd = Path(job.workdir or ".").resolve()
    job.workdir = str(wd)
    out = job.output or str(wd / f"{Path(job.notebook).stem}.out.ipynb")
    script = batch_script(job, run_cmd or run_command(job.notebook, job.parameters, out))
    if dry_run:
        return script, None
    wd.mkdir(parents=True, exist_ok=True)
    path = wd / (script_name or f"{job.job_name or 'hfmi-' + Path(job.notebook).stem}.sbatch")
    path.write_text(script, encoding="utf-8")
    try:
        r = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=60)
    except FileNotFoundError as e:
        raise ConfigError("sbatch not found: SLURM is not installed here (use --dry-run to see the script)") from e
    if r.returncode != 0:
        raise ConfigError(f"sbatch refused {path}: {r.stderr.strip()}")
    return script, r.stdout.strip().split(";")[0]


# -- sweeps ---------------------------------------------------------------------------------
def grid(params: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Every combination of ``-p NAME VALUES``: ``v1,v2,...`` (each value parsed as YAML) or a YAML
    list (``[1e-3, 3e-4]``; a list-valued parameter is one value in a list: ``[[tas, tos]]``)."""
    import yaml

    if not params:
        raise ConfigError("a sweep needs at least one -p NAME VALUES")
    names = [n for n, _ in params]
    if len(set(names)) != len(names):
        raise ConfigError(f"a parameter is given twice: {names}")

    def parse(vals: str) -> list[Any]:
        try:
            whole = yaml.safe_load(vals)
        except yaml.YAMLError:
            whole = None
        if isinstance(whole, list):
            return whole
        return [parse_param(v) for v in vals.split(",")]

    values = [parse(vals) for _, vals in params]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def _out_param(notebook: str) -> str | None:
    """The notebook's output-folder parameter (``out_dir`` or ``out``), if it has one."""
    from hfmi_kit.launch.notebook import parameter_names, read_notebook

    names = parameter_names(read_notebook(notebook))
    return next((n for n in ("out_dir", "out") if n in names), None)


def plan_sweep(notebook: str, params: Sequence[tuple[str, str]], out: str | Path) -> Path:
    """Write ``out/sweep.json``: the notebook and one parameter set per run (``run-000``, ...);
    a notebook output folder parameter points into each run's folder."""
    from hfmi_kit.launch.notebook import check_parameters, read_notebook

    out = Path(out).resolve()
    runs = grid(params)
    check_parameters(read_notebook(notebook), runs[0], source=notebook)
    op = _out_param(notebook)
    entries = []
    for i, p in enumerate(runs):
        rd = out / f"run-{i:03d}"
        full = dict(p)
        if op and op not in full:
            full[op] = str(rd / "out")
        entries.append({"run": rd.name, "parameters": full, "swept": p, "output": str(rd / Path(notebook).name)
                        .replace(".py", ".ipynb")})
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"notebook": str(Path(notebook).resolve()), "runs": entries},
                                               indent=1), encoding="utf-8")
    return out / "sweep.json"


def run_sweep_task(sweep: str | Path, index: int) -> Path:
    """Run one entry of a planned sweep (a job-array task or a local loop)."""
    from hfmi_kit.launch.notebook import run_notebook

    spec = json.loads(Path(sweep).read_text(encoding="utf-8"))
    if not 0 <= index < len(spec["runs"]):
        raise ConfigError(f"{sweep}: run index {index} outside 0..{len(spec['runs']) - 1}")
    e = spec["runs"][index]
    Path(e["output"]).parent.mkdir(parents=True, exist_ok=True)
    return run_notebook(spec["notebook"], e["parameters"], output=e["output"])


def collect(sweep: str | Path) -> list[dict[str, Any]]:
    """One row per run: its swept parameters, status and the numbers of every ``metrics.json``
    its outputs hold; writes ``summary.csv`` and ``summary.md`` next to ``sweep.json``."""
    sweep = Path(sweep)
    spec = json.loads(sweep.read_text(encoding="utf-8"))
    rows = []
    for e in spec["runs"]:
        rd = Path(e["output"]).parent
        row: dict[str, Any] = {"run": e["run"], **e["swept"]}
        row["status"] = "done" if Path(e["output"]).is_file() and not (rd / "FAILED").exists() else "missing"
        if (rd / "FAILED").exists():
            row["status"] = "failed"
        for mf in sorted(rd.rglob("metrics.json")):
            try:
                m = json.loads(mf.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            prefix = "" if mf.parent == rd / "out" else f"{mf.parent.relative_to(rd).as_posix()}/"
            row.update({f"{prefix}{k}": v for k, v in m.items() if isinstance(v, (int, float))})
        rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(sweep.with_name("summary.csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        md.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                    for c in cols) + " |")
    sweep.with_name("summary.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return rows


def run_sweep_local(sweep: str | Path) -> list[dict[str, Any]]:
    """Run every entry one after another here; a failed run is marked and the others go on."""
    spec = json.loads(Path(sweep).read_text(encoding="utf-8"))
    for i, e in enumerate(spec["runs"]):
        rd = Path(e["output"]).parent
        try:
            run_sweep_task(sweep, i)
            (rd / "FAILED").unlink(missing_ok=True)
        except NotebookError as err:
            rd.mkdir(parents=True, exist_ok=True)
            (rd / "FAILED").write_text(str(err) + "\n", encoding="utf-8")
    return collect(sweep)
