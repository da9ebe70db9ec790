"""The checks every explanation is held to.

Each domain's attribution method lives in its own folder (``hfmi_kit.domains.<x>.explain``) and
answers the field's question (which elements drive a band gap: ``domains.materials.explain``;
which sources drive a biomass estimate: ``domains.carbon.explain``). Every method is held to two
checks (Adebayo et al. 2018; Samek et al. 2017):

- :func:`randomization_check`: attributions of the trained model and of the same architecture
  with re-initialised weights must differ (low rank correlation); otherwise the method shows the
  input, not the model.
- :func:`deletion_check`: removing the inputs ranked highest must change the prediction more
  than removing as many inputs at random.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class CheckResult:
    """Outcome of a sanity or deletion check, with the numbers it rests on."""

    name: str
    passed: bool
    value: float  # randomisation: rank correlation; deletion: top-minus-random effect
    detail: str = ""


def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same architecture with every parameter re-initialised (``reset_parameters`` where a
    layer has one, N(0, 0.02) for the others): the model-randomisation baseline."""
    rnd = copy.deepcopy(model)
    torch.manual_seed(seed)
    covered: set[int] = set()
    for m in rnd.modules():
        if m is not rnd and callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
            covered.update(id(p) for p in m.parameters(recurse=False))
    with torch.no_grad():
        for p in rnd.parameters():
            if id(p) not in covered:
                p.normal_(0.0, 0.02)
    return rnd.eval()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two attribution arrays (flattened; NaN when either is constant)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def randomization_check(attributions: np.ndarray, random_attributions: np.ndarray | Sequence[np.ndarray], *,
                        threshold: float = 0.5) -> CheckResult:
    """Passes when the trained and randomised models' attributions are not rank-correlated
    above ``threshold`` (NaN, a constant map, counts as changed). ``random_attributions``: those
    of one randomised copy, or a list of several, whose mean |rho| is tested (a single random
    draw of a small model can rank a few inputs like the trained one by chance)."""
    if isinstance(random_attributions, list | tuple):
        finite = [abs(r) for r in (rank_correlation(attributions, x) for x in random_attributions) if not np.isnan(r)]
        rho = float(np.mean(finite)) if finite else float("nan")
        what = f"mean |Spearman rho| over {len(random_attributions)} randomised copies"
    else:
        rho, what = rank_correlation(attributions, random_attributions), "Spearman rho"
    ok = bool(np.isnan(rho) or abs(rho) < threshold)
    return CheckResult("model randomisation", ok, rho, f"{what} {rho:.3f} (pass: |rho| < {threshold})")


def deletion_check(effect_top: Callable[[], np.ndarray], effect_random: Callable[[int], np.ndarray], *,
                   draws: int = 5) -> CheckResult:
    """Passes when the mean prediction change from deleting the top-ranked inputs exceeds the
    mean change from deleting as many random inputs (``draws`` random draws)."""
    top = float(np.mean(effect_top()))
    rnd = float(np.mean([np.mean(effect_random(i)) for i in range(draws)]))
    return CheckResult("deletion", top > rnd, top - rnd, f"top-ranked {top:.4g} vs random {rnd:.4g}")


def zeroing_effect(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, score: np.ndarray, k: int,
                   base: np.ndarray) -> np.ndarray:
    """|f(x) - f(x')| per sample, where x' sets the ``k`` values of each sample with the highest
    ``score`` (same shape as ``x``) to 0 (the mean in normalised units)."""
    flat = score.reshape(score.shape[0], -1)
    drop = np.zeros_like(flat, dtype=bool)
    np.put_along_axis(drop, np.argsort(-flat, axis=1)[:, :k], True, axis=1)
    xd = torch.where(torch.from_numpy(drop.reshape(x.shape)), torch.zeros_like(x), x)
    with torch.no_grad():
        return np.abs(f(xd).numpy() - base)


def zeroing_checks(attribute: Callable[[nn.Module], np.ndarray], model: nn.Module, x: torch.Tensor,
                   f: Callable[[torch.Tensor], torch.Tensor], *, frac: float, seed: int = 0) -> list[CheckResult]:
    """Both checks for a method whose attributions have the shape of the input ``x``:
    ``attribute(model)`` for the trained and a randomised copy, then deletion (to 0) of the
    ``frac`` most attributed values against as many random values, measured by ``f``."""
    a = attribute(model)
    r = attribute(randomized_copy(model, seed))
    with torch.no_grad():
        base = f(x).numpy()
    k = max(1, int(frac * a[0].size))

    def random(i: int) -> np.ndarray:
        return zeroing_effect(f, x, np.random.default_rng(seed + 1 + i).random(a.shape), k, base)

    return [randomization_check(a, r), deletion_check(lambda: zeroing_effect(f, x, np.abs(a), k, base), random)]


__all__ = ["CheckResult", "deletion_check", "randomization_check", "randomized_copy", "rank_correlation",
           "zeroing_checks", "zeroing_effect"]
