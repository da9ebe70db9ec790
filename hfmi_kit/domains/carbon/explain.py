"""Which sources drive a biomass estimate: leave-one-band-out attributions of a carbon model's
mean biomass over each tile (a band removed is what the model sees where a sensor has no data:
absent tokens and NaN pixels), summed per source (optical, radar, lidar)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hfmi_kit.domains.base import Explanation
from hfmi_kit.explain import CheckResult, deletion_check, randomization_check, randomized_copy


def tiles(prep: Any, model: Any, *, n: int = 12, epoch: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` random model-sized tiles of one epoch of a prepared region: group -> (n, t, t)."""
    rng = np.random.default_rng(seed)
    t = model.tile
    H, W = prep.padded
    rc = [(int(rng.integers(0, H - t + 1)), int(rng.integers(0, W - t + 1))) for _ in range(n)]
    crops = [prep.window(epoch, r, c, t, t) for r, c in rc]
    return {g: torch.stack([torch.from_numpy(np.ascontiguousarray(f[g])) for f in crops])
            for g in model.groups if g in crops[0]}


def _mean_biomass(model: Any, batch: dict[str, torch.Tensor], drop: np.ndarray | None = None) -> np.ndarray:
    """(B,) tile-mean predicted biomass [Mg/ha] with the groups ``drop`` (B, G) removed."""
    groups = list(batch)
    b = dict(batch)
    if drop is not None:
        for j, g in enumerate(groups):
            rows = torch.from_numpy(drop[:, j])
            b[g] = torch.where(rows[:, None, None], torch.full_like(batch[g], float("nan")), batch[g])
    with torch.no_grad():
        return model.predict(b)[:, -1].mean(dim=(1, 2)).numpy()


def band_attributions(model: Any, batch: dict[str, torch.Tensor]) -> tuple[list[str], np.ndarray]:
    """The bands and (B, G) attributions [Mg/ha]: tile-mean biomass minus that without the band."""
    model.eval()
    groups = list(batch)
    base = _mean_biomass(model, batch)
    attr = np.zeros((len(base), len(groups)))
    for j in range(len(groups)):
        drop = np.zeros_like(attr, dtype=bool)
        drop[:, j] = True
        attr[:, j] = base - _mean_biomass(model, batch, drop)
    return groups, attr


def source_attributions(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Source -> mean |attribution| over the tiles, summed over its bands [Mg/ha]."""
    groups, attr = band_attributions(model, batch)
    out: dict[str, float] = {}
    for g, a in zip(groups, np.abs(attr).mean(0)):
        src = g.split(":", 1)[0]
        out[src] = out.get(src, 0.0) + float(a)
    return out


def checks(model: Any, batch: dict[str, torch.Tensor], *, k: int = 2, seed: int = 0,
           copies: int = 3) -> list[CheckResult]:
    """Randomisation check on the band attributions (against ``copies`` randomised models: a
    tile's few bands rank alike under one random draw by chance); deletion of the ``k`` bands
    with the largest |attribution| per tile against ``k`` random bands."""
    _, attr = band_attributions(model, batch)
    rnd = []
    for s in range(seed, seed + copies):
        rnd_model = randomized_copy(model, s)
        g = torch.Generator().manual_seed(s)
        for m in rnd_model.modules():  # a forest head is learned too: its leaf values shuffled
            if getattr(m, "has_forest", False):
                m.forest_value = m.forest_value[torch.randperm(m.forest_value.numel(), generator=g)]
        rnd.append(band_attributions(rnd_model, batch)[1])
    base = _mean_biomass(model, batch)

    def drop_by(score: np.ndarray) -> np.ndarray:
        d = np.zeros_like(score, dtype=bool)
        np.put_along_axis(d, np.argsort(-score, axis=1)[:, :k], True, axis=1)
        return np.abs(_mean_biomass(model, batch, d) - base)

    return [randomization_check(attr, rnd),
            deletion_check(lambda: drop_by(np.abs(attr)),
                           lambda i: drop_by(np.random.default_rng(seed + 1 + i).random(attr.shape)))]


def explain(pred: Any, bundle: Any, *, examples: int | None = None, seed: int = 0) -> Explanation:
    """Which sources drive the biomass estimate of ``examples`` (default 6) random tiles of the
    region a :func:`hfmi_kit.domains.carbon.tasks.load` bundle holds: each source's share of the
    leave-one-band-out attribution, with the randomisation and deletion checks on the bands."""
    prep = bundle.items[0]
    model = pred.model.eval()
    batch = tiles(prep, model, n=examples or 6, seed=seed)
    per_source = source_attributions(model, batch)
    total = sum(per_source.values())
    return Explanation(
        question="which sources drive the tile-mean biomass estimate", method="leave-one-band-out ablation "
        "(a band removed as where the sensor has no data), |attribution| summed per source",
        importance={k: (v / total if total > 0 else 0.0) for k, v in per_source.items()},
        checks=checks(model, batch, seed=seed), examples=len(next(iter(batch.values()))), unit="tile",
        detail={f"{k}_mg_ha": v for k, v in per_source.items()})


__all__: Sequence[str] = ["band_attributions", "checks", "explain", "source_attributions", "tiles"]
