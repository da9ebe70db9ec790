"""Reading a results directory for the dashboard: which runs it holds, their status, metrics,
model cards and prediction files. Only what a run publishes is read (``metrics.json``, the
checkpoint's ``config.json`` and ``MODEL_CARD.md``, prediction files); never training internals
(step checkpoints, ``metrics.jsonl``). Every path is resolved inside the results directory.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfmi_kit.config import read_json_object
from hfmi_kit.errors import ConfigError, HfmiError

SKIP_DIRS = {"checkpoints", "model", "predictions", "maps", "__pycache__"}  # inside a run, not runs
MAX_DEPTH = 5


class AccessRefusedError(HfmiError, PermissionError):
    """A requested path lies outside the results directory (or does not exist in it)."""


def resolve_under(root: str | Path, rel: str) -> Path:
    """``root / rel`` with every symlink resolved, refusing anything that leaves ``root``:
    absolute paths, ``..`` parts, and links that point outside."""
    base = Path(root).resolve()
    rel = str(rel or "").replace("\\", "/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if rel.startswith("/") or any(p == ".." for p in parts) or "\x00" in rel:
        raise AccessRefusedError(f"refused: {rel!r} is not a path inside the results directory")
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        raise AccessRefusedError(f"refused: {rel!r} leads outside the results directory")
    if not target.exists():
        raise AccessRefusedError(f"refused: {rel!r} does not exist in the results directory")
    return target


@dataclass
class Run:
    """One run directory as the dashboard sees it."""

    rel: str  # path relative to the results directory ("" for the directory itself)
    path: Path  # resolved, inside ``root``
    root: Path | None = None  # the results directory (resolved); every file read is checked against it
    domain: str | None = None
    task: str | None = None
    kind: str = "run"  # pretrain, finetune, evaluate, whatif, visualize
    status: str = "ok"  # ok, in progress, malformed
    problems: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    card: str | None = None  # MODEL_CARD.md text
    files: list[str] = field(default_factory=list)  # published files, relative to the run

    @property
    def name(self) -> str:
        return self.rel or "."

    @property
    def method(self) -> str:
        """``pretrained`` or ``scratch`` for a fine-tuning run (from its model card's config)."""
        src = ((self.config or {}).get("training") or {}).get("from", "")
        return "scratch" if src in ("scratch", None, "") else "pretrained"

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def file(self, name: str) -> Path | None:
        """The run's file ``name`` (``maps/carbon.nc``) with every symlink resolved, or None when
        it does not exist. Raises :class:`AccessRefusedError` when it resolves outside the results
        directory: the dashboard reads nothing there."""
        if not (self.path / name).exists() and not (self.path / name).is_symlink():
            return None
        root = self.root or self.path
        rel = f"{self.rel}/{name}" if self.rel else name
        try:
            return resolve_under(root, rel)
        except AccessRefusedError as e:
            if not (self.path / name).exists():  # a dangling link inside: nothing to read
                return None
            raise AccessRefusedError(f"refused: {rel} leads outside the results directory") from e


@functools.lru_cache(maxsize=1)
def published_files() -> dict[str, tuple[str, ...]]:
    """Domain -> the files its runs publish (:attr:`Domain.published_files`): what identifies a
    run directory, and its domain, when it has no checkpoint."""
    from hfmi_kit.domains import get_domain, list_domains

    out = {}
    for name in list_domains():
        try:
            dom = get_domain(name)
        except ImportError:  # a domain whose extra is not installed publishes nothing here
            continue
        out[name] = tuple(dom.published_files or dom.example_outputs)
    return out


def _is_run_dir(d: Path) -> bool:
    names = {p.name for p in d.iterdir()} if d.is_dir() else set()
    if "metrics.json" in names or (d / "model" / "config.json").exists():
        return True
    return any(f.rstrip("/") in names for fs in published_files().values() for f in fs)


def _guess_domain(d: Path) -> str | None:
    for dom, files in published_files().items():
        if any((d / f.rstrip("/")).exists() for f in files):
            return dom
    return None


def _in_progress(d: Path) -> list[str]:
    """Signs that a run is still being written: temporary files of atomic writes, a checkpoint
    folder without its weights, step checkpoints but no final metrics."""
    signs = [f"{p.name} being written" for p in d.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".tmp")]
    m = d / "model"
    if m.is_dir() and not (m / "model.safetensors").exists():
        signs.append("model/ has no model.safetensors yet")
    if not (d / "metrics.json").exists() and any(d.glob("**/checkpoints/step-*")):
        signs.append("training checkpoints but no metrics.json yet")
    return signs


def load_run(root: str | Path, rel: str) -> Run:
    """Read one run (``rel`` under ``root``); problems are recorded on the run, never raised."""
    path = resolve_under(root, rel)
    run = Run(rel=rel.strip("/"), path=path, root=Path(root).resolve())
    if not path.is_dir():
        raise AccessRefusedError(f"refused: {rel!r} is not a run directory")

    def inside(name: str) -> Path | None:
        try:
            return run.file(name)
        except AccessRefusedError as e:
            run.problems.append(str(e))
            return None

    def read(f: Path | None, name: str) -> dict[str, Any] | None:
        try:
            return None if f is None else read_json_object(f)
        except (ConfigError, OSError) as e:
            run.problems.append(f"{name} unreadable: {e}")
            return None

    mf = inside("metrics.json")
    raw = read(mf, "metrics.json")
    if raw is not None:
        run.metrics = {str(k): float(v) for k, v in raw.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    cfg = read(inside("model/config.json"), "model/config.json")
    if cfg is not None:
        run.config = cfg
        run.domain = str(cfg.get("domain") or "") or None
        run.task = str(cfg.get("task") or "") or None
    card = inside("model/MODEL_CARD.md")
    if card is not None:
        try:
            run.card = card.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            run.problems.append(f"MODEL_CARD.md unreadable: {e}")
    run.domain = run.domain or _guess_domain(path)
    if (path / "whatif.nc").exists():
        run.kind = "whatif"
    elif run.config is not None:
        run.kind = "pretrain" if run.task == "pretrain" else "finetune"
    elif any((path / f).exists() for f in ("candidates.csv", "active_learning.json")):
        run.kind = "visualize"
    elif mf is not None:
        run.kind = "evaluate"
    base = Path(root).resolve()
    run.files = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                       if p.is_file() and not _internal(p.relative_to(path)) and base in p.resolve().parents)
    progress = _in_progress(path)
    if progress:
        run.status = "in progress"
        run.problems.extend(progress)
    elif run.problems:
        run.status = "malformed"
    elif mf is None and run.config is None and not run.files:
        run.status = "malformed"
        run.problems.append("no metrics.json, checkpoint or prediction files")
    return run


def _internal(rel: Path) -> bool:
    """Training internals and temporary files, which the dashboard never lists or reads."""
    parts = rel.parts
    return (any(p in ("checkpoints", "__pycache__") or p.startswith(("train", "stage")) for p in parts[:-1])
            or rel.name == "metrics.jsonl" or rel.name.endswith(".tmp") or rel.name.startswith("."))


def scan_results(root: str | Path) -> list[Run]:
    """Every run directory under ``root`` (depth-first, sorted), read with :func:`load_run`."""
    base = Path(root).resolve()
    if not base.is_dir():
        raise AccessRefusedError(f"{root}: results directory not found")
    runs: list[Run] = []
    for dirpath, dirnames, _ in os.walk(base, followlinks=False):
        d = Path(dirpath)
        depth = len(d.relative_to(base).parts)
        if _is_run_dir(d):
            runs.append(load_run(base, str(d.relative_to(base)) if d != base else ""))
            dirnames[:] = [n for n in dirnames if n not in SKIP_DIRS and not n.startswith(("train", "stage", "."))]
        else:
            dirnames[:] = [n for n in dirnames if not n.startswith(".") and n not in ("checkpoints", "__pycache__")]
        if depth >= MAX_DEPTH:
            dirnames[:] = []
        dirnames.sort()
    return sorted(runs, key=lambda r: r.rel)


def label_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Rows for label-efficiency curves from fine-tuning runs: per run its own score (method
    ``pretrained`` or ``scratch``) and the baselines it carries, at the run's label count."""
    from hfmi_kit.domains import get_domain

    rows: list[dict[str, Any]] = []
    for r in runs:
        if r.domain is None or r.status != "ok":
            continue
        try:
            dom = get_domain(r.domain)
        except Exception:  # an unknown domain name in a config: nothing to plot
            continue
        m = r.metrics
        if not dom.primary_metric or dom.primary_metric not in m or dom.label_key not in m:
            continue
        base = {"domain": r.domain, "labels": m[dom.label_key], "run": r.name}
        rows.append({**base, "method": r.method, dom.primary_metric: m[dom.primary_metric]})
        for b in dom.baselines:
            key = f"{dom.primary_metric}_{b}"
            if key in m and not (b == "scratch" and r.method == "scratch"):
                rows.append({**base, "method": b, dom.primary_metric: m[key]})
    return rows
