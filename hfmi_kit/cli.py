"""The ``hfmi`` command: thin, it parses flags and calls the package.

Every sub-command has ``--help``; errors exit non-zero with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from hfmi_kit.config import parse_param
from hfmi_kit.errors import ConfigError, HfmiError


def _domain(name: str) -> Any:
    from hfmi_kit.domains import get_domain

    return get_domain(name)


EXAMPLE_RECORD = "EXAMPLE.json"  # in --out/data: which example data a run generated there


def _data_or_example(dom: Any, data: str | None, out: Path, seed: int, stage: str = "pretrain") -> Path | str:
    """``--data``, the domain's bundled data, or example data generated into ``out/data`` (reused
    when an earlier run of the same domain and seed generated it there, e.g. before ``--resume``)."""
    if data:
        return Path(data)
    if stage in dom.bundled_data:
        print(f"no --data given: using the bundled {dom.bundled_data[stage]!r} data set")
        return dom.bundled_data[stage]
    rec_file = out / "data" / EXAMPLE_RECORD
    try:
        rec = json.loads(rec_file.read_text(encoding="utf-8")) if rec_file.is_file() else {}
    except (OSError, ValueError):
        rec = {}
    if isinstance(rec, dict) and rec.get("domain") == dom.name and rec.get("seed") == seed and isinstance(
            rec.get("path"), str) and (out / "data" / rec["path"]).exists():
        p = out / "data" / rec["path"]
        print(f"no --data given: using the example data generated earlier at {p}")
        return p
    p = dom.example_data(out / "data", seed=seed)
    from hfmi_kit.config import atomic_write_json

    atomic_write_json(rec_file, {"domain": dom.name, "seed": seed, "path": str(Path(p).relative_to(out / "data"))})
    print(f"no --data given: generated example data at {p}")
    return p


def _print_metrics(metrics: dict[str, float], out: Path, keys: Sequence[str] | None = None) -> None:
    shown = {k: v for k, v in metrics.items() if keys is None or k in keys}
    for k, v in shown.items():
        print(f"  {k:32s} {v:.4g}")
    print(f"metrics: {out / 'metrics.json'}")


def cmd_pretrain(a: argparse.Namespace) -> None:
    dom = _domain(a.domain)
    out = Path(a.out)
    kw = _domain_options(dom, "pretrain", a, config=a.config, steps=a.steps, seed=a.seed, resume=a.resume,
                         precision=a.precision, device=a.device, batch_size=a.batch_size, lr=a.lr,
                         variables=a.variables.split(",") if a.variables else None,
                         checkpoint_every=a.checkpoint_every, target=a.target)
    data = _data_or_example(dom, a.data, out, a.seed)
    ck = dom.pretrain(data=data, out=out, **kw)
    print(f"checkpoint: {ck}")


def _ckpt_data(ckpt: str, out: Path) -> str:
    """The data ``ckpt`` records (generated again under ``out/data`` for a shipped checkpoint
    made from example data)."""
    from hfmi_kit.checkpoints import recorded_data

    return str(recorded_data(ckpt, out / "data"))


_TASK_COMMANDS = ("pretrain", "finetune", "evaluate")
TASK_FLAGS_EPILOG = ("Every other option of the domain's {cmd} is a flag too (hfmi finetune materials "
                     "--folds 3): `hfmi {cmd} DOMAIN --help` adds them to this list, with their types, "
                     "defaults and ranges.")
DOMAIN_HELP = "show this help message (after DOMAIN: with that domain's own flags) and exit"
_NOT_FLAGS = ("out", "ckpt", "data", "progress")  # given by the shared flags (--out, --from/--ckpt, --data)


class _DomainHelp(argparse.Action):
    """``-h``/``--help`` of a task command: the shared flags and, when the domain was named
    first (``hfmi finetune materials --help``), every flag of that domain's task as well, from its
    typed options (what ``hfmi options`` prints)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.print_help()
        command = parser.prog.split()[-1]
        name = getattr(namespace, "domain", None)
        if name in _domain_names():
            shared = {a.dest for a in parser._actions}
            lines = _option_lines(_domain(name), command, skip=shared | set(_NOT_FLAGS))
            if lines:
                print(f"\n{name} {command} flags (besides those above):")
                print("\n".join(lines))
        parser.exit()


def _domain_names() -> list[str]:
    from hfmi_kit.domains import list_domains

    return list_domains()


def _option_lines(dom: Any, command: str, *, skip: Iterable[str] = ()) -> list[str]:
    """One line per typed option of ``dom``'s ``command`` (its flag, type, default, help and
    range), leaving out ``out``, ``progress`` and the names in ``skip``."""
    skip = {"out", "progress", *skip}
    return [f"  {o.describe()}" for o in dom.options(command).values() if o.name not in skip]


def _task_flags(args: argparse.Namespace, extra: Sequence[str]) -> dict[str, Any]:
    """The flags after ``hfmi pretrain|finetune|evaluate DOMAIN`` that are not the shared ones:
    options of that domain's task (``--folds 3``, ``--calibration-folds 2``), each value read as
    a notebook parameter is (:func:`hfmi_kit.config.parse_param`) and checked against the
    option's type.

    Raises:
        UsageError: another command, a flag that is not one of the task's options, or a flag
            without its value.
    """
    from hfmi_kit.config import check_options, takes_list

    command = args.cmd if args.cmd in _TASK_COMMANDS else getattr(args, "action", None) if args.cmd == "data" else None
    if command not in (*_TASK_COMMANDS, "prepare"):
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    try:
        dom = _domain(args.domain)
    except HfmiError as e:
        raise UsageError(str(e)) from None
    opts = dom.options(command)
    given: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        flag = extra[i]
        name = flag[2:].split("=", 1)[0].replace("-", "_") if flag.startswith("--") else ""
        if not name or name in _NOT_FLAGS:
            raise UsageError(f"unrecognized argument {flag!r}")
        if "=" in flag:
            text, i = flag.split("=", 1)[1], i + 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            text, i = extra[i + 1], i + 2
        else:
            raise UsageError(f"{flag} needs a value")
        value = parse_param(text)  # as a notebook's -p value
        if name in opts and takes_list(opts[name].type) and not isinstance(value, list):
            value = value.split(",") if isinstance(value, str) else [value]  # --variables tas,ta; --levels 500
        given[name] = value
    try:
        return check_options(opts, given, what=f"{dom.name} {command}")
    except ConfigError as e:
        raise UsageError(str(e)) from None


def _domain_options(dom: Any, command: str, a: argparse.Namespace, **given: Any) -> dict[str, Any]:
    """The keywords of the domain's ``command``: the flags of ``given`` that were set (not None)
    and the task's own flags (``a.task_options``), every one checked against the domain's typed
    task options (:meth:`Domain.options`) before any data is generated or read: a flag the
    command does not take, a value of the wrong type or out of range is one line naming it."""
    from hfmi_kit.config import check_options

    set_ = {k: v for k, v in given.items() if v is not None}
    set_.update(getattr(a, "task_options", {}))
    return check_options(dom.options(command), set_, what=f"{dom.name} {command}")


def cmd_finetune(a: argparse.Namespace) -> None:
    dom = _domain(a.domain)
    out = Path(a.out)
    scratch = a.from_ == "scratch"
    if not scratch:
        from hfmi_kit.checkpoints import resolve

        a.from_ = str(resolve(a.from_))  # a shipped checkpoint's name (materials.tiny) -> its folder
    if a.task and a.task not in dom.tasks:
        raise HfmiError(f"unknown task {a.task!r} for {a.domain}; expected one of {list(dom.tasks)}")
    kw = _domain_options(dom, "finetune", a, steps=a.steps, seed=a.seed, label_fraction=a.label_fraction,
                         lr=a.lr, precision=a.precision, device=a.device, mode=a.mode, batch_size=a.batch_size,
                         task=a.task or None, config=a.config or None, target=a.target, labels=a.labels,
                         baselines=a.baselines or None, head=a.head)
    if a.data or scratch or "finetune" in dom.bundled_data:
        data = _data_or_example(dom, a.data, out, a.seed, "finetune")
    else:
        data = _ckpt_data(a.from_, out)
    m = dom.finetune(ckpt=None if scratch else a.from_, data=data, out=out, **kw)
    print(f"checkpoint: {out / 'model'}")
    _print_metrics(m, out, dom.headline_metrics)


def cmd_evaluate(a: argparse.Namespace) -> None:
    dom = _domain(a.domain)
    out = Path(a.out)
    kw = _domain_options(dom, "evaluate", a, target=a.target)
    data = a.data or dom.bundled_data.get("evaluate") or _ckpt_data(a.ckpt, out)
    m = dom.evaluate(ckpt=a.ckpt, data=data, out=out, **kw)
    _print_metrics(m, out, dom.headline_metrics)


def cmd_explain(a: argparse.Namespace) -> None:
    from hfmi_kit.train import recipe

    dom = _domain(a.domain)
    out = Path(a.out)
    load = {}
    if a.target:
        load = _domain_options(dom, "evaluate", a, target=a.target)  # read as the evaluation reads it
    data = a.data or dom.bundled_data.get("evaluate") or _ckpt_data(a.ckpt, out)
    ex = recipe.explain(dom, ckpt=a.ckpt, data=data, out=out, examples=a.examples, seed=a.seed, load_options=load,
                        explain_options={"variable": a.variable} if a.variable else None)
    print(f"{ex.question}; {ex.method}; {ex.examples} {ex.unit}(s)")
    for name, share in sorted(ex.importance.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {name}: {share:.3f}")
    if len(ex.importance) > 10:
        print(f"  ... {len(ex.importance) - 10} more in {out / 'importance.csv'}")
    for c in ex.checks:
        print(f"{c.name}: {'passed' if c.passed else 'FAILED'} ({c.detail or f'{c.value:.3g}'})")
    if not ex.passed:
        print("warning: a check failed: these attributions do not show what the model uses", file=sys.stderr)
    print(f"explanation: {out / 'explanation.json'}")


def cmd_whatif(a: argparse.Namespace) -> None:
    dom = _domain(a.domain)
    out = Path(a.out)
    m = dom.whatif(ckpt=a.ckpt, data=a.data or _ckpt_data(a.ckpt, out), out=out, co2_factor=a.co2_factor,
                   horizon=a.horizon, members=a.members, seed=a.seed, base_ppm=a.base_ppm,
                   average_from=a.horizon // 2 if a.average_from is None else a.average_from)
    print(f"what-if: {out / 'whatif.nc'}")
    _print_metrics(m, out)


def cmd_data(a: argparse.Namespace) -> None:
    if a.action == "prepare":
        dom = _domain(a.domain)
        kw = _domain_options(dom, "prepare", a, sources=a.sources, out=a.out)
        store = dom.prepare(**kw)
        print(f"store: {store}")
    else:
        store = Path(a.store)
        dom = _domain(_store_domain(store))
    print("\n".join(dom.inspect_store(store)))


def _store_domain(store: Path) -> str:
    """The domain that wrote ``store`` (``hfmi data prepare``), from its root attributes."""
    from hfmi_kit.data.cf import is_zarr
    from hfmi_kit.data.safety import check_zarr

    if not store.exists():
        raise HfmiError(f"{store}: no such file or directory")
    if not is_zarr(store):
        raise HfmiError(f"{store}: not a Zarr store; `hfmi data inspect` reads the stores `hfmi data prepare` writes")
    check_zarr(store)
    import zarr

    mark = zarr.open_group(str(store), mode="r").attrs.get("hfmi_store")
    if not mark:
        raise HfmiError(f"{store}: not a store written by `hfmi data prepare` (no hfmi_store attribute)")
    try:
        return str(json.loads(mark)["domain"])
    except (ValueError, KeyError, TypeError):
        raise HfmiError(f"{store}: its hfmi_store attribute is not the JSON `hfmi data prepare` writes") from None


def cmd_options(a: argparse.Namespace) -> None:
    dom = _domain(a.domain)
    opts = dom.options(a.command)
    if not opts:
        raise HfmiError(f"the {dom.name} domain has no {a.command} command")
    print(f"{dom.name} {a.command} options (from {dom.tasks_module}.{a.command}):")
    print("\n".join(_option_lines(dom, a.command)))


def cmd_info(a: argparse.Namespace) -> None:
    from hfmi_kit.checkpoints import resolve, shipped
    from hfmi_kit.train.pretrained import CARD, WEIGHTS, read_config, verify_weights
    from hfmi_kit.train.sharded import is_sharded, read_metadata

    if a.shipped or a.ckpt is None:
        if a.ckpt is None and not a.shipped:
            raise ConfigError("hfmi info needs a checkpoint folder (or --shipped to list the shipped ones)")
        for name, path in shipped().items():
            print(_summary(path, read_config(path)).splitlines()[0].replace(str(path), name, 1), f"  ({path})")
        return
    a.ckpt = str(resolve(a.ckpt))
    cfg = read_config(a.ckpt)
    if is_sharded(a.ckpt):
        read_metadata(Path(a.ckpt) / "sharded")
    elif (Path(a.ckpt) / WEIGHTS).exists() or cfg.get("model_type"):
        verify_weights(a.ckpt)  # the header and every tensor's extent against the file's size
    if not a.full:
        print(_summary(Path(a.ckpt), cfg))
        return
    card = Path(a.ckpt) / CARD
    print(card.read_text(encoding="utf-8") if card.is_file() else f"(no {CARD})")
    print("## config.json\n")
    print(json.dumps({k: v for k, v in cfg.items() if k != "card"}, indent=2, default=str)[:20000])


def _summary(path: Path, cfg: dict[str, Any]) -> str:
    """A checkpoint in a dozen lines: what it is, what it was trained on, its headline metrics."""
    from hfmi_kit.domains import list_domains

    tr, card = cfg.get("training") or {}, cfg.get("card") or {}
    metrics = {k: v for k, v in (cfg.get("metrics") or {}).items() if isinstance(v, (int, float))}
    headline: Sequence[str] = ()
    if cfg.get("domain") in list_domains():
        try:
            headline = _domain(str(cfg["domain"])).headline_metrics
        except HfmiError:  # a domain whose extra packages are missing: the summary still prints
            pass
    shown = [k for k in headline if k in metrics] or list(metrics)[:8]
    lines = [f"{path}: {cfg.get('domain', '?')} {cfg.get('task', '?')} model {cfg.get('model_type', '?')} "
             f"(config schema {cfg.get('schema_version', '?')})"]
    if card.get("summary"):
        lines.append(f"  {card['summary']}")
    src, example = tr.get("from"), tr.get("example_data")
    data = tr.get("data", "?")
    if isinstance(example, dict):  # a shipped checkpoint: its folder is not on this machine
        data = (f"{cfg.get('domain', '?')}'s generated example data (seed {example.get('seed')}"
                f"{'' if example.get('small', True) else ', full size'}; made again when fine-tuned without --data)")
    lines.append(f"  trained on {data}" + (f" from {src}" if src else "")
                 + (f", {tr['steps']} steps" if "steps" in tr else "")
                 + (f", seed {tr['seed']}" if "seed" in tr else ""))
    lines.append(f"  created {cfg.get('created', '?')} by hfmi_kit {cfg.get('code_version', '?')}")
    if cfg.get("processors"):
        lines.append(f"  applied around the model: {', '.join(sorted(cfg['processors']))}")
    for k in shown:
        lines.append(f"  {k:32s} {metrics[k]:.4g}")
    if len(metrics) > len(shown):
        lines.append(f"  (+{len(metrics) - len(shown)} more metrics)")
    lines.append(f"the model card and the whole config: hfmi info {path} --full")
    return "\n".join(lines)


def _parse_params(pairs: Sequence[Sequence[str]] | None) -> dict[str, Any]:
    params = {}
    for name, value in pairs or []:
        try:
            params[name] = parse_param(value)
        except yaml.YAMLError as e:
            raise HfmiError(f"-p {name}: cannot parse {value!r} as YAML ({e})") from e
    return params


def cmd_run(a: argparse.Namespace) -> None:
    import os

    from hfmi_kit.errors import NotebookError, PreemptedError
    from hfmi_kit.launch.notebook import run_notebook

    out = a.o
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:  # under torchrun every process runs the notebook; process 0 keeps the executed copy
        base = Path(out) if out else Path(a.notebook).with_name(f"{Path(a.notebook).stem}.out.ipynb")
        out = str(base.with_name(f".{base.stem}.rank{rank}.ipynb"))
    try:
        out = run_notebook(a.notebook, _parse_params(a.p), output=out)
    except NotebookError as e:
        if "PreemptedError" in str(e):
            raise PreemptedError(str(e)) from e
        raise
    if rank == 0:
        print(f"executed notebook: {out}")


def _slurm_job(a: argparse.Namespace, notebook: str, params: dict[str, Any]) -> Any:
    from hfmi_kit.launch.slurm import SlurmJob

    return SlurmJob(notebook=notebook, parameters=params, partition=a.partition or "", nodes=a.nodes,
                    gpus_per_node=a.gpus_per_node, cpus_per_task=a.cpus_per_task, time=a.time,
                    workdir=a.workdir or "", strategy=a.strategy or "auto", job_name=a.job_name or "")


def cmd_submit(a: argparse.Namespace) -> None:
    from hfmi_kit.launch.slurm import submit

    job = _slurm_job(a, a.notebook, _parse_params(a.p))
    job.output = a.o or ""
    script, job_id = submit(job, dry_run=a.dry_run)
    if a.dry_run:
        print(script, end="")
    else:
        print(f"submitted batch job {job_id}")


def cmd_sweep(a: argparse.Namespace) -> None:
    from hfmi_kit.launch import slurm

    if a.collect:
        rows = slurm.collect(Path(a.out) / "sweep.json")
        print((Path(a.out) / "summary.md").read_text(), end="")
        print(f"{len(rows)} runs: {Path(a.out) / 'summary.csv'}")
        return
    if not a.notebook:
        raise HfmiError("sweep needs a NOTEBOOK (or --collect)")
    spec = slurm.plan_sweep(a.notebook, [tuple(x) for x in (a.p or [])], a.out)
    n = len(json.loads(spec.read_text())["runs"])
    if a.slurm:
        job = _slurm_job(a, a.notebook, {})
        job.array = f"0-{n - 1}"
        job.workdir = job.workdir or str(Path(a.out).resolve())
        script, job_id = slurm.submit(job, dry_run=a.dry_run, run_cmd=f"sweep-task {spec} $SLURM_ARRAY_TASK_ID",
                                      script_name="sweep.sbatch")
        if a.dry_run:
            print(script, end="")
        else:
            print(f"submitted job array {job_id} ({n} runs); then: hfmi sweep --collect --out {a.out}")
        return
    rows = slurm.run_sweep_local(spec)
    print((Path(a.out) / "summary.md").read_text(), end="")
    bad = [r["run"] for r in rows if r["status"] != "done"]
    print(f"{len(rows)} runs, {len(bad)} failed{': ' + ', '.join(bad) if bad else ''}; {Path(a.out) / 'summary.csv'}")
    if bad:
        raise HfmiError(f"{len(bad)} of {len(rows)} sweep runs failed; see their FAILED files")


def cmd_sweep_task(a: argparse.Namespace) -> None:
    from hfmi_kit.launch.slurm import run_sweep_task

    out = run_sweep_task(a.sweep, a.index)
    print(f"executed notebook: {out}")


def cmd_demo(a: argparse.Namespace) -> None:
    dom = _domain(a.domain)
    out = Path(a.out)
    t0 = time.time()
    data = dom.example_data(out / "data", seed=a.seed, years=a.years)
    print(f"[1/3] data: {data} ({dom.name} example data: {dom.data_formats})")
    ck = dom.pretrain(data=data, out=out / "pretrain", steps=a.steps, seed=a.seed, progress=not a.quiet)
    print(f"[2/3] pretrained checkpoint: {ck}")
    ft = out / "finetune"
    m = dom.finetune(ckpt=ck, data=data, out=ft, steps=a.steps, seed=a.seed, progress=not a.quiet)
    print(f"[3/3] fine-tuned model: {ft / 'model'}")
    for name in dom.example_outputs:
        print(f"output: {ft / name}")
    _print_metrics(m, ft, dom.headline_metrics)
    print(f"done in {time.time() - t0:.0f} s; to look at it: hfmi dashboard --results {out}")


def cmd_scorecard(a: argparse.Namespace) -> None:
    from hfmi_kit.scorecard import run_scorecard

    domains = [d.strip() for d in a.domains.split(",") if d.strip()] if a.domains else None
    seeds = [int(s) for s in a.seeds.split(",")]
    t0 = time.time()
    rows = run_scorecard(a.out, domains=domains, budget=a.budget, seeds=seeds)
    out = Path(a.out)
    print((out / "scorecard.md").read_text(encoding="utf-8"))
    print(f"{len(rows)} rows: {out / 'scorecard.csv'}; curves: {out / 'label_efficiency.html'}; runs: {out / 'runs'} "
          f"({time.time() - t0:.0f} s)")


def cmd_reproduce(a: argparse.Namespace) -> int:
    from hfmi_kit.train.provenance import reproduce

    rep = reproduce(a.ckpt, a.out, allow_changed_inputs=a.allow_changed_inputs)
    for c in rep.input_changes:
        print(f"input changed: {c}")
    for c in rep.environment_changes:
        print(f"environment: {c}")
    print(rep.table())
    bad = [r["metric"] for r in rep.rows if not r["match"]]
    print(f"reproduction of {a.ckpt} in {a.out}: " + ("every metric matches the model card" if not bad else
                                                     f"{len(bad)} of {len(rep.rows)} metrics differ: {bad}"))
    return 0 if not bad else 3


def cmd_dashboard(a: argparse.Namespace) -> None:
    from hfmi_kit.viz.dashboard import serve

    root = Path(a.results)
    if a.example:
        from hfmi_kit.viz.examples import make_example_results

        if root.exists() and any(root.iterdir()):
            raise ConfigError(f"--example writes into an empty directory; {root} is not empty")
        print(f"writing example runs of every domain into {root} (short real runs, a few minutes)")
        make_example_results(root)
    if not root.is_dir():
        raise ConfigError(f"--results {root}: directory not found")
    prefix = "/" + a.prefix.strip("/") if a.prefix.strip("/") else ""
    print(f"hfmi dashboard of {root.resolve()} at http://{a.address}:{a.port}{prefix}/ (Ctrl-C stops it)", flush=True)
    serve(root, port=a.port, address=a.address, prefix=a.prefix, websocket_origins=a.allow_websocket_origin or None,
          show=a.show)


TARGET_HELP = "materials: the value column of the --data CSV (default 'target'; band gaps in eV)"


def cmd_plan(a: argparse.Namespace) -> int:
    from hfmi_kit.launch.plan import parse_memory, plan

    opts: dict[str, Any] = {}
    size = a.config
    if Path(a.config).is_file():  # a YAML/JSON file: size, tokens, batch_size, samples, mask_ratio, ...
        opts = yaml.safe_load(Path(a.config).read_text(encoding="utf-8")) or {}
        if not isinstance(opts, dict) or "size" not in opts:
            raise HfmiError(f"{a.config}: expected a mapping with at least 'size' (and tokens, batch_size, ...)")
        size = opts.pop("size")
    flags = {"tokens": a.tokens, "batch_size": a.batch_size, "samples": a.samples, "mask_ratio": a.mask_ratio,
             "mfu": a.mfu, "peak_tflops": a.peak_tflops}
    opts.update({k: v for k, v in flags.items() if v is not None})
    p = plan(size, tokens=int(opts.get("tokens", 1024)), batch_per_device=int(opts.get("batch_size", 8)),
             devices=a.gpus, device_memory_gb=parse_memory(a.gpu_memory), dtype=a.dtype, strategy=a.strategy,
             activation_checkpointing=a.activation_checkpointing, mask_ratio=float(opts.get("mask_ratio", 0.75)),
             samples=float(opts.get("samples", 1e6)), mfu=float(opts.get("mfu", 0.4)),
             peak_tflops=opts.get("peak_tflops"), overhead_gb=a.overhead_gb, optimizer=a.optimizer)
    print(p.report())
    return 0 if p.fits else 2


def cmd_preflight(a: argparse.Namespace) -> None:
    """Run the notebook with tiny parameters in one process, check what a batch run needs, print
    the submit command."""
    import shlex
    import tempfile

    from hfmi_kit.launch.notebook import parameter_names, read_notebook, run_notebook

    params = _parse_params(a.p)
    names = parameter_names(read_notebook(a.notebook))
    tiny = dict(params)
    for n in names:
        if n == "steps" or n.endswith("_steps"):
            tiny[n] = 2
    with tempfile.TemporaryDirectory(prefix="hfmi-preflight-") as tmp:
        out_param = next((n for n in ("out_dir", "out") if n in names), None)
        if out_param:
            tiny[out_param] = str(Path(tmp) / "out")
        t = time.time()
        run_notebook(a.notebook, tiny, output=Path(tmp) / "preflight.ipynb")
        print(f"preflight: the notebook ran with {sorted(k for k in tiny if k not in params or tiny[k] != params[k])} "
              f"made tiny in {time.time() - t:.0f} s (data readable, every cell passed)")
        if out_param:
            ck = [p for p in (Path(tmp) / "out").rglob("model.safetensors")]
            if not ck:
                raise HfmiError(f"preflight: the notebook wrote no checkpoint under its {out_param}")
            from hfmi_kit.train import load_pretrained

            load_pretrained(ck[0].parent)
            print(f"preflight: checkpoint written and loadable ({ck[0].parent.relative_to(tmp)})")
    cmd = ["hfmi", "submit", a.notebook, *[x for k, v in (a.p or []) for x in ("-p", k, v)]]
    for flag, val in (("--partition", a.partition), ("--nodes", a.nodes), ("--gpus-per-node", a.gpus_per_node),
                      ("--cpus-per-task", a.cpus_per_task), ("--time", a.time), ("--strategy", a.strategy)):
        if val not in (None, ""):
            cmd += [flag, str(val)]
    print("preflight passed; submit with:\n  " + " ".join(shlex.quote(c) for c in cmd))


def cmd_convert(a: argparse.Namespace) -> None:
    from hfmi_kit.train.sharded import convert_sharded

    print(f"checkpoint: {convert_sharded(a.ckpt, a.out)}")


def _torchrun(argv: Sequence[str], nproc: int, strategy: str | None) -> int:
    """Run this same command in ``nproc`` processes under torchrun (one node, a free port)."""
    import os
    import subprocess

    rest, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x == "--nproc":
            skip = True
            continue
        if x.startswith("--nproc="):
            continue
        rest.append(x)
    env = dict(os.environ)
    if strategy:
        env["HFMI_STRATEGY"] = strategy
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "hfmi_kit.cli", *rest]
    return subprocess.run(cmd, env=env).returncode


class UsageError(HfmiError):
    """A command line argparse refuses (unknown flag, invalid choice, wrong type)."""


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad command line is one ``hfmi: error:`` line (exit 1), not usage + exit 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from hfmi_kit.domains import list_domains

    domains = ", ".join(list_domains())
    p = _Parser(prog="hfmi", description=f"hfmi_kit: scientific foundation models. Domains: {domains}.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log progress at INFO level; show the traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def task_parser(cmd: str, help: str) -> argparse.ArgumentParser:
        """A task command's parser: its DOMAIN argument and a --help that adds the domain's flags."""
        sp = sub.add_parser(cmd, help=help, epilog=TASK_FLAGS_EPILOG.format(cmd=cmd), add_help=False)
        sp.add_argument("-h", "--help", action=_DomainHelp, help=DOMAIN_HELP)
        sp.add_argument("domain", help=f"one of the registered domains: {domains}")
        return sp

    def common_train(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--seed", type=int, default=0, help="the one seed of the run (default 0)")
        sp.add_argument("--batch-size", type=int, default=None,
                        help="samples per step (default: the domain's choice; climate 16, radiology 8/4, "
                             "materials 256/64, carbon 16/8)")
        sp.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: the domain's choice for pretrain / fine-tune)")
        sp.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
        sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        sp.add_argument("--nproc", type=int, default=1,
                        help="processes on this node: N > 1 starts the same command under torchrun")
        sp.add_argument("--strategy", choices=["auto", "ddp", "fsdp"],
                        help="multi-process training: DDP (auto) or FSDP2 sharding with sharded checkpoints "
                             "(sets HFMI_STRATEGY for the processes)")

    sp = task_parser("pretrain", "pretrain a foundation model on unlabelled data")
    sp.add_argument("--out", required=True, help="output directory (checkpoints, metrics.jsonl, model/)")
    sp.add_argument("--data", help="data in the domain's format (default: generated example data)")
    sp.add_argument("--config", default="tiny", help="model size: tiny, small, base")
    sp.add_argument("--steps", type=int, default=300)
    sp.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    sp.add_argument("--checkpoint-every", type=int, metavar="N",
                    help="steps between step checkpoints in --out/checkpoints (default: half the steps)")
    sp.add_argument("--variables", help="comma-separated variables to use (default: all on the grid)")
    sp.add_argument("--target", help=TARGET_HELP)
    common_train(sp)
    sp.set_defaults(fn=cmd_pretrain)

    sp = task_parser("finetune", "fine-tune a pretrained model on a downstream task")
    sp.add_argument("--from", dest="from_", required=True, metavar="CKPT",
                    help="pretrained checkpoint directory, the name of a shipped one (materials.tiny; "
                         "`hfmi info --shipped` lists them), or 'scratch' for the same model untrained")
    sp.add_argument("--out", required=True)
    sp.add_argument("--data", help="data (default: the data recorded in the checkpoint; materials: expt_gap)")
    sp.add_argument("--task",
                    help="downstream task (climate: forecast, seaice; radiology: segment; materials: band_gap; "
                         "carbon: biomass)")
    sp.add_argument("--label-fraction", type=float, default=1.0, help="fraction of training labels (0, 1]")
    sp.add_argument("--labels", type=int,
                    help="number of labelled cases to train on (radiology; materials: per CV fold; carbon: field "
                         "plots; default all)")
    sp.add_argument("--baselines", action="store_true",
                    help="also train the baselines on the same split (radiology: scratch and U-Net; "
                         "materials: scratch, random forest, dummy; carbon: scratch, random forest)")
    sp.add_argument("--target", help=TARGET_HELP)
    sp.add_argument("--steps", type=int, default=300)
    sp.add_argument("--mode", choices=["full", "frozen", "linear_probe"],
                    help="what is trained: everything, or the head with the pretrained encoder frozen "
                         "(default: full; carbon from a checkpoint: frozen)")
    sp.add_argument("--head", choices=["auto", "ensemble", "forest", "network"],
                    help="carbon: the network's quantile head trained by gradient (network; default from scratch), "
                         "a random forest on the frozen pretrained embedding (forest), the two averaged "
                         "(ensemble), or the one of these three with the lowest plot RMSE cross-validated on the "
                         "training plots (auto; default from a checkpoint)")
    sp.add_argument("--config", help="model size when training from scratch")
    common_train(sp)
    sp.set_defaults(fn=cmd_finetune)

    sp = task_parser("evaluate", "evaluate a fine-tuned checkpoint; writes metrics.json")
    sp.add_argument("--ckpt", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--data")
    sp.add_argument("--target", help=TARGET_HELP)
    sp.set_defaults(fn=cmd_evaluate)

    sp = sub.add_parser("explain", help="which inputs drive a fine-tuned checkpoint's predictions on held-out data, "
                        "with the model-randomisation and deletion checks; writes explanation.json")
    sp.add_argument("domain", help=f"one of the registered domains: {domains}")
    sp.add_argument("--ckpt", required=True, help="fine-tuned checkpoint")
    sp.add_argument("--out", required=True)
    sp.add_argument("--data", help="data (default: the data recorded in the checkpoint; its training items are "
                                   "left out)")
    sp.add_argument("--examples", type=int, help="held-out examples to explain (default: the domain's choice)")
    sp.add_argument("--seed", type=int, default=0, help="which examples, and the randomised models of the checks")
    sp.add_argument("--target", help=TARGET_HELP)
    sp.add_argument("--variable", help="climate: the variable whose forecast is explained (default tas, or the "
                                       "model's first)")
    sp.set_defaults(fn=cmd_explain)

    sp = sub.add_parser("whatif", help="climate: ensemble what-if rollouts under a changed CO2 forcing")
    sp.add_argument("domain", help=f"one of the registered domains: {domains}")
    sp.add_argument("--ckpt", required=True, help="fine-tuned forecaster")
    sp.add_argument("--out", required=True)
    sp.add_argument("--data")
    sp.add_argument("--co2-factor", type=float, default=2.0)
    sp.add_argument("--horizon", "--months", dest="horizon", type=int, default=24,
                    help="steps of the data rolled out (months for monthly data; --months is its old spelling)")
    sp.add_argument("--members", type=int, default=8)
    sp.add_argument("--average-from", type=int, help="first step of the response average (default: horizon/2)")
    sp.add_argument("--base-ppm", type=float, help="baseline CO2 [ppm] (default: the value at the start)")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_whatif)

    sp = sub.add_parser("data", help="prepare raw files of a field into one training store; inspect a store")
    data_sub = sp.add_subparsers(dest="action", required=True, metavar="ACTION")
    dp = data_sub.add_parser("prepare", help="join files (one per year or variable, folders of them) into one "
                                             "checked, regridded, chunked store with statistics and provenance",
                             epilog="The domain's prepare options are flags too (climate: --variables ta,tas "
                                    "--levels 500,850 --grid 1.0 --time-chunk 1): `hfmi options DOMAIN prepare` "
                                    "lists them.")
    dp.add_argument("domain", help=f"one of the registered domains: {domains}")
    dp.add_argument("sources", nargs="+", help="NetCDF files, Zarr stores or folders of them")
    dp.add_argument("--out", required=True, help="the store to write (STORE.zarr)")
    dp.set_defaults(fn=cmd_data)
    dp = data_sub.add_parser("inspect", help="what a store holds: variables, levels, grid, time span, chunking, "
                                             "statistics, size, sources")
    dp.add_argument("store")
    dp.set_defaults(fn=cmd_data)

    sp = sub.add_parser("options", help="a domain's typed task options: flag, type, default, help, range (what "
                                        "its notebooks' parameters and the CLI's domain flags are checked against)")
    sp.add_argument("domain", help=f"one of the registered domains: {', '.join(list_domains())}")
    sp.add_argument("command", nargs="?", default="finetune",
                    choices=("pretrain", "finetune", "evaluate", "whatif", "prepare"))
    sp.set_defaults(fn=cmd_options)

    sp = sub.add_parser("info", help="a checkpoint in short: what it is, its data, its headline metrics "
                                     "(--full: the model card and the whole config)")
    sp.add_argument("ckpt", nargs="?", help="a checkpoint folder or the name of a shipped one (materials.tiny)")
    sp.add_argument("--full", action="store_true", help="print the model card and the whole config.json")
    sp.add_argument("--shipped", action="store_true", help="list the pretrained checkpoints that ship with hfmi")
    sp.set_defaults(fn=cmd_info)

    sp = sub.add_parser("run", help="run a notebook (.ipynb or paired .py) headless with papermill")
    sp.add_argument("notebook")
    sp.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"),
                    help="parameter; VALUE is YAML (numbers, lists, dicts)")
    sp.add_argument("-o", metavar="OUT", help="executed notebook path")
    sp.set_defaults(fn=cmd_run)

    def slurm_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--partition", help="SLURM partition")
        sp.add_argument("--nodes", type=int, default=1)
        sp.add_argument("--gpus-per-node", type=int, default=0, help="GPUs (= processes) per node; 0: one CPU process")
        sp.add_argument("--cpus-per-task", type=int, default=2)
        sp.add_argument("--time", default="01:00:00", help="time limit [D-]HH:MM:SS")
        sp.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], help="multi-process training strategy")
        sp.add_argument("--workdir", help="where the batch script and SLURM logs go (default: here / the sweep)")
        sp.add_argument("--job-name")
        sp.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")

    sp = sub.add_parser("submit", help="run a notebook as a SLURM batch job (srun torchrun + papermill)")
    sp.add_argument("notebook")
    sp.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), help="parameter (YAML value)")
    sp.add_argument("-o", metavar="OUT", help="executed notebook path")
    slurm_opts(sp)
    sp.set_defaults(fn=cmd_submit)

    sp = sub.add_parser("preflight", help="run a notebook with tiny parameters here, check data and checkpoint "
                                          "writing, then print the submit command")
    sp.add_argument("notebook")
    sp.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), help="parameter of the real run")
    slurm_opts(sp)
    sp.set_defaults(fn=cmd_preflight)

    sp = sub.add_parser("plan", help="pre-flight plan: parameters, FLOPs, memory per device, time; says if it fits")
    sp.add_argument("config", help="a model size (tiny, small, base, 1b) or a YAML file with size, tokens, "
                                   "batch_size, samples, mask_ratio")
    sp.add_argument("--gpus", type=int, default=1, help="devices in total")
    sp.add_argument("--gpu-memory", default="80GB", help="memory per device, e.g. 80GB")
    sp.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    sp.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    sp.add_argument("--activation-checkpointing", action="store_true")
    sp.add_argument("--tokens", type=int, help="tokens per sample (default 1024)")
    sp.add_argument("--batch-size", type=int, help="samples per device per step (default 8)")
    sp.add_argument("--samples", type=float, help="sample budget of the run (default 1e6)")
    sp.add_argument("--mask-ratio", type=float, help="MAE mask ratio (default 0.75)")
    sp.add_argument("--mfu", type=float, help="assumed model FLOPs utilisation (default 0.4)")
    sp.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device (default: H100 dense for the dtype)")
    sp.add_argument("--overhead-gb", type=float, default=1.0, help="fixed per-device overhead (CUDA context)")
    sp.add_argument("--optimizer", default="foreach", choices=["foreach", "fused", "loop"],
                    help="AdamW's update: foreach (PyTorch's default on a GPU; one fp32 temporary per "
                         "parameter at the step), fused or loop")
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("sweep", help="run a notebook for every combination of parameters, locally or as a "
                                      "SLURM job array; summary table of the runs' metrics")
    sp.add_argument("notebook", nargs="?")
    sp.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUES"),
                    help="parameter and comma-separated values, e.g. -p lr 1e-3,3e-4")
    sp.add_argument("--out", required=True, help="sweep folder: sweep.json, run-NNN/, summary.csv, summary.md")
    sp.add_argument("--slurm", action="store_true", help="submit a job array instead of running here")
    sp.add_argument("--collect", action="store_true", help="only (re)build the summary of a finished sweep")
    slurm_opts(sp)
    sp.set_defaults(fn=cmd_sweep)

    # internal (one task of a SLURM array): without help= it is not listed (help=SUPPRESS printed "==SUPPRESS==")
    sp = sub.add_parser("sweep-task")
    sp.add_argument("sweep")
    sp.add_argument("index", type=int)
    sp.set_defaults(fn=cmd_sweep_task)

    sp = sub.add_parser("convert", help="convert a sharded (FSDP) step checkpoint to a single-file checkpoint")
    sp.add_argument("ckpt", help="a checkpoints/step-N directory with a sharded/ folder")
    sp.add_argument("--out", required=True, help="the single-file checkpoint directory to write")
    sp.set_defaults(fn=cmd_convert)

    sp = sub.add_parser("scorecard", help="label-efficiency scorecard: pretrained vs scratch vs classical baselines "
                                          "per domain, label budget and seed")
    sp.add_argument("--domains", help="comma-separated (default: every domain)")
    sp.add_argument("--budget", choices=["small", "full"], default="small",
                    help="small: minutes on a laptop CPU; full: a cluster job")
    sp.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds (at least 3)")
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=cmd_scorecard)

    sp = sub.add_parser("reproduce", help="re-run the training a checkpoint records and compare its metrics with "
                                          "the model card (exit 3 when any differs)")
    sp.add_argument("ckpt", help="checkpoint directory (…/model) written by pretrain or finetune")
    sp.add_argument("--out", required=True, help="where the re-run writes")
    sp.add_argument("--allow-changed-inputs", action="store_true",
                    help="run even when a recorded input file's checksum differs (reported)")
    sp.set_defaults(fn=cmd_reproduce)

    sp = sub.add_parser("dashboard", help="serve the Panel dashboard of a results directory (127.0.0.1 by default)")
    sp.add_argument("--results", required=True, help="directory of runs (fine-tuning outputs, checkpoints)")
    sp.add_argument("--port", type=int, default=5006)
    sp.add_argument("--address", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--prefix", default="", help="URL prefix when served behind a proxy (jupyter-server-proxy)")
    sp.add_argument("--allow-websocket-origin", action="append", metavar="HOST[:PORT]",
                    help="browser origins allowed to connect (default: this address and port); repeatable")
    sp.add_argument("--example", action="store_true", help="first fill the (empty) directory with short example "
                                                            "runs of every domain")
    sp.add_argument("--show", action="store_true", help="open a browser tab")
    sp.set_defaults(fn=cmd_dashboard)

    sp = sub.add_parser("demo", help="the main job: generate data, pretrain, fine-tune, report")
    sp.add_argument("--domain", default="climate", help=f"the domain to demonstrate ({domains}; default climate)")
    sp.add_argument("--out", default="hfmi_demo")
    sp.add_argument("--steps", type=int, default=300)
    sp.add_argument("--years", type=int, default=16, help="climate: years of generated data")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import os

    from hfmi_kit.errors import REQUEUE_EXIT_CODE, PreemptedError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        args.task_options = _task_flags(args, extra) if extra else {}
    except UsageError as e:
        print(f"hfmi: error: {e}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        print("hfmi: error: --nproc must be >= 1", file=sys.stderr)
        return 1
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _torchrun(argv, nproc, args.strategy)
    if getattr(args, "strategy", None):
        os.environ["HFMI_STRATEGY"] = args.strategy
    out = getattr(args, "out", None) if args.cmd not in ("sweep",) else None
    fresh_out = out is not None and not Path(out).exists() and os.environ.get("RANK", "0") == "0"
    try:
        rc = args.fn(args)
        if isinstance(rc, int):
            return rc
    except PreemptedError as e:
        print(f"hfmi: pre-empted: {e}", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except BrokenPipeError:  # the reader of stdout went away (`hfmi info CKPT | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (HfmiError, OSError, ImportError, ValueError, KeyboardInterrupt) as e:
        if fresh_out:
            _discard_partial(Path(out))
        if args.verbose:
            raise
        print(f"hfmi: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a failure no check caught: still one line; -v shows the traceback
        if fresh_out:
            _discard_partial(Path(out))
        if args.verbose:
            raise
        print(f"hfmi: error: unexpected {type(e).__name__}: {_one_line(e)} (run with -v for the traceback; "
              "please report it)", file=sys.stderr)
        return 1
    return 0


def _discard_partial(out: Path) -> None:
    """Remove the ``--out`` folder a failed command created, unless it already holds a checkpoint
    (training state is never thrown away: a rerun with ``--resume`` continues from it)."""
    import shutil

    if not out.is_dir():
        return
    kept = ("model.safetensors", "train_state.pt", ".metadata")
    if any(p.name in kept for p in out.rglob("*")):
        return
    shutil.rmtree(out, ignore_errors=True)


def _one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(e).strip()
    if isinstance(e, KeyError) and e.args:
        text = f"missing key {e.args[0]!r}"
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
