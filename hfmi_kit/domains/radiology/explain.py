"""Which voxels drive a segmentation: integrated gradients (captum) of the segmenter's tumour
evidence (tumour minus background logit, averaged over the tumour) with respect to every input
voxel of every modality, on a crop centred on the tumour."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hfmi_kit.explain import CheckResult, zeroing_checks


def crops(ckpt: str | Path, data: str | Path, *, n: int = 2) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The segmenter and (B, M, c, c, c) image crops with (B, c, c, c) tumour masks, centred on
    the tumours of ``n`` test subjects (those fine-tuning never saw)."""
    from hfmi_kit.domains.radiology import discover, split_subjects
    from hfmi_kit.domains.radiology.tasks import predictor
    from hfmi_kit.train import load_pretrained

    pred = predictor(load_pretrained(ckpt))
    model = pred.model
    _, test = split_subjects(discover(data))
    c = model.crop
    imgs, masks = [], []
    for sub in test[:n]:
        case = pred.prepare(sub)
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
    return model, torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(masks))


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
