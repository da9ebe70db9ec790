"""Which variables and regions drive a forecast: integrated gradients (captum) of the network's
correction to the statistical skip path, for one variable's lead-1 forecast (latitude-weighted
global mean), with respect to every input field (context step, variable, grid cell).

The forecaster predicts x(t+1) = skip(x) + scale * Δ(x); the skip path (damped anomaly
persistence with a forcing response) is fitted statistics, so the attribution is of Δ, the
part the network learned (and the part pretraining changes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hfmi_kit.explain import CheckResult, zeroing_checks


def samples(ckpt: str | Path, data: str | Path, *, n: int = 8) -> tuple[Any, dict[str, torch.Tensor]]:
    """The model and ``n`` evaluation windows (the years it was not trained on) of ``data``."""
    from hfmi_kit.domains.climate import data as cdata
    from hfmi_kit.domains.climate.tasks import load_with_geometry, predictor
    from hfmi_kit.train import load_pretrained
    from hfmi_kit.train.infer import collate

    cfg, d = load_with_geometry(ckpt, data)
    geom = cfg["geometry"]
    pred = predictor(load_pretrained(ckpt), cfg)
    model, tens = pred.model, pred.pre(d)
    seen = set(geom.get("split", {}).get("train_years", ())) | set(geom.get("split", {}).get("val_years", ()))
    idx = np.flatnonzero(~np.isin(d.years, list(seen)))
    win = cdata.ForecastWindows(tens, idx if idx.size > 4 else np.arange(d.time.size),
                                context=int(cfg["model_kwargs"]["context"]))
    take = np.linspace(0, len(win) - 1, min(n, len(win))).round().astype(int)
    items = [win[int(i)] for i in take]
    return model, collate(items, keys=("inputs", "forcing", "scalars", "mask", "phase"), where="explanation batch")


def _target(model: Any, batch: dict[str, torch.Tensor], var: str) -> Any:
    """inputs (B, C, V, H, W) -> (B,) the network's correction to ``var`` at lead 1, averaged
    over the valid cells with latitude weights, in normalised units."""
    vi = list(model.variables).index(var)

    def f(inputs: torch.Tensor) -> torch.Tensor:
        B = inputs.shape[0]
        rep = B // batch["forcing"].shape[0]  # captum stacks the interpolation steps on the batch
        forcing = batch["forcing"][:, 0].repeat(rep, 1, 1, 1)
        scalars = batch["scalars"][:, 0].repeat(rep, 1)
        tb = model.tokenize(inputs, forcing, scalars)
        delta = model.head(model.backbone.encode(tb), tb)[var]  # (B, H, W)
        w = model.lat_weight * batch["mask"][:1, vi]  # (1, H, W)
        return model.residual_scale[0, vi, 0, 0] * (delta * w).sum(dim=(1, 2)) / w.sum().clamp_min(1e-6)

    return f


def attributions(model: Any, batch: dict[str, torch.Tensor], *, var: str = "tas", steps: int = 16) -> np.ndarray:
    """(B, C, V, H, W) integrated gradients (baseline: the mean state, 0 in normalised units) of
    the network's (latitude-weighted, global-mean) correction to ``var`` at lead 1."""
    from captum.attr import IntegratedGradients

    x = batch["inputs"].clone().requires_grad_(True)
    ig = IntegratedGradients(_target(model, batch, var))
    return ig.attribute(x, baselines=torch.zeros_like(x), n_steps=steps).detach().numpy()


def importance(model: Any, batch: dict[str, torch.Tensor], **kw: Any) -> tuple[dict[str, float], np.ndarray]:
    """Per input variable the share of |attribution|, and the (H, W) map of |attribution|."""
    a = np.abs(attributions(model, batch, **kw))
    per_var = a.sum(axis=(0, 1, 3, 4))
    return ({v: float(x / per_var.sum()) for v, x in zip(model.variables, per_var)}, a.sum(axis=(0, 1, 2)))


def checks(model: Any, batch: dict[str, torch.Tensor], *, var: str = "tas", frac: float = 0.05,
           seed: int = 0) -> list[CheckResult]:
    """Randomisation check; deletion of the ``frac`` most attributed input values (set to the
    climatological mean) against as many random ones, measured on the network's correction."""
    return zeroing_checks(lambda m: attributions(m, batch, var=var), model, batch["inputs"],
                          _target(model, batch, var), frac=frac, seed=seed)
