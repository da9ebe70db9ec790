"""Pretrained checkpoints that ship with the package, found by name (``materials.tiny``).

Each one is a checkpoint folder under ``hfmi_kit/checkpoints/<domain>.<size>/`` written by
``hfmi pretrain`` with the recipe its model card names (``config.json``, ``model.safetensors``,
``MODEL_CARD.md``, and ``SOURCES.md`` with the data's licence and the command that made it).
``--from materials.tiny`` (and ``ckpt="materials.tiny"`` in the notebooks and the Python API)
starts fine-tuning from it. A folder on disk of the same name wins: a name is looked up here
only when no such path exists.

A checkpoint pretrained on generated example data records how to make it again
(``training.example_data``: the seed and size of :meth:`Domain.example_data`);
:func:`recorded_data` regenerates it where the recorded folder is absent (a shipped checkpoint
on another machine), so that fine-tuning it without ``--data`` uses the data it was made from,
with the same test cases held out.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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


def recorded_data(ckpt: str | Path, out_dir: str | Path) -> Path:
    """The data checkpoint ``ckpt`` (a folder or a shipped name) was trained on: the folder its
    config records (``training.data``, else the first data entry of its card) when that exists;
    otherwise, when it records the generated example data it was made from, that data generated
    again under ``out_dir`` (once: a copy already there with the same record is reused).

    Raises:
        ConfigError: no data recorded, or a recorded folder that is gone and cannot be regenerated.
    """
    import json

    from hfmi_kit.config import atomic_write_json
    from hfmi_kit.train import read_config

    folder = Path(resolve(ckpt) or ckpt)
    cfg = read_config(folder)
    training: dict[str, Any] = cfg.get("training") or {}
    card_data = (cfg.get("card") or {}).get("data") or [{}]
    data = training.get("data") or (card_data[0].get("path") if isinstance(card_data[0], dict) else None)
    example = training.get("example_data")
    if data and Path(data).exists():
        return Path(data)
    if not isinstance(example, dict) or not isinstance(example.get("seed"), int):
        raise ConfigError(f"{folder}: " + (f"the data it records ({data}) is not on this machine; pass --data"
                                           if data else "no data recorded in the checkpoint; pass --data"))
    from hfmi_kit.domains import get_domain

    rec = {"domain": cfg.get("domain"), "seed": example["seed"], "small": bool(example.get("small", True))}
    out_dir = Path(out_dir)
    done = out_dir / "example_data.json"
    try:
        old = json.loads(done.read_text(encoding="utf-8")) if done.is_file() else {}
    except (OSError, ValueError):
        old = {}
    if isinstance(old, dict) and {k: old.get(k) for k in rec} == rec:
        made = (out_dir / str(old.get("path"))).resolve()
        if made.is_relative_to(out_dir.resolve()) and made.exists():  # a record never points out of its folder
            return made
    print(f"generating the example data {folder.name} was pretrained on (seed {rec['seed']}) under {out_dir}",
          flush=True)
    path = Path(get_domain(str(rec["domain"])).example_data(out_dir, seed=rec["seed"], small=rec["small"]))
    atomic_write_json(done, {**rec, "path": str(path.relative_to(out_dir))})
    return path
