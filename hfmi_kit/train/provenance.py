"""Reproduction from a model card: what a run records, and re-running it.

Every domain's ``pretrain`` and ``finetune`` are wrapped by :func:`recorded`: after the run, the
checkpoint's ``config.json`` gains a ``reproduce`` entry with the function, its keyword
arguments (the seed among them) and a checksum of every file or folder the arguments name
(data, the parent checkpoint's weights). With the code version and environment that every
checkpoint already records, that is enough to re-run it: :func:`reproduce` checks the inputs,
calls the same function with the same arguments into a new directory and compares each metric
with the card.

A record names its entry point (``climate.pretrain``), never code: :func:`reproduce` looks the
name up in :data:`ENTRY_POINTS`, the table the decorator fills (only functions of registered
domains are in it), and checks every recorded argument against that function's signature and
annotations (plain JSON values and paths only) before anything runs.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import inspect
import json
import logging
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfmi_kit.errors import CheckpointError, ConfigError, DataError

LOGGER = logging.getLogger(__name__)
RECORD = "reproduce"
LARGE_FILE = 256 * 2**20  # files above this size enter a folder's checksum by name and size only
SKIP_ARGS = {"out", "progress"}
#: entry-point name (``"<domain>.<command>"``) -> the recorded function; filled by :func:`recorded`
ENTRY_POINTS: dict[str, Callable[..., Any]] = {}


def digest(path: str | Path) -> str:
    """sha256 of a file; of a folder, over its files' relative paths and contents (files above
    256 MiB by size only; temporary files of atomic writes and caches skipped, dotfiles such as
    Zarr's ``.zattrs`` kept); of a checkpoint folder, of its weights file."""
    p = Path(path)
    if p.is_dir() and (p / "model.safetensors").is_file():
        p = p / "model.safetensors"
    h = hashlib.sha256()
    if p.is_file():
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
        return h.hexdigest()
    if not p.is_dir():
        raise DataError(f"{path}: neither a file nor a folder")
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        rel = f.relative_to(p)
        if f.name.endswith(".tmp") or any(p in ("__pycache__", ".ipynb_checkpoints") for p in rel.parts):
            continue
        h.update(str(rel).encode() + b"\0")
        size = f.stat().st_size
        if size > LARGE_FILE:
            h.update(f"size={size}".encode())
        else:
            h.update(digest(f).encode())
    return h.hexdigest()


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _inputs(kw: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    out = {}
    for k, v in kw.items():
        if k in SKIP_ARGS or not isinstance(v, (str, Path)) or not str(v):
            continue
        p = Path(v)
        if p.exists():
            out[k] = {"path": str(p.resolve()), "sha256": digest(p)}
    return out


def _rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@dataclass
class _Run:
    """The recorded call in progress: the checkpoint it writes, its record, whether it went in."""

    checkpoint: Path
    record: dict[str, Any]
    written: bool = False


_CURRENT: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("hfmi_recorded_run", default=None)


def record_for(path: str | Path) -> dict[str, Any] | None:
    """The reproduction record :func:`save_pretrained` puts into checkpoint ``path``: the running
    recorded call's, when ``path`` is the checkpoint that call writes (``out/model``); else None."""
    cur = _CURRENT.get()
    if cur is None or Path(path).resolve() != cur.checkpoint:
        return None
    cur.written = True
    return cur.record


def recorded(domain: str, command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a domain's keyword-only ``pretrain`` (returns the checkpoint) or ``finetune``
    (writes ``out/model``) so that its checkpoint records how to re-run it, and each call is
    checked against its typed options first (:func:`hfmi_kit.config.typed`). The record goes in
    when the checkpoint is saved (one write of ``config.json``); a function that saved its
    checkpoint elsewhere gets it added afterwards."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        from hfmi_kit.config import option_checker

        entry = f"{domain}.{command}"
        check = option_checker(fn)

        @functools.wraps(fn)
        def run(**kw: Any) -> Any:
            kw = check(kw)  # typed options: a wrong type or range fails here, before anything is read
            inputs = _inputs(kw)  # before the run: what it read, not what it wrote
            rec = {"entry": entry, "domain": domain, "command": command,
                   "function": f"{fn.__module__}.{fn.__name__}",
                   "kwargs": {k: _jsonable(v) for k, v in kw.items() if k not in SKIP_ARGS},
                   "inputs": inputs}
            cur = _Run(Path(kw["out"]).resolve() / "model", rec) if kw.get("out") else None
            token = _CURRENT.set(cur)
            try:
                result = fn(**kw)
            finally:
                _CURRENT.reset(token)
            ck = Path(result) if isinstance(result, (str, Path)) else Path(kw["out"]) / "model"
            if not (cur and cur.written) and _rank0() and (ck / "config.json").is_file():
                update_config(ck, {RECORD: rec})
            return result

        ENTRY_POINTS[entry] = run
        return run

    return wrap


def update_config(path: str | Path, fields: Mapping[str, Any]) -> None:
    """Set top-level ``fields`` of a checkpoint's config and re-render its card, atomically."""
    from hfmi_kit.config import atomic_write_text
    from hfmi_kit.train.pretrained import CARD, CONFIG, read_config, render_model_card

    path = Path(path)
    cfg = read_config(path)
    cfg.update(fields)
    atomic_write_text(path / CONFIG, json.dumps(cfg, indent=2, default=str) + "\n")
    atomic_write_text(path / CARD, render_model_card(cfg))


@dataclass
class Reproduction:
    """What :func:`reproduce` found: per metric the card's and the new value."""

    ckpt: str
    out: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # metric, recorded, reproduced, match
    input_changes: list[str] = field(default_factory=list)
    environment_changes: list[str] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return all(r["match"] for r in self.rows)

    def table(self) -> str:
        lines = ["| metric | model card | reproduced | difference | match |", "| --- | --- | --- | --- | --- |"]
        for r in self.rows:
            d = "" if r["difference"] is None else f"{r['difference']:.3g}"
            lines.append(f"| {r['metric']} | {_fmt(r['recorded'])} | {_fmt(r['reproduced'])} | {d} | "
                         f"{'yes' if r['match'] else 'NO'} |")
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "missing" if v is None else f"{v:.4g}"


def compare_metrics(recorded_m: Mapping[str, float], new: Mapping[str, float]) -> list[dict[str, Any]]:
    """Each metric of either side; equal when they print the same to 4 significant digits (as
    ``hfmi`` prints them)."""
    rows = []
    for k in sorted(set(recorded_m) | set(new)):
        a, b = recorded_m.get(k), new.get(k)
        a = float(a) if isinstance(a, (int, float)) else None
        b = float(b) if isinstance(b, (int, float)) else None
        both = a is not None and b is not None
        same = both and (_fmt(a) == _fmt(b) or (math.isnan(a) and math.isnan(b)))
        rows.append({"metric": k, "recorded": a, "reproduced": b, "difference": (b - a) if both else None,
                     "match": bool(same)})
    return rows


def reproduce(ckpt: str | Path, out: str | Path, *, allow_changed_inputs: bool = False) -> Reproduction:
    """Re-run the training recorded in ``ckpt`` into ``out`` and compare the metrics with its card.
    A checkpoint made from generated example data that is gone (a shipped one) has that data made
    again under ``out/data`` and checked against the recorded checksum.

    Raises:
        CheckpointError: the checkpoint has no reproduction record.
        DataError: an input's checksum differs from the record (unless ``allow_changed_inputs``).
    """
    from hfmi_kit.config import atomic_write_json
    from hfmi_kit.train.env import environment
    from hfmi_kit.train.pretrained import read_config

    cfg = read_config(ckpt)
    rec = cfg.get(RECORD)
    if not isinstance(rec, Mapping) or not ({"entry", "function"} & set(rec)):
        raise CheckpointError(f"{ckpt}: no reproduction record in config.json (written by hfmi_kit before it "
                              "recorded runs, or not by a domain's pretrain/finetune)")
    fn = entry_point(rec, where=f"{Path(ckpt) / 'config.json'}")  # refuse a bad record before reading inputs
    check_arguments(fn, rec.get("kwargs"), where=f"{Path(ckpt) / 'config.json'}")
    rep = Reproduction(ckpt=str(ckpt), out=str(out))
    inputs = rec.get("inputs") or {}
    if not isinstance(inputs, Mapping) or not all(
            isinstance(v, Mapping) and isinstance(v.get("path"), str) and isinstance(v.get("sha256"), str)
            for v in inputs.values()):
        raise CheckpointError(f"{Path(ckpt) / 'config.json'}: reproduce.inputs must map names to "
                              "{'path': str, 'sha256': str}")
    moved: dict[str, str] = {}  # argument -> the input made again (a checkpoint of generated example data)
    for name, inp in inputs.items():
        p = Path(inp["path"])
        if not p.exists() and name == "data" and (cfg.get("training") or {}).get("example_data"):
            from hfmi_kit.checkpoints import recorded_data

            p = recorded_data(ckpt, Path(out) / "data")
            moved[name] = str(p)
        if not p.exists():
            rep.input_changes.append(f"{name}: {p} is missing")
        elif digest(p) != inp["sha256"]:
            rep.input_changes.append(f"{name}: {p} changed (sha256 {digest(p)[:12]} != {inp['sha256'][:12]})")
    if rep.input_changes and not allow_changed_inputs:
        raise DataError(f"{ckpt}: the recorded inputs differ: {'; '.join(rep.input_changes)}")
    env_now = environment(cfg.get("environment", {}).get("device", "cpu"))
    rep.environment_changes = [f"{k}: {v} -> {env_now.get(k)}" for k, v in (cfg.get("environment") or {}).items()
                               if env_now.get(k) != v]
    fn = entry_point(rec, where=f"{Path(ckpt) / 'config.json'}")
    kwargs = check_arguments(fn, rec.get("kwargs"), where=f"{Path(ckpt) / 'config.json'}")
    kwargs.update(moved)
    if "resume" in kwargs:
        kwargs["resume"] = False
    result = fn(**kwargs, out=out, progress=False)
    new_ck = Path(result) if isinstance(result, (str, Path)) else Path(out) / "model"
    rep.rows = compare_metrics(cfg.get("metrics") or {}, read_config(new_ck).get("metrics") or {})
    atomic_write_json(Path(out) / "reproduction.json",
                      {"ckpt": str(ckpt), "matches": rep.matches, "metrics": rep.rows,
                       "input_changes": rep.input_changes, "environment_changes": rep.environment_changes})
    return rep


def entry_point(rec: Mapping[str, Any], *, where: str = "config.json") -> Callable[..., Any]:
    """The function a reproduction record names, from :data:`ENTRY_POINTS` only.

    A record names ``entry`` (``"climate.pretrain"``); records written before entries existed
    name ``domain``, ``command`` and the ``function``'s import path, which must then be the
    path of that entry's function. Anything else is refused with :class:`CheckpointError`.
    """
    from hfmi_kit.domains import get_domain, list_domains

    entry = rec.get("entry")
    if entry is None:
        entry = f"{rec.get('domain')}.{rec.get('command')}"
    if not isinstance(entry, str) or entry.count(".") != 1:
        raise CheckpointError(f"{where}: reproduce.entry {entry!r} is not '<domain>.<command>'")
    domain = entry.split(".")[0]
    if domain not in list_domains():
        raise CheckpointError(f"{where}: reproduce.entry {entry!r} names no registered domain "
                              f"({list_domains()})")
    get_domain(domain)  # imports the domain's tasks, which fill ENTRY_POINTS
    fn = ENTRY_POINTS.get(entry)
    if fn is None:
        raise CheckpointError(f"{where}: reproduce.entry {entry!r} is not a reproducible entry point; "
                              f"expected one of {sorted(ENTRY_POINTS)}")
    recorded_fn = rec.get("function")
    if recorded_fn is not None and recorded_fn != f"{fn.__module__}.{fn.__name__}":
        raise CheckpointError(f"{where}: reproduce.function {recorded_fn!r} is not the function of entry point "
                              f"{entry!r} ({fn.__module__}.{fn.__name__})")
    return fn


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


def check_arguments(fn: Callable[..., Any], kwargs: Any, *, where: str = "config.json") -> dict[str, Any]:
    """The recorded keyword arguments of ``fn``, checked: each names a keyword parameter of its
    signature (``out`` and ``progress`` are the re-run's own), is a plain JSON value, and fits the
    parameter's annotation. Raises :class:`CheckpointError` naming the offending field."""
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{where}: reproduce.kwargs must be a JSON object, got {type(kwargs).__name__}")
    from hfmi_kit.config import _check

    target = inspect.unwrap(fn)
    params = inspect.signature(target).parameters
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve: check names and plainness only
        hints = {}
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        field_name = f"reproduce.kwargs.{k}"
        if k in SKIP_ARGS or k not in params or params[k].kind not in (inspect.Parameter.KEYWORD_ONLY,
                                                                       inspect.Parameter.POSITIONAL_OR_KEYWORD):
            raise CheckpointError(f"{where}: {field_name} is not an argument of {fn.__module__}.{fn.__name__} "
                                  f"(expected some of {sorted(n for n in params if n not in SKIP_ARGS)})")
        if not _plain(v):
            raise CheckpointError(f"{where}: {field_name} is not a plain JSON value")
        try:
            _check(field_name, v, hints.get(k, Any))
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e}") from None
        out[k] = v  # the recorded JSON value itself: the checked form only had to exist
    return out
