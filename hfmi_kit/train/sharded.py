"""Sharded training: FSDP2 (``torch.distributed.fsdp.fully_shard``) wrapping and step checkpoints
through ``torch.distributed.checkpoint`` (DCP).

A sharded step checkpoint is a directory with ``config.json``, ``train_state.pt`` (schedule,
data position, RNG; no tensors of the model) and ``sharded/`` (the DCP files of the model and
optimiser). DCP re-shards on load, so it resumes on any number of processes, and
:func:`convert_sharded` turns it, offline on one CPU, into the single-file
:func:`~hfmi_kit.train.save_pretrained` form: the model is built once and DCP reads the shards
into its tensors in place, so the whole model is never held twice.

DCP pickles its ``.metadata`` file; reading it here goes through :class:`SafeReader`:

- its unpickler admits only the data classes DCP's metadata is made of (:data:`METADATA_CLASSES`:
  tensor and chunk descriptions, storage offsets, sizes, dtypes and paths), nothing that can act
  (sockets, stores, processes, files), so unpickling it cannot run code or open a connection;
- every entry must describe a tensor: DCP turns *bytes* entries into objects with an unpickling
  ``torch.load``, so they are refused before anything is read (hfmi_kit keeps the optimiser's
  plain-value ``param_groups`` in ``train_state.pt``, which loads with ``weights_only=True``);
- every storage location must be a file directly inside the shard folder, so a crafted file
  cannot make DCP read outside it; the tensor shards themselves load with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hfmi_kit.errors import CheckpointError

SHARDED = "sharded"
_DCP_META = "torch.distributed.checkpoint.metadata"
#: (module, name) of every class the metadata unpickler admits; each is a plain data holder
METADATA_CLASSES: frozenset[tuple[str, str]] = frozenset({
    (_DCP_META, "Metadata"), (_DCP_META, "TensorStorageMetadata"), (_DCP_META, "BytesStorageMetadata"),
    (_DCP_META, "ChunkStorageMetadata"), (_DCP_META, "TensorProperties"), (_DCP_META, "MetadataIndex"),
    (_DCP_META, "StorageMeta"), (_DCP_META, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout name -> torch.layout
    ("torch", "Size"), ("collections", "OrderedDict"),
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib._local", "Path"), ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),
})
LEGACY_BYTES_PREFIX = "optim.param_groups."  # non-tensor entries hfmi_kit wrote before 0.1 (never read)


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler for DCP metadata that admits :data:`METADATA_CLASSES` and torch dtypes only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_CLASSES:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in checkpoint metadata")


def read_metadata(folder: str | Path) -> Any:
    """The checked metadata of DCP shard folder ``folder`` (see the module docstring); raises
    :class:`CheckpointError` naming the file and the entry for anything else."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

    f = Path(folder) / ".metadata"
    try:
        with open(f, "rb") as fh:
            md = _MetadataUnpickler(fh).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError,
            KeyError, RuntimeError) as e:
        raise CheckpointError(f"{f}: unreadable or unsafe checkpoint metadata ({e})") from e
    if not isinstance(md, Metadata) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise CheckpointError(f"{f}: not DCP checkpoint metadata (found {type(md).__name__})")
    for key, entry in list(md.state_dict_metadata.items()):
        if isinstance(entry, BytesStorageMetadata) and str(key).startswith(LEGACY_BYTES_PREFIX):
            del md.state_dict_metadata[key]  # plain values of an old optimiser state: never read
        elif not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{f}: entry {key!r} is {type(entry).__name__}, not a tensor; sharded "
                                  "checkpoints may hold tensors only (non-tensor entries are unpickled on load)")
    storage = getattr(md, "storage_data", None) or {}
    if not isinstance(storage, dict):
        raise CheckpointError(f"{f}: storage_data is {type(storage).__name__}, expected a mapping")
    for idx, info in storage.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or rel in (".", "..") or "/" in rel or "\\" in rel or "\x00" in rel:
            raise CheckpointError(f"{f}: entry {getattr(idx, 'fqn', idx)!r} is stored at {rel!r}, which is not a "
                                  "file of the shard folder")
        for what in ("offset", "length"):
            v = getattr(info, what, None)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise CheckpointError(f"{f}: entry {getattr(idx, 'fqn', idx)!r} has {what} {v!r}")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{f}: entry {getattr(idx, 'fqn', idx)!r} uses storage transforms "
                                  f"{info.transform_descriptors!r}, which hfmi_kit does not write or read")
        shard = Path(folder) / rel
        if not shard.is_file():
            raise CheckpointError(f"{f}: shard file {rel} is missing")
        if info.offset + info.length > shard.stat().st_size:
            raise CheckpointError(f"{shard}: truncated (entry {getattr(idx, 'fqn', idx)!r} ends at byte "
                                  f"{info.offset + info.length}, the file has {shard.stat().st_size})")
    return md


def _safe_reader(path: str | Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader with checked metadata (see :func:`read_metadata`)."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md = read_metadata(self.path)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(path))


def _load_planner() -> Any:
    """DCP's default load planner, except that it refuses to unpickle anything (a second guard
    behind :func:`read_metadata`, which already refuses non-tensor entries)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise CheckpointError(f"refusing to unpickle the non-tensor checkpoint entry {read_item.dest_index.fqn!r}")

    return TensorsOnlyPlanner()


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


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path, *,
                 best: dict[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Collective: every process writes its shards of model and optimiser (and of ``best``, the
    best-so-far weights, when given) under ``path``; only tensors go into the shards. Returns the
    optimiser's ``param_groups`` (plain values), which the caller stores in ``train_state.pt``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": msd, "optim": {"state": osd["state"]}}
    if best is not None:
        state["best"] = best
    dcp.save(state, checkpoint_id=str(path))
    return osd["param_groups"]


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path,
                 param_groups: list[dict[str, Any]] | None = None, *,
                 best: bool = False) -> dict[str, torch.Tensor] | None:
    """Collective: read model and optimiser state from DCP shards written by any number of
    processes. ``param_groups`` are the ones :func:`save_sharded` returned (None for a checkpoint
    of an older hfmi_kit: the optimiser keeps its own groups; the caller restores the LR). With
    ``best``, also reads the best-so-far weights and returns them (sharded like the model's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": msd, "optim": {"state": osd["state"]}}
    if best:
        state["best"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    read_metadata(path)  # refuse a bad file here, with its own message (DCP would wrap it in its own)
    try:
        dcp.load(state, storage_reader=_safe_reader(path), planner=_load_planner(),
                 no_dist=not (dist.is_available() and dist.is_initialized()))
    except CheckpointError:
        raise
    except Exception as e:  # DCP raises several types for missing / corrupt shards
        raise CheckpointError(f"{path}: cannot read the sharded checkpoint ({_first_line(e)})") from e
    groups = osd["param_groups"]
    if param_groups is not None:
        if len(param_groups) != len(groups):
            raise CheckpointError(f"{path}: {len(param_groups)} optimiser parameter groups, the model has "
                                  f"{len(groups)}")
        groups = param_groups
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"]["state"], "param_groups": groups})
    return state.get("best")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


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
    read_metadata(step_dir / SHARDED)  # before anything is built or read
    if cfg.get("domain"):
        get_domain(cfg["domain"])
    if "model_type" not in cfg:
        raise CheckpointError(f"{step_dir}/config.json: no model_type; cannot rebuild the model to convert")
    model = create_model(cfg["model_type"], **cfg.get("model_kwargs", {}))
    state: dict[str, Any] = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        try:
            dcp.load(state, storage_reader=_safe_reader(step_dir / SHARDED), planner=_load_planner(), no_dist=True)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{step_dir / SHARDED}: cannot read the shards ({_first_line(e)})") from e
    model.load_state_dict(state["model"])
    cfg = {k: v for k, v in cfg.items() if k not in ("schema_version", "code_version", "environment")}
    return save_pretrained(model, out, config=cfg)
