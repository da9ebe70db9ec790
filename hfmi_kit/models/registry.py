"""Pick a model by name, timm style: ``create_model("climate_forecaster.tiny")``.

A family is registered once with :func:`register_model`; its sizes come from the size table in
:mod:`hfmi_kit.models.config`, so there is one constructor per family, not one per size.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from torch import nn

from hfmi_kit.errors import ConfigError
from hfmi_kit.models.config import SIZES, get_size

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model family: a module class, or a constructor
    ``fn(*, size: EncoderConfig, **kw)``, called with the family's size and keyword arguments."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """All ``family.size`` names that can be created."""
    return sorted(f"{fam}.{size}" for fam in _REGISTRY for size in SIZES)


def accepted_kwargs(name: str) -> set[str] | None:
    """The keyword arguments family ``name`` (``family`` or ``family.size``) accepts, read from the
    signatures of its class (registered, or named by its constructor's return annotation) and that
    class's bases up to the first ``__init__`` without ``**kw``; None when the family is not
    registered or this cannot be told."""
    fn = _REGISTRY.get(name.partition(".")[0])
    if fn is None:
        return None
    if isinstance(fn, type):
        cls: Any = fn
    else:
        try:
            cls = typing.get_type_hints(fn).get("return")
        except Exception:  # an annotation that does not resolve here
            return None
    if not isinstance(cls, type) or cls is nn.Module or not issubclass(cls, nn.Module):
        return None
    names = {"size_overrides"}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self", "size"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def check_kwargs(name: str, kwargs: dict[str, Any], *, where: str = "model_kwargs") -> None:
    """Refuse keyword arguments family ``name`` does not accept (when that can be told).

    Raises:
        ConfigError: naming ``where``, the unknown keys and the accepted ones.
    """
    known = accepted_kwargs(name)
    if known is None:
        return
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {name.partition('.')[0]}; it accepts "
                          f"{sorted(known)}")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Create ``family.size`` (size defaults to ``tiny``) with keyword arguments for the family.

    Raises:
        ConfigError: an unknown family, or a keyword argument the family does not accept.
    """
    family, _, size = name.partition(".")
    if family not in _REGISTRY:
        raise ConfigError(f"unknown model family {family!r}; registered: {sorted(_REGISTRY)}")
    check_kwargs(name, kwargs)
    size_overrides = kwargs.pop("size_overrides", {}) or {}
    return _REGISTRY[family](size=get_size(size or "tiny", **size_overrides), **kwargs)
