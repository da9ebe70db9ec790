"""Which elements drive a predicted band gap: leave-one-element-out attributions (captum's
FeatureAblation over a keep-mask of the composition's element tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hfmi_kit.domains.base import Explanation
from hfmi_kit.explain import CheckResult, deletion_check, randomization_check, randomized_copy


def _predict(model: Any, el: torch.Tensor, fr: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    from hfmi_kit.domains.materials.model import MaterialsEnsemble

    with torch.no_grad():
        if isinstance(model, MaterialsEnsemble):
            return model.predict_all(el, fr, pad)[0].mean(0)
        return model.predict(el, fr, pad)[0]


def element_attributions(model: Any, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """(N, S) attributions in eV: the predicted gap minus the gap predicted without that element
    (padding positions 0). ``arrays`` from :func:`hfmi_kit.domains.materials.chem.encode`."""
    from captum.attr import FeatureAblation

    model.eval()
    el, fr, pad = (torch.from_numpy(arrays[k]) for k in ("elements", "fractions", "padding"))

    def forward(keep: torch.Tensor) -> torch.Tensor:
        return _predict(model, el, fr, pad | (keep < 0.5))

    keep = (~pad).float()
    attr = FeatureAblation(forward).attribute(keep, baselines=0.0)
    return (attr * keep).numpy()


def explain_formulas(model: Any, formulas: Sequence[str]) -> list[dict[str, float]]:
    """Per formula, element -> attribution [eV] (what removing the element does to the gap)."""
    from hfmi_kit.domains.materials import chem, parse_formula

    parsed = [parse_formula(f) for f in formulas]
    arrays = chem.encode(parsed)
    attr = element_attributions(model, arrays)
    return [{e: float(a) for e, a in zip(p.elements, row)} for p, row in zip(parsed, attr)]


def checks(model: Any, arrays: dict[str, np.ndarray], *, k: int = 2, seed: int = 0) -> list[CheckResult]:
    """The randomisation and deletion checks on ``arrays`` (deletion: the ``k`` elements with the
    largest |attribution| against ``k`` random elements, on compositions with more than ``k``)."""
    attr = element_attributions(model, arrays)
    rnd = element_attributions(randomized_copy(model, seed), arrays)
    real = ~arrays["padding"]
    out = [randomization_check(attr[real], rnd[real])]
    el, fr, pad = (torch.from_numpy(arrays[x]) for x in ("elements", "fractions", "padding"))
    rows = np.flatnonzero(real.sum(1) > k)
    base = _predict(model, el[rows], fr[rows], pad[rows]).numpy()

    def effect(drop: np.ndarray) -> np.ndarray:
        p = pad[rows].clone()
        p[torch.from_numpy(drop)] = True
        return np.abs(_predict(model, el[rows], fr[rows], p).numpy() - base)

    def top() -> np.ndarray:
        score = np.where(real[rows], np.abs(attr[rows]), -np.inf)
        drop = np.zeros_like(score, dtype=bool)
        np.put_along_axis(drop, np.argsort(-score, axis=1)[:, :k], True, axis=1)
        return effect(drop)

    def random(i: int) -> np.ndarray:
        rng = np.random.default_rng(seed + 1 + i)
        score = np.where(real[rows], rng.random(real[rows].shape), -np.inf)
        drop = np.zeros_like(score, dtype=bool)
        np.put_along_axis(drop, np.argsort(-score, axis=1)[:, :k], True, axis=1)
        return effect(drop)

    out.append(deletion_check(top, random))
    return out


def explain(pred: Any, bundle: Any, *, examples: int | None = None, seed: int = 0) -> Explanation:
    """Which elements drive the predicted band gaps of up to ``examples`` (default 150) held-out
    compositions of a :func:`hfmi_kit.domains.materials.tasks.load` bundle, drawn at random:
    each element's share of the leave-one-element-out |attribution|, with the checks."""
    from hfmi_kit.domains.materials import chem

    test = bundle.items[1]
    parsed = list(test.parsed)
    n = min(examples or 150, len(parsed))
    take = np.sort(np.random.default_rng(seed).choice(len(parsed), size=n, replace=False))
    chosen = [parsed[i] for i in take]
    arrays = chem.encode(chosen)
    model = pred.model.eval()
    attr = np.abs(element_attributions(model, arrays))
    per_el: dict[str, float] = {}
    for p, row in zip(chosen, attr):
        for e, a in zip(p.elements, row):
            per_el[e] = per_el.get(e, 0.0) + float(a)
    total = sum(per_el.values())
    real = ~arrays["padding"]
    return Explanation(
        question="which elements drive the predicted band gap",
        method="leave-one-element-out ablation (captum FeatureAblation over the element tokens), |attribution| "
               "summed per element",
        importance={e: (v / total if total > 0 else 0.0) for e, v in sorted(per_el.items(), key=lambda kv: -kv[1])},
        checks=checks(model, arrays, seed=seed), examples=n, unit="composition",
        detail={"mean_abs_attribution_ev": float(attr[real].mean()) if real.any() else 0.0})
