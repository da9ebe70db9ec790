"""Discovery: substituted candidates of known absorbers ranked by predicted SQ efficiency, and a
simulated active-learning loop on measured data (how many measurements until absorbers are found).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hfmi_kit.domains.materials import chem
from hfmi_kit.domains.materials.pv import sq_limit
from hfmi_kit.domains.materials.tables import PropertyTable
from hfmi_kit.errors import ConfigError, DataError

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Template:
    """A known absorber with, per site, the elements that may substitute there."""

    name: str  # family, e.g. "ABX3 halide perovskite"
    seed: str  # the known absorber, e.g. "CsPbI3"
    sites: tuple[tuple[tuple[str, ...], float], ...]  # (allowed elements, amount) per site
    mix_last: bool = False  # also mix the last site 2:1 / 1:2 between two of its elements (I2Br)


TEMPLATES: tuple[Template, ...] = (
    Template("ABX3 halide perovskite", "CsPbI3",
             ((("Cs", "Rb", "K", "Tl"), 1), (("Pb", "Sn", "Ge"), 1), (("I", "Br", "Cl"), 3)), mix_last=True),
    Template("A2B(I)B(III)X6 double perovskite", "Cs2AgBiBr6",
             ((("Cs", "Rb", "K"), 2), (("Ag", "Cu", "Na"), 1), (("Bi", "Sb", "In"), 1), (("Cl", "Br", "I"), 6))),
    Template("ABX3 chalcogenide perovskite", "BaZrS3",
             ((("Ba", "Sr", "Ca"), 1), (("Zr", "Hf", "Ti"), 1), (("S", "Se"), 3))),
    Template("ABX2 chalcopyrite", "CuInSe2",
             ((("Cu", "Ag"), 1), (("In", "Ga", "Al"), 1), (("S", "Se", "Te"), 2))),
    Template("A2BCX4 kesterite", "Cu2ZnSnS4",
             ((("Cu", "Ag"), 2), (("Zn", "Cd", "Mg", "Fe"), 1), (("Sn", "Ge", "Si"), 1), (("S", "Se"), 4))),
    Template("AX II-VI / III-V", "CdTe",
             ((("Zn", "Cd", "Mg", "Ga", "In", "Al"), 1), (("O", "S", "Se", "Te", "N", "P", "As", "Sb"), 1))),
    Template("A2X3 sesquichalcogenide", "Sb2Se3",
             ((("Sb", "Bi", "In"), 2), (("S", "Se", "Te"), 3))),
)


def _formula(parts: Sequence[tuple[str, float]]) -> str:
    out = []
    for el, amt in parts:
        out.append(el if amt == 1 else f"{el}{amt:g}")
    return "".join(out)


def generate_candidates(templates: Sequence[Template] = TEMPLATES) -> Any:
    """Every substitution of every template, checked for charge balance with pymatgen's
    oxidation-state guesses. Returns a frame: formula, reduced formula, family, seed, charge
    balanced (rows that fail are kept and flagged, so the count of rejections is visible)."""
    import pandas as pd

    rows, seen = [], set()
    for t in templates:
        options = [s[0] for s in t.sites]
        for combo in itertools.product(*options):
            variants = [[(el, amt) for el, (_, amt) in zip(combo, t.sites)]]
            if t.mix_last:
                allowed, amt = t.sites[-1]
                for other in allowed:
                    if other != combo[-1]:
                        head = [(el, a) for el, (_, a) in zip(combo[:-1], t.sites[:-1])]
                        variants.append([*head, (combo[-1], amt * 2 / 3), (other, amt / 3)])
            for parts in variants:
                f = _formula(parts)
                p = chem.parse_formula(f)
                if p.reduced in seen:
                    continue
                seen.add(p.reduced)
                rows.append({"formula": f, "reduced_formula": p.reduced, "family": t.name, "seed": t.seed,
                             "charge_balanced": chem.charge_balanced(f)})
    return pd.DataFrame(rows)


def expected_sq(mu: np.ndarray, scale: np.ndarray, *, samples: int = 256, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Monte-Carlo moments of the SQ limit (%) and P(1.1 <= gap <= 1.6 eV) under the ensemble's
    Laplace mixture (``mu``, ``scale``: (K, N)). Returns (mean SQ, std SQ, P(target window))."""
    rng = np.random.default_rng(seed)
    K, N = mu.shape
    k = rng.integers(0, K, size=(samples, N))
    cols = np.arange(N)[None, :]
    g = np.clip(mu[k, cols] + rng.laplace(0.0, 1.0, size=(samples, N)) * scale[k, cols], 0.0, None)
    sq = 100 * sq_limit(g.reshape(-1)).reshape(g.shape)
    return sq.mean(0), sq.std(0), ((g >= 1.1) & (g <= 1.6)).mean(0)


def rank_candidates(ckpt: str | Path, candidates: Any | None = None, *, measured: PropertyTable | None = None,
                    kappa: float = 0.0, balanced_only: bool = True, seed: int = 0) -> Any:
    """Predict every candidate's gap with the fine-tuned ensemble and rank by expected SQ
    efficiency (+ ``kappa`` x its std: > 0 favours uncertain, worth-measuring candidates).

    Compositions already in ``measured`` get their measured gap and are flagged ``known``.
    Columns: formula, family, prediction_ev, uncertainty_ev, sq_limit_pct (at the predicted gap),
    expected_sq_pct, sq_std_pct, p_target_window, score, known, measured_ev, provenance.
    """
    from hfmi_kit.domains.materials.tasks import ensemble_moments, load_ensemble, predict_calibrated

    cands = generate_candidates() if candidates is None else candidates
    if balanced_only:
        cands = cands[cands["charge_balanced"]].reset_index(drop=True)
    if cands.empty:
        raise ConfigError("no candidates to rank")
    model, cfg = load_ensemble(ckpt)
    parsed = [chem.parse_formula(f) for f in cands["formula"]]
    mu, scale = predict_calibrated(model, cfg, chem.encode(parsed))
    mean, std = ensemble_moments(mu, scale)
    esq, ssq, pwin = expected_sq(mu, scale, seed=seed)
    out = cands.copy()
    out["prediction_ev"], out["uncertainty_ev"] = mean, std
    out["sq_limit_pct"] = 100 * sq_limit(mean)
    out["expected_sq_pct"], out["sq_std_pct"], out["p_target_window"] = esq, ssq, pwin
    out["score"] = esq + kappa * ssq
    known = dict(zip(measured.reduced, measured.value)) if measured is not None else {}
    out["known"] = [r in known for r in out["reduced_formula"]]
    out["measured_ev"] = [known.get(r, np.nan) for r in out["reduced_formula"]]
    out["provenance"] = [f"substitution of {s} ({fam}); model {ckpt} @ {cfg.get('code_version', '')}"
                         for s, fam in zip(out["seed"], out["family"])]
    return out.sort_values("score", ascending=False).reset_index(drop=True)


@dataclass
class ALResult:
    """Hits found after each measurement, per strategy and repeat."""

    hits: dict[str, np.ndarray] = field(default_factory=dict)  # strategy -> (repeats, budget) cumulative hits
    targets: int = 0
    pool: int = 0

    def measurements_to(self, n_hits: int) -> dict[str, float]:
        """Mean number of measurements until ``n_hits`` targets are found (budget + 1 if never)."""
        out = {}
        for name, h in self.hits.items():
            first = [int(np.argmax(r >= n_hits)) + 1 if (r >= n_hits).any() else h.shape[1] + 1 for r in h]
            out[name] = float(np.mean(first))
        return out

    def curves(self) -> Mapping[str, tuple[np.ndarray, np.ndarray]]:
        return {k: (np.arange(1, v.shape[1] + 1), v.mean(0)) for k, v in self.hits.items()}

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (atomically): what the dashboard reads."""
        from hfmi_kit.config import atomic_write_json

        atomic_write_json(Path(path), {"targets": self.targets, "pool": self.pool,
                                       "hits": {k: v.tolist() for k, v in self.hits.items()}})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ALResult:
        """Read a result written by :meth:`save`; a malformed file is a :class:`DataError`."""
        import json

        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            hits = {str(k): np.asarray(v, dtype=int) for k, v in raw["hits"].items()}
            if any(h.ndim != 2 for h in hits.values()):
                raise ValueError("hits must be (repeats, budget) arrays")
            return cls(hits=hits, targets=int(raw["targets"]), pool=int(raw["pool"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: not an active-learning result ({e})") from e


def discovery_features(pretrained: str | Path, table: PropertyTable) -> dict[str, np.ndarray]:
    """Features for :func:`active_learning`: the pretrained model's embedding plus its DFT-gap
    prediction (``foundation``; it never saw the measurements) and Magpie descriptors."""
    from hfmi_kit.checkpoints import resolve
    from hfmi_kit.domains.materials.tasks import embed_arrays, predict_arrays
    from hfmi_kit.train import load_pretrained

    arrays = chem.encode(table.parsed)
    net = load_pretrained(resolve(pretrained))  # a folder, or a shipped checkpoint's name
    return {"foundation": np.concatenate([embed_arrays(net, arrays), predict_arrays(net, arrays)[0].T], axis=1),
            "magpie": chem.magpie_features(table.parsed)}


def _window_probability(mean: np.ndarray, std: np.ndarray, lo: float, hi: float) -> np.ndarray:
    from scipy.stats import norm

    s = np.maximum(std, 0.05)
    return norm.cdf((hi - mean) / s) - norm.cdf((lo - mean) / s)


def active_learning(features: Mapping[str, np.ndarray], y: np.ndarray, *, window: tuple[float, float] = (1.1, 1.6),
                    budget: int = 200, initial: int = 10, batch: int = 5, repeats: int = 5, trees: int = 100,
                    seed: int = 0) -> ALResult:
    """Simulate discovery on a measured set: start from ``initial`` random measurements, then each
    round fit a random forest on what is measured (per feature set in ``features``), and measure
    the ``batch`` compositions most likely to have a gap in ``window`` (normal approximation from
    the spread of the trees). ``random`` measures at random. Every strategy of one repeat starts
    from the same initial measurements.
    """
    from sklearn.ensemble import RandomForestRegressor

    n = len(y)
    if not 0 < initial < budget <= n:
        raise ConfigError(f"need 0 < initial ({initial}) < budget ({budget}) <= pool size ({n})")
    target = (y >= window[0]) & (y <= window[1])
    res = ALResult(targets=int(target.sum()), pool=n)
    strategies = ["random", *features]
    for name in strategies:
        res.hits[name] = np.zeros((repeats, budget), dtype=int)
    for r in range(repeats):
        rng = np.random.default_rng(seed + r)
        init = rng.choice(n, size=initial, replace=False)
        for name in strategies:
            chosen = list(init)
            free = np.ones(n, dtype=bool)
            free[init] = False
            while len(chosen) < budget:
                take = min(batch, budget - len(chosen))
                idx_free = np.flatnonzero(free)
                if name == "random":
                    pick = rng.choice(idx_free, size=take, replace=False)
                else:
                    X = features[name]
                    rf = RandomForestRegressor(n_estimators=trees, min_samples_leaf=2, n_jobs=-1,
                                               random_state=seed + r).fit(X[chosen], y[chosen])
                    per_tree = np.stack([t.predict(X[idx_free]) for t in rf.estimators_])
                    p = _window_probability(per_tree.mean(0), per_tree.std(0), *window)
                    pick = idx_free[np.argsort(-p, kind="stable")[:take]]
                chosen.extend(int(i) for i in pick)
                free[pick] = False
            res.hits[name][r] = np.cumsum(target[np.asarray(chosen)])
    return res
