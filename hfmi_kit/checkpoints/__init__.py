"""Pretrained checkpoints that ship with the package, found by name (``materials.tiny``).

Each one is a checkpoint folder under ``hfmi_kit/checkpoints/<domain>.<size>/`` written by
``hfmi pretrain`` with the recipe its model card names (``config.json``, ``model.safetensors``,
``MODEL_CARD.md``, and ``SOURCES.md`` with the data's licence and the command that made it).
``--from materials.tiny`` (and ``ckpt="materials.tiny"`` in the notebooks and the Python API)
starts fine-tuning from it. A folder on disk of the same name wins: a name is looked up here
only when no such path exists.
"""

from __future__ import annotations

import re
from pathlib import Path

from hfmi_kit.errors import ConfigError

HERE = Path(__file__).resolve().parent
_NAME = re.compile(r"^[a-z][a-z0-9_]*\.[a-z0-9]+$")


def shipped() -> dict[str, Path]:
    """Every shipped checkpoint: name -> folder."""
    return {p.name: p for p in sorted(HERE.iterdir()) if p.is_dir() and (p / "config.json").is_file()}


def resolve(ckpt: str | Path | None) -> str | Path | None:
    """``ckpt`` itself when it is a path on disk (or None); the shipped folder when it names one.

    Raises:
        ConfigError: ``ckpt`` looks like a shipped name (``DOMAIN.SIZE``), is no path, and no
            checkpoint of that name ships.
    """
    if ckpt is None or Path(ckpt).exists():
        return ckpt
    name = str(ckpt)
    if not _NAME.match(name):
        return ckpt  # a path that does not exist: the loader names it
    found = shipped()
    if name not in found:
        raise ConfigError(f"{name}: no such checkpoint folder, and no shipped checkpoint of that name "
                          f"(shipped: {', '.join(found) or 'none'})")
    return found[name]
