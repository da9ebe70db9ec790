"""Pick a model by name, timm style: ``create_model("climate_forecaster.tiny")``.

A family is registered once with :func:`register_model`; its sizes come from the size table in
:mod:`hfmi_kit.models.config`, so there is one constructor per family, not one per size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from hfmi_kit.errors import ConfigError
from hfmi_kit.models.config import SIZES, get_size

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model family constructor ``fn(*, size: EncoderConfig, **kw)``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """All ``family.size`` names that can be created."""
    return sorted(f"{fam}.{size}" for fam in _REGISTRY for size in SIZES)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Create ``family.size`` (size defaults to ``tiny``) with keyword arguments for the family."""
    family, _, size = name.partition(".")
    if family not in _REGISTRY:
        raise ConfigError(f"unknown model family {family!r}; registered: {sorted(_REGISTRY)}")
    size_overrides = kwargs.pop("size_overrides", {}) or {}
    return _REGISTRY[family](size=get_size(size or "tiny", **size_overrides), **kwargs)
