"""Which variables and regions drive a forecast: integrated gradients (captum) of the network's
correction to the statistical skip path, for one variable's lead-1 forecast (latitude-weighted
global mean), with respect to every input field (context step, variable, grid cell).

The forecaster predicts x(t+1) = skip(x) + scale * Δ(x); the skip path (damped anomaly
persistence with a forcing response) is fitted statistics, so the attribution is of Δ, the
part the network learned (and the part pretraining changes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hfmi_kit.domains.base import Explanation
from hfmi_kit.explain import CheckResult, zeroing_checks


def _windows(pred: Any, d: Any, idx: np.ndarray, n: int) -> dict[str, torch.Tensor]:
    """A batch of ``n`` forecast windows spread evenly over the start times ``idx`` (all times
    when there are too few) of climate data ``d``, normalised as ``pred`` takes them."""
    from hfmi_kit.domains.climate import data as cdata
    from hfmi_kit.train.infer import collate

    tens = pred.pre(d)
    win = cdata.ForecastWindows(tens, idx if idx.size > 4 else np.arange(d.time.size),
                                context=int(pred.config["model_kwargs"]["context"]))
    take = np.linspace(0, len(win) - 1, min(n, len(win))).round().astype(int)
    items = [win[int(i)] for i in take]
    return collate(items, keys=("inputs", "forcing", "scalars", "mask", "phase"), where="explanation batch")


def explain(pred: Any, bundle: Any, *, examples: int | None = None, seed: int = 0,
            variable: str | None = None) -> Explanation:
    """Which input variables drive the network's lead-1 correction of ``variable`` (default
    ``tas`` when the model has it, else its first) on ``examples`` (default 4) windows of the
    held-out years of a :func:`hfmi_kit.domains.climate.tasks.load` bundle: each variable's
    share of the |integrated gradients|, with the checks. ``detail`` gives the share of the
    attribution on the variable itself and in the tropics (|lat| < 30)."""
    from hfmi_kit.errors import ConfigError

    model = pred.model.eval()
    names = list(model.variables)
    var = variable or ("tas" if "tas" in names else names[0])
    if var not in names:
        raise ConfigError(f"{pred.source}: the model forecasts {names}, not {var!r}")
    held = bundle.items
    batch = _windows(pred, held.data, held.eval_idx, examples or 4)
    share, amap = importance(model, batch, var=var)
    lat = np.asarray(held.data.lat, dtype=float)
    detail = {"self_share": float(share[var])}
    if amap.shape[0] == lat.size:  # the attribution map on the data's grid
        detail["tropics_share"] = float(amap[np.abs(lat) < 30].sum() / max(float(amap.sum()), 1e-30))
    return Explanation(
        question=f"which input variables drive the lead-1 forecast of {var} (the network's correction to the "
                 "statistical skip path, latitude-weighted global mean)",
        method="integrated gradients (captum, 16 steps, from the climatological mean)", importance=share,
        checks=checks(model, batch, var=var, seed=seed), examples=int(batch["inputs"].shape[0]), unit="forecast window",
        detail=detail)
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
