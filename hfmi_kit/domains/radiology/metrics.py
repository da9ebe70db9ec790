"""Segmentation and localisation metrics in millimetres on the input grid.

Dice; the 95th-percentile symmetric Hausdorff distance between the mask surfaces (as MONAI's
``compute_hausdorff_distance(percentile=95)``: the larger of the two directed 95th
percentiles), with voxel spacing; centroid error and bounding boxes in world coordinates.
An empty prediction of a non-empty truth scores Dice 0 and the volume's diagonal as distance
(the BraTS convention), so a model cannot win by predicting nothing.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    s = p.sum() + t.sum()
    return 1.0 if s == 0 else float(2.0 * (p & t).sum() / s)


def _surface(m: np.ndarray) -> np.ndarray:
    return m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def diagonal_mm(shape: tuple[int, ...], spacing: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(shape) * np.asarray(spacing)))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: np.ndarray) -> float:
    """95th-percentile Hausdorff distance [mm] between the surfaces of two binary masks."""
    p, t = pred.astype(bool), truth.astype(bool)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return diagonal_mm(p.shape, spacing)
    sp, st = _surface(p), _surface(t)
    dt_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(max(np.percentile(dt_t[sp], 95), np.percentile(dt_p[st], 95)))


def centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray | None:
    """World (RAS mm) centroid of a mask, or None when empty."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    c = idx.mean(0)
    return affine[:3, :3] @ c + affine[:3, 3]


def bbox_world(mask: np.ndarray, affine: np.ndarray) -> list[float] | None:
    """Axis-aligned world bounding box [xmin, ymin, zmin, xmax, ymax, zmax] (mm) of a mask's voxel centres."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    lo, hi = idx.min(0), idx.max(0)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    w = corners @ affine[:3, :3].T + affine[:3, 3]
    return [float(x) for x in (*w.min(0), *w.max(0))]


def bbox_iou(a: list[float] | None, b: list[float] | None) -> float:
    if a is None or b is None:
        return 0.0
    lo = np.maximum(a[:3], b[:3])
    hi = np.minimum(a[3:], b[3:])
    inter = float(np.prod(np.clip(hi - lo, 0, None)))
    va, vb = np.prod(np.subtract(a[3:], a[:3])), np.prod(np.subtract(b[3:], b[:3]))
    union = float(va + vb - inter)
    return inter / union if union > 0 else 0.0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a binary mask (the localised lesion)."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def localise(pred: np.ndarray, affine: np.ndarray) -> dict[str, list[float] | None]:
    """The lesion's world centroid and bounding box (largest component of the whole-tumour mask)."""
    p = pred > 0
    loc = largest_component(p) if p.any() else p
    c = centroid_mm(loc, affine)
    return {"centroid_mm": None if c is None else [float(x) for x in c], "bbox_mm": bbox_world(loc, affine)}


def case_metrics(pred: np.ndarray, truth: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Whole-tumour (label > 0) and core (label 2) Dice, HD95, centroid error and box IoU of one case."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    p, t = pred > 0, truth > 0
    out = {"dice": dice(p, t), "hd95_mm": hd95(p, t, spacing), "dice_core": dice(pred == 2, truth == 2)}
    loc = largest_component(p) if p.any() else p
    cp, ct = centroid_mm(loc, affine), centroid_mm(t, affine)
    if ct is None:
        out["centroid_error_mm"] = 0.0 if cp is None else diagonal_mm(p.shape, spacing)
    else:
        out["centroid_error_mm"] = diagonal_mm(p.shape, spacing) if cp is None else float(np.linalg.norm(cp - ct))
    out["bbox_iou"] = bbox_iou(bbox_world(loc, affine), bbox_world(t, affine))
    out["volume_ml_pred"] = float(p.sum() * np.prod(spacing) / 1000.0)
    out["volume_ml_true"] = float(t.sum() * np.prod(spacing) / 1000.0)
    return out
