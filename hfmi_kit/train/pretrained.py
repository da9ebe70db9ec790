"""Checkpoints a stranger can use: ``model.safetensors`` + ``config.json`` + ``MODEL_CARD.md``.

Nothing here unpickles: weights are safetensors, configs JSON, and the optional training state
is read with ``torch.load(weights_only=True)``. Writes go to a temporary directory that is
renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hfmi_kit.config import as_created, read_json_object
from hfmi_kit.errors import CheckpointError, ConfigError
from hfmi_kit.train.env import code_version, environment

SCHEMA_VERSION = 3
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "MODEL_CARD.md"
TRAIN_STATE = "train_state.pt"


def _migrate_0_to_1(cfg: dict[str, Any]) -> dict[str, Any]:
    # Version 0 (pre-release) stored the geometry under "data"; version 1 calls it "geometry".
    cfg = dict(cfg)
    if "data" in cfg and "geometry" not in cfg:
        cfg["geometry"] = cfg.pop("data")
    cfg["schema_version"] = 1
    return cfg


def _migrate_1_to_2(cfg: dict[str, Any]) -> dict[str, Any]:
    # Version 2 keeps what is applied around the model (calibration, target normalisation) in
    # one "processors" section; version 1 had it in three places.
    cfg = dict(cfg)
    geom = dict(cfg.get("geometry") or {})
    proc = dict(cfg.get("processors") or {})
    if isinstance(cfg.get("calibration"), Mapping):  # carbon: the interval's width factor
        proc["calibration"] = dict(cfg.pop("calibration"))
    if "uncertainty_scale" in geom:  # materials: the ensemble's recalibration
        proc["calibration"] = {**proc.get("calibration", {}), "uncertainty_scale": geom.pop("uncertainty_scale")}
    if "extent_normalisation" in geom:  # climate sea ice: the target's normalisation
        proc["target_normalisation"] = geom.pop("extent_normalisation")
    if "geometry" in cfg:
        cfg["geometry"] = geom
    cfg["processors"] = proc
    cfg["schema_version"] = 2
    return cfg


def _migrate_2_to_3(cfg: dict[str, Any]) -> dict[str, Any]:
    # Version 3 keeps the input normalisation with the other processors too: climate had its
    # per-variable statistics in geometry.normalisation.
    cfg = dict(cfg)
    geom = dict(cfg.get("geometry") or {})
    proc = dict(cfg.get("processors") or {})
    if "normalisation" in geom:
        proc["normalisation"] = geom.pop("normalisation")
        cfg["geometry"] = geom
    cfg["processors"] = proc
    cfg["schema_version"] = 3
    return cfg


_MIGRATIONS = {0: _migrate_0_to_1, 1: _migrate_1_to_2, 2: _migrate_2_to_3}


@dataclass
class ModelConfig:
    """Everything a checkpoint says about its model, in one object (``config.json`` is its
    :meth:`to_dict` plus the schema, code version, environment, date and reproduction record
    that :func:`save_pretrained` adds)."""

    domain: str  # the registered domain that trains and reads it
    task: str  # "pretrain" or the downstream task
    model_type: str  # "family.size": the registered family and the encoder size
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # the family's own arguments
    geometry: dict[str, Any] = field(default_factory=dict)  # what the input must look like (grid, variables, ...)
    processors: dict[str, Any] = field(default_factory=dict)  # applied around the model: calibration, normalisation
    card: dict[str, Any] = field(default_factory=dict)  # summary, data provenance, licence, intended use
    training: dict[str, Any] = field(default_factory=dict)  # the settings it was trained with
    metrics: dict[str, float] = field(default_factory=dict)  # its scores

    @property
    def family(self) -> str:
        return self.model_type.split(".", 1)[0]

    @property
    def size(self) -> str:
        return self.model_type.split(".", 1)[1] if "." in self.model_type else ""

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "task": self.task, "model_type": self.model_type,
                "model_kwargs": dict(self.model_kwargs), "geometry": dict(self.geometry),
                "processors": dict(self.processors), "card": dict(self.card), "training": dict(self.training),
                "metrics": dict(self.metrics)}

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """The model part of a (migrated) ``config.json``."""
        names = ("model_kwargs", "geometry", "processors", "card", "training", "metrics")
        return cls(domain=str(cfg.get("domain", "")), task=str(cfg.get("task", "")),
                   model_type=str(cfg.get("model_type", "")), **{k: dict(cfg.get(k) or {}) for k in names})


def migrate_config(cfg: dict[str, Any], *, path: Path | str = CONFIG) -> dict[str, Any]:
    """Bring a ``config.json`` written by an older hfmi_kit up to :data:`SCHEMA_VERSION`."""
    version = cfg.get("schema_version", 0)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: schema_version {version!r} is newer than this hfmi_kit understands "
            f"({SCHEMA_VERSION}); upgrade hfmi_kit"
        )
    while version < SCHEMA_VERSION:
        cfg = _MIGRATIONS[version](cfg)
        version = cfg["schema_version"]
    return cfg


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous, de-duplicated CPU state dict (unwraps DDP / compiled modules; gathers FSDP2
    shards, which is collective: every process must call it)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):  # a DTensor shard (FSDP2)
            v = v.full_tensor()
        ptr = v.data_ptr() if v.numel() else -1
        t = v.detach().to("cpu").contiguous()
        if ptr in seen and ptr != -1:
            t = t.clone()  # safetensors refuses shared storage
        seen[ptr] = k
        out[k] = t
    return out


def render_model_card(cfg: Mapping[str, Any]) -> str:
    """Markdown model card from a checkpoint config."""
    card = cfg.get("card", {})
    lines = [f"# {cfg.get('model_type', 'hfmi_kit model')}", ""]
    lines += [card.get("summary", "A model trained with hfmi_kit."), ""]
    lines += ["## Overview", "", "| field | value |", "| --- | --- |"]
    for key in ("domain", "task", "model_type", "created", "code_version"):
        lines.append(f"| {key} | {cfg.get(key, '')} |")
    lines.append(f"| schema_version | {cfg.get('schema_version')} |")
    lines += ["", "## Data provenance", ""]
    data = card.get("data", [])
    if data:
        lines += ["| file | sha256 | licence | description |", "| --- | --- | --- | --- |"]
        for d in data:
            lines.append(
                f"| {d.get('file', '')} | {str(d.get('sha256', ''))[:16]} | {d.get('licence', '')} | "
                f"{d.get('description', '')} |"
            )
    else:
        lines.append("No data files recorded.")
    lines += ["", "## Training", "", "```json", json.dumps(cfg.get("training", {}), indent=2), "```"]
    lines += ["", "## Metrics", ""]
    metrics = cfg.get("metrics", {})
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
                  for k, v in metrics.items()]
    else:
        lines.append("No metrics recorded yet.")
    lines += ["", "## Geometry the model expects", "", "```json",
              json.dumps(cfg.get("geometry", {}), indent=2)[:4000], "```"]
    lines += ["", "## Environment", "", "```json", json.dumps(cfg.get("environment", {}), indent=2), "```"]
    lines += ["", "## Licence", "", card.get("licence", "Weights: Apache-2.0, as hfmi_kit."), ""]
    lines += ["## How to load", "", "```python", "import hfmi_kit",
              "model = hfmi_kit.load_pretrained('<this folder>')", "```", ""]
    rec = cfg.get("reproduce")
    if isinstance(rec, Mapping):
        kw = rec.get("kwargs", {})
        lines += ["## How to reproduce", "",
                  f"`{rec.get('function')}` with seed {kw.get('seed', '?')} and the arguments below, at code "
                  f"version `{cfg.get('code_version', '?')}`; `hfmi reproduce <this folder> --out DIR` re-runs it "
                  "and compares every metric with this card.", "", "| input | path | sha256 |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v.get('path')} | {str(v.get('sha256'))[:16]} |" for k, v in rec.get("inputs", {}).items()]
        lines += ["", "```json", json.dumps(kw, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def _write_dir_atomically(path: Path, write: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        as_created(tmp)  # mkdtemp's folder is 0700: give it (and its files) the user's umask
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    config: ModelConfig | Mapping[str, Any],
    train_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` to directory ``path`` atomically (under torchrun: every process calls it,
    shards are gathered, process 0 writes and the others wait for it).

    Args:
        model: the module whose weights are saved.
        path: destination directory (replaced as a whole if it exists).
        config: a :class:`ModelConfig` (or its dict). Schema version, code version, environment,
            date and, inside a recorded run writing its own checkpoint, the reproduction record
            are added here, so ``config.json`` is written once.
        train_state: optional optimiser/scheduler/RNG/data-position state for exact resume.
    """
    from hfmi_kit.train.provenance import record_for

    path = Path(path)
    cfg = config.to_dict() if isinstance(config, ModelConfig) else dict(config)
    rec = record_for(path)
    if rec is not None:
        cfg["reproduce"] = rec
    cfg["schema_version"] = SCHEMA_VERSION
    cfg.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    cfg["code_version"] = code_version()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    cfg["environment"] = environment(dev)
    tensors = state_dict_for_save(model)
    if _distributed() and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
        return path

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "hfmi_schema": str(SCHEMA_VERSION)})
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(render_model_card(cfg), encoding="utf-8")
        if train_state is not None:
            torch.save(dict(train_state), tmp / TRAIN_STATE)

    _write_dir_atomically(path, write)
    if _distributed():
        torch.distributed.barrier()
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """Read and migrate ``config.json`` of checkpoint directory ``path``."""
    path = Path(path)
    f = path / CONFIG
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if not f.is_file():
        raise CheckpointError(f"{f}: missing; a checkpoint needs {CONFIG}, {WEIGHTS} and {CARD}")
    cfg = migrate_config(read_json_object(f, error=CheckpointError, invalid="corrupt JSON"), path=f)
    mt, mk = cfg.get("model_type"), cfg.get("model_kwargs", {})
    if mt is not None and not isinstance(mt, str):
        raise CheckpointError(f"{f}: model_type must be a string like 'climate_forecaster.tiny', got {mt!r}")
    if not isinstance(mk, dict):
        raise CheckpointError(f"{f}: model_kwargs must be a JSON object, got {type(mk).__name__}")
    if mt:
        from hfmi_kit.models.registry import check_kwargs

        try:
            check_kwargs(mt, mk, where=f"{f}: model_kwargs")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    return cfg


def verify_weights(path: str | Path) -> dict[str, Any]:
    """Check ``model.safetensors`` of checkpoint ``path`` without loading it: the header is JSON,
    every tensor has a known dtype, a shape that fits its byte range, and the ranges lie inside
    the file. Returns the header (name -> dtype, shape, data_offsets).

    Raises:
        CheckpointError: naming the file and what is wrong (a truncated file among them).
    """
    import struct

    f = Path(path) / WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"{f}: missing weights file")
    size = f.stat().st_size
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{f}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{f}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{f}: corrupt safetensors header (not a JSON object)")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = t["dtype"], [int(x) for x in t["shape"]], t["data_offsets"]
            numel = 1
            for x in shape:
                numel *= x
            expected = numel * sizes[dtype]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{f}: tensor {name!r} is described wrongly in the header ({e})") from e
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b) or b - a != expected:
            raise CheckpointError(f"{f}: tensor {name!r} ({dtype} {shape}) has byte range {[a, b]}, expected "
                                  f"{expected} bytes")
        end = max(end, b)
    if 8 + n + end > size:
        raise CheckpointError(f"{f}: corrupt or truncated safetensors file (the tensors need {8 + n + end} bytes, "
                              f"the file has {size})")
    return header


def read_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` of ``path``, naming the file if it is missing or corrupt."""
    f = Path(path) / WEIGHTS
    verify_weights(path)
    try:
        return load_file(str(f), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from e


def read_train_state(path: str | Path) -> dict[str, Any]:
    """Read the resume state, never unpickling code (``weights_only=True``)."""
    f = Path(path) / TRAIN_STATE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing; this checkpoint cannot resume training")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated zip archives
        raise CheckpointError(f"{f}: corrupt or truncated training state ({e})") from e


@dataclass
class LoadReport:
    """What a transfer load did: keys loaded, skipped (checkpoint only or shape differs), re-initialised."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors; skipped {len(self.skipped)} "
                f"{self.skipped[:6]}{'...' if len(self.skipped) > 6 else ''}; re-initialised "
                f"{len(self.reinitialised)} {self.reinitialised[:6]}"
                f"{'...' if len(self.reinitialised) > 6 else ''}")


def transfer_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> LoadReport:
    """Load every tensor whose name and shape match; report the rest."""
    report = LoadReport()
    own = model.state_dict()
    take = {}
    for k, v in weights.items():
        if k in own and tuple(own[k].shape) == tuple(v.shape):
            take[k] = v
            report.loaded.append(k)
        else:
            report.skipped.append(k)
    report.reinitialised = sorted(set(own) - set(take))
    model.load_state_dict(take, strict=False)
    return report


def environment_differences(cfg: Mapping[str, Any], device: str | torch.device = "cpu") -> dict[str, tuple[str, str]]:
    """Fields of the recorded environment that differ from the current one."""
    rec = cfg.get("environment", {})
    now = environment(device)
    keys = ("hfmi_kit", "python", "torch", "numpy", "device")
    return {k: (str(rec.get(k)), now[k]) for k in keys if str(rec.get(k)) != now[k]}


def load_pretrained(
    path: str | Path,
    *,
    mode: Literal["weights", "transfer", "resume"] = "weights",
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a checkpoint directory written by :func:`save_pretrained`.

    Modes:
        ``weights``: rebuild the recorded model and load every tensor strictly.
        ``transfer``: load what matches into ``model`` (or the rebuilt one); the report is at
            ``model.hfmi_load_report``.
        ``resume``: like ``weights``, and warn when the environment differs from the recorded one.

    The returned module carries its config as ``model.hfmi_config``.
    """
    from hfmi_kit.domains import get_domain  # registers the model families of the recorded domain
    from hfmi_kit.models.registry import create_model

    path = Path(path)
    cfg = read_config(path)
    weights = read_weights(path, device)
    if model is None:
        if cfg.get("domain"):
            get_domain(cfg["domain"])
        if "model_type" not in cfg:
            raise CheckpointError(f"{path / CONFIG}: no 'model_type'; cannot rebuild the model")
        model = create_model(cfg["model_type"], **cfg.get("model_kwargs", {}))
    model.to(device)
    if mode == "transfer":
        model.hfmi_load_report = transfer_weights(model, weights)  # type: ignore[attr-defined]
    elif mode in ("weights", "resume"):
        own = model.state_dict()
        shape_diff = [k for k, v in weights.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
        if shape_diff:
            raise CheckpointError(
                f"{path / WEIGHTS}: tensor shapes differ from {cfg.get('model_type')} for {shape_diff[:8]}; "
                "use mode='transfer' to load what matches"
            )
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{path / WEIGHTS}: does not match {cfg.get('model_type')}: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}; use mode='transfer' to load what matches"
            )
        if mode == "resume":
            diff = environment_differences(cfg, device)
            if diff:
                warnings.warn(
                    f"{path}: resuming in a different environment than the one that wrote it: "
                    + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()),
                    stacklevel=2,
                )
    else:
        raise CheckpointError(f"unknown load mode {mode!r}; expected weights, transfer or resume")
    model.hfmi_config = cfg  # type: ignore[attr-defined]
    return model
