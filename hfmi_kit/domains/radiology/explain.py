"""Which voxels drive a segmentation: integrated gradients (captum) of the segmenter's tumour
evidence (tumour minus background logit, averaged over the tumour) with respect to every input
voxel of every modality, on a crop centred on the tumour."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from hfmi_kit.domains.base import Explanation
from hfmi_kit.explain import CheckResult, zeroing_checks


def _tumour_crops(model: Any, cases: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M, c, c, c) crops of prepared ``cases`` centred on each one's tumour (the middle of
    the volume when it has none) and their (B, c, c, c) tumour masks."""
    c = model.crop
    imgs, masks = [], []
    for case in cases:
        lab = case.label > 0
        ctr = np.argwhere(lab).mean(0).round().astype(int) if lab.any() else np.array(lab.shape) // 2
        lo = [int(np.clip(ctr[i] - c // 2, 0, max(0, lab.shape[i] - c))) for i in range(3)]
        sl = tuple(slice(s, s + c) for s in lo)
        img = np.zeros((case.image.shape[0], c, c, c), np.float32)
        part = case.image[(slice(None), *sl)]
        img[(slice(None), *(slice(0, s) for s in part.shape[1:]))] = part
        m = np.zeros((c, c, c), np.float32)
        m[tuple(slice(0, s) for s in part.shape[1:])] = lab[sl]
        imgs.append(img)
        masks.append(m)
    return torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(masks))


def explain(pred: Any, bundle: Any, *, examples: int | None = None, seed: int = 0) -> Explanation:
    """Which modalities and which voxels drive the segmenter's tumour evidence on crops centred
    on the tumours of ``examples`` (default 2) held-out cases of a
    :func:`hfmi_kit.domains.radiology.tasks.load` bundle, drawn at random: each modality's share
    of the |integrated gradients|, with the checks; ``detail`` gives the share that falls inside
    the tumour and the tumour's share of the crop's voxels (a model that looks at the lesion has
    the first well above the second)."""
    from hfmi_kit.domains.radiology import store as rstore

    items = bundle.items
    n = min(examples or 2, len(items))
    take = sorted(np.random.default_rng(seed).choice(len(items), size=n, replace=False).tolist())
    cases = (items[i] if isinstance(items, rstore.LazyCases) else pred.prepare(items[i]) for i in take)
    model = pred.model.eval()
    image, mask = _tumour_crops(model, cases)
    a = np.abs(attributions(model, image, mask))  # (B, M, c, c, c)
    per_mod = a.sum(axis=(0, 2, 3, 4))
    names = list(pred.config.get("geometry", {}).get("modalities") or [f"channel_{i}" for i in range(len(per_mod))])
    total = float(per_mod.sum())
    inside = float((a.sum(axis=1) * mask.numpy()).sum() / max(total, 1e-30))
    return Explanation(
        question="which modalities and voxels drive the tumour evidence (tumour minus background logit, averaged "
                 "over the tumour)",
        method="integrated gradients (captum, 8 steps, from a mean-intensity baseline) on tumour-centred crops",
        importance={m: float(x / total) if total > 0 else 0.0 for m, x in zip(names, per_mod)},
        checks=checks(model, image, mask, seed=seed), examples=n, unit="held-out case",
        detail={"inside_tumour_share": inside, "tumour_voxel_share": float(mask.numpy().mean())})
def _target(model: Any, mask: torch.Tensor) -> Any:
    def f(image: torch.Tensor) -> torch.Tensor:
        rep = image.shape[0] // mask.shape[0]
        m = mask.repeat(rep, 1, 1, 1)
        lg = model.logits(image)  # (B, classes, c, c, c)
        ev = lg[:, 1:].max(1).values - lg[:, 0]
        return (ev * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1.0)

    return f


def attributions(model: Any, image: torch.Tensor, mask: torch.Tensor, *, steps: int = 8) -> np.ndarray:
    """(B, M, c, c, c) integrated gradients from a mean-intensity (0) baseline."""
    from captum.attr import IntegratedGradients

    x = image.clone().requires_grad_(True)
    return IntegratedGradients(_target(model, mask)).attribute(x, baselines=torch.zeros_like(x),
                                                               n_steps=steps).detach().numpy()


def checks(model: Any, image: torch.Tensor, mask: torch.Tensor, *, frac: float = 0.02,
           seed: int = 0) -> list[CheckResult]:
    """Randomisation check; deletion of the ``frac`` most attributed voxels (set to 0) against
    as many random voxels, measured on the tumour evidence."""
    return zeroing_checks(lambda m: attributions(m, image, mask), model, image, _target(model, mask), frac=frac,
                          seed=seed)
