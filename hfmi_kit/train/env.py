"""The environment a run happened in: package versions, code version, device."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``hfmi_kit`` version plus the git commit of the source tree when there is one."""
    from hfmi_kit import __version__

    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=5, check=False,
        )
        sha = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def environment(device: str | torch.device | None = None) -> dict[str, str]:
    """What a checkpoint records of where it was written."""
    from hfmi_kit import __version__

    return {
        "hfmi_kit": __version__,
        "code_version": code_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device or "cpu"),
        "platform": platform.platform(),
    }
