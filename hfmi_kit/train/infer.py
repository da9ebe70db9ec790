"""Inference in one place: stacking samples into batches, batched and windowed prediction, and
what a checkpoint says to apply around its model.

- :func:`collate` stacks sample dicts (the training loop's batches, every evaluation) and
  checks them: the same keys and, per key, the same shape in every sample, or one clear line
  naming the key and the two shapes.
- :func:`batches` walks a dataset (or any indexable of samples) ``batch_size`` samples at a
  time, stacked and moved to a device.
- :class:`Predictor` is a model with its ``pre`` (a batch as the model takes it) and ``post``
  (the model's output in the field's units, calibrated) steps, built from a checkpoint's
  ``processors`` by the domain (:meth:`~hfmi_kit.domains.Domain.predictor`); it predicts
  on a batch or over column arrays. Window-by-window prediction over a field or a volume is
  :mod:`hfmi_kit.data.windows`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hfmi_kit.errors import DataError


def collate(items: Sequence[Mapping[str, Any]], *, keys: Sequence[str] | None = None,
            device: torch.device | str | None = None, where: str = "batch") -> dict[str, Any]:
    """Stack ``items`` (dicts of tensors, or of dicts of tensors: ``inputs`` may name several
    sources) key by key into one batch (only the top-level ``keys`` when given).

    Raises:
        DataError: the samples differ in their keys, or a key's shapes differ, naming both.
    """
    if not items:
        raise DataError(f"{where}: no samples to stack")
    first = items[0]
    names = list(keys) if keys is not None else list(first)
    out: dict[str, Any] = {}
    for k in names:
        for i, it in enumerate(items):
            if k not in it:
                raise DataError(f"{where}: sample {i} has no {k!r} (sample 0 has {sorted(first)})")
        if isinstance(first[k], Mapping):
            out[k] = collate([it[k] for it in items], device=device, where=f"{where}: {k!r}")
            continue
        vals = []
        for i, it in enumerate(items):
            v = it[k]
            if not isinstance(v, torch.Tensor):
                v = torch.as_tensor(v)
            if vals and v.shape != vals[0].shape:
                raise DataError(f"{where}: {k!r} of sample {i} has shape {tuple(v.shape)}, sample 0 "
                                f"{tuple(vals[0].shape)}")
            vals.append(v)
        t = torch.stack(vals)
        out[k] = t.to(device) if device is not None else t
    return out


def _tensors_only(item: Any) -> bool:
    """A sample :func:`collate` stacks: a dict whose values are tensors or such dicts."""
    return isinstance(item, Mapping) and all(isinstance(v, torch.Tensor) or _tensors_only(v) for v in item.values())


def batches(samples: Any, *, batch_size: int, indices: Sequence[int] | None = None,
            keys: Sequence[str] | None = None, device: torch.device | str | None = None
            ) -> Iterator[dict[str, torch.Tensor]]:
    """``samples[i]`` for ``indices`` (default: all), ``batch_size`` at a time, stacked by
    :func:`collate` and moved to ``device``."""
    idx = list(range(len(samples))) if indices is None else [int(i) for i in indices]
    for s in range(0, len(idx), batch_size):
        yield collate([samples[j] for j in idx[s:s + batch_size]], keys=keys, device=device)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


class Predictor:
    """``model`` with what is applied around it: ``post(model_fn(pre(batch)))``.

    ``model_fn`` defaults to calling the model; a domain passes the method that predicts (e.g.
    ``model.predict``). ``pre`` and ``post`` default to the identity. ``config`` is the
    checkpoint's config (its ``processors`` section holds what ``post`` applies); ``source``
    the checkpoint it was loaded from, where known.
    """

    def __init__(self, model: nn.Module, *, model_fn: Callable[..., Any] | None = None,
                 pre: Callable[[Any], Any] | None = None, post: Callable[[Any], Any] | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.model_fn = model_fn or model
        self.pre = pre or (lambda b: b)
        self.post = post or (lambda y: y)
        self.config = dict(config or getattr(model, "hfmi_config", {}) or {})
        self.source: Path | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str | torch.device = "cpu") -> Predictor:
        """The predictor the checkpoint's domain builds for it (:meth:`Domain.predictor`)."""
        from hfmi_kit.domains import get_domain
        from hfmi_kit.train.pretrained import load_pretrained

        model = load_pretrained(path, device=device)
        cfg = model.hfmi_config  # type: ignore[attr-defined]
        pred = get_domain(cfg["domain"]).predictor(model, cfg) if cfg.get("domain") else cls(model, config=cfg)
        pred.source = Path(path)
        return pred

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @torch.no_grad()
    def __call__(self, batch: Any) -> Any:
        return self.post(self.model_fn(self.pre(batch)))

    @torch.no_grad()
    def over_arrays(self, arrays: Mapping[str, np.ndarray], *, batch_size: int = 2048,
                    keys: Sequence[str] | None = None) -> list[Any]:
        """The output of every ``batch_size`` rows of column arrays (``{name: (N, ...)}``), in order."""
        names = list(keys) if keys is not None else list(arrays)
        n = len(arrays[names[0]])
        bad = [k for k in names if len(arrays[k]) != n]
        if bad:
            raise DataError(f"arrays {bad} have other lengths than {names[0]!r} ({n} rows)")
        dev = self.device
        return [self({k: torch.from_numpy(np.ascontiguousarray(arrays[k][s:s + batch_size])).to(dev)
                      for k in names}) for s in range(0, n, batch_size)]
