"""Sharded training: FSDP2 (``torch.distributed.fsdp.fully_shard``) wrapping and step checkpoints
through ``torch.distributed.checkpoint`` (DCP).

A sharded step checkpoint is a directory with ``config.json``, ``train_state.pt`` (schedule,
data position, RNG; no tensors of the model) and ``sharded/`` (the DCP files of the model and
optimiser). DCP re-shards on load, so it resumes on any number of processes, and
:func:`convert_sharded` turns it, offline on one CPU, into the single-file
:func:`~hfmi_kit.train.save_pretrained` form: the model is built once and DCP reads the shards
into its tensors in place, so the whole model is never held twice.

DCP pickles its ``.metadata`` file; reading it here goes through :class:`SafeReader`, whose
unpickler accepts only DCP's own metadata classes, tensor sizes and dtypes, and paths, so a
crafted checkpoint cannot run code (the shards themselves load with ``weights_only=True``).
"""

from __future__ import annotations

import builtins
import collections
import importlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hfmi_kit.errors import CheckpointError

SHARDED = "sharded"
_SAFE_FUNCTIONS = {("torch.serialization", "_get_layout")}  # a layout name -> torch.layout
_SAFE_BUILTINS = {"set", "frozenset", "tuple", "list", "dict", "slice", "range", "complex"}


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler for DCP metadata that refuses anything but data classes (no code)."""

    def find_class(self, module: str, name: str) -> Any:
        import inspect

        obj = None
        if (module, name) in _SAFE_FUNCTIONS:
            obj = getattr(importlib.import_module(module), name)
        elif module.startswith("torch.distributed.checkpoint.") and not name.startswith("__"):
            cand = getattr(importlib.import_module(module), name, None)
            if inspect.isclass(cand):
                obj = cand
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            obj = getattr(torch, name)
        elif module in ("pathlib", "pathlib._local") and name in ("Path", "PosixPath", "WindowsPath",
                                                                  "PurePosixPath", "PureWindowsPath"):
            obj = getattr(importlib.import_module(module), name)
        elif module == "collections" and name == "OrderedDict":
            obj = collections.OrderedDict
        elif module == "builtins" and name in _SAFE_BUILTINS:
            obj = getattr(builtins, name)
        if obj is None:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in checkpoint metadata")
        return obj


def _safe_reader(path: str | Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader with a metadata unpickler that cannot run code."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            f = Path(self.path) / ".metadata"
            try:
                with open(f, "rb") as fh:
                    md = _MetadataUnpickler(fh).load()
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
                raise CheckpointError(f"{f}: unreadable or unsafe checkpoint metadata ({e})") from e
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(path))


def apply_fsdp(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each transformer block is its own unit, the rest the root's."""
    from torch.distributed.fsdp import fully_shard

    from hfmi_kit.models.encoder import Block

    for m in model.modules():
        if isinstance(m, Block):
            fully_shard(m)
    fully_shard(model)
    return model


def is_sharded(path: str | Path) -> bool:
    """Whether checkpoint directory ``path`` holds DCP shards."""
    return (Path(path) / SHARDED).is_dir()


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Collective: every process writes its shards of model and optimiser under ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Collective: read model and optimiser state from DCP shards written by any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    try:
        dcp.load(state, storage_reader=_safe_reader(path),
                 no_dist=not (dist.is_available() and dist.is_initialized()))
    except CheckpointError:
        raise
    except Exception as e:  # DCP raises several types for missing / corrupt shards
        raise CheckpointError(f"{path}: cannot read the sharded checkpoint ({e})") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def convert_sharded(step_dir: str | Path, out: str | Path) -> Path:
    """Convert a sharded step checkpoint into a ``save_pretrained`` directory at ``out``, on one
    process (no process group): the model is built from the checkpoint's config and the shards
    are read into it in place. Returns ``out``."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from hfmi_kit.domains import get_domain  # registers the model families of the recorded domain
    from hfmi_kit.models import create_model
    from hfmi_kit.train.pretrained import read_config, save_pretrained

    step_dir = Path(step_dir)
    if not is_sharded(step_dir):
        raise CheckpointError(f"{step_dir}: no '{SHARDED}/' folder; not a sharded checkpoint")
    cfg = read_config(step_dir)
    if cfg.get("domain"):
        get_domain(cfg["domain"])
    if "model_type" not in cfg:
        raise CheckpointError(f"{step_dir}/config.json: no model_type; cannot rebuild the model to convert")
    model = create_model(cfg["model_type"], **cfg.get("model_kwargs", {}))
    state: dict[str, Any] = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        try:
            dcp.load(state, storage_reader=_safe_reader(step_dir / SHARDED), no_dist=True)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{step_dir / SHARDED}: cannot read the shards ({e})") from e
    model.load_state_dict(state["model"])
    cfg = {k: v for k, v in cfg.items() if k not in ("schema_version", "code_version", "environment")}
    return save_pretrained(model, out, config=cfg)
