"""Checks every shipped checkpoint's test starts with (imported by the domains' end-to-end tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def shipped_checkpoint(name: str, example: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """The folder and config of shipped checkpoint ``name`` (``domain.size``), checked: listed,
    of that domain and size, with its model card and ``SOURCES.md``, recording ``example`` as the
    generated example data it was made from (when given), and loading strictly."""
    from hfmi_kit.checkpoints import shipped
    from hfmi_kit.train import load_pretrained, read_config

    domain, size = name.split(".")
    assert name in shipped(), sorted(shipped())
    ckpt = shipped()[name]
    cfg = read_config(ckpt)
    assert cfg["domain"] == domain and cfg["model_type"].endswith(f".{size}")
    if example is not None:
        assert cfg["training"]["example_data"] == example
    assert (ckpt / "MODEL_CARD.md").is_file() and (ckpt / "SOURCES.md").is_file()
    load_pretrained(ckpt)  # every tensor, strictly
    return ckpt, cfg
