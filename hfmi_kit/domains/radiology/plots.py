"""Radiology plots (HoloViews): orthogonal slices with mask overlays and a slice slider,
masked-patch reconstructions, and the label-efficiency curve. Notebooks and dashboards share them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hfmi_kit.viz import require_holoviews

MASK_COLOURS = ["#f4a261", "#e63946"]  # oedema, core


def _slice(vol: np.ndarray, axis: int, idx: int) -> np.ndarray:
    return np.take(vol, idx, axis=axis).T  # rows = second remaining axis (image "up")


def orthoviews(image: np.ndarray, masks: Mapping[str, np.ndarray] | None = None, *, title: str = "",
               positions: Sequence[int] | None = None, size: int = 240, centre: Sequence[int] | None = None,
               dynamic: bool = False) -> Any:
    """Sagittal, coronal and axial slices of ``image`` (I, J, K on a RAS-ordered grid) with
    label overlays (name -> label map, one column per name) and one slider for the slice
    position (in % of each axis; 50 = the middle, or ``centre`` when given). ``dynamic`` makes a
    DynamicMap that cuts (and sends to a browser) only the slices shown, as the dashboard does;
    otherwise every position is precomputed so a saved notebook keeps its slider."""
    hv = require_holoviews()
    masks = dict(masks or {})
    positions = list(positions or range(10, 95, 5))
    lo, hi = np.percentile(image, [1, 99.5])
    names = ("sagittal", "coronal", "axial")
    n = image.shape

    def index(ax: int, pos: int) -> int:
        if centre is None:
            return int(round((n[ax] - 1) * pos / 100))
        return int(np.clip(centre[ax] + round((pos - 50) / 100 * n[ax]), 0, n[ax] - 1))

    def base(ax: int, pos: int) -> Any:
        idx = index(ax, pos)
        return hv.Image(_slice(image, ax, idx)[::-1], bounds=(0, 0, 1, 1)).opts(
            cmap="gray", clim=(float(lo), float(hi)), xaxis=None, yaxis=None, width=size, height=size,
            title=f"{names[ax]} {idx}")

    def overlaid(ax: int, mname: str, pos: int) -> Any:
        idx = index(ax, pos)
        sl = _slice(masks[mname], ax, idx)[::-1].astype(np.float32)
        sl[sl == 0] = np.nan
        over = hv.Image(sl, bounds=(0, 0, 1, 1)).opts(cmap=MASK_COLOURS, clim=(0.5, 2.5), alpha=0.55,
                                                        xaxis=None, yaxis=None)
        return (base(ax, pos) * over).opts(title=f"{names[ax]} {idx}: {mname}")

    kdim = hv.Dimension("slice position [%]", values=positions, default=positions[len(positions) // 2])
    makers = []
    for ax in range(3):
        makers.append(lambda pos, ax=ax: base(ax, pos))
        makers.extend(lambda pos, ax=ax, m=m: overlaid(ax, m, pos) for m in masks)
    if dynamic:
        panels = [hv.DynamicMap(f, kdims=[kdim]) for f in makers]
    else:
        panels = [hv.HoloMap({p: f(p) for p in positions}, kdims=[kdim]) for f in makers]
    return hv.Layout(panels).cols(1 + len(masks)).opts(title=title)


def reconstruction_panels(out: Mapping[str, np.ndarray], original: np.ndarray, *, size: int = 200) -> Any:
    """Middle axial slice of a crop: original, masked input, MAE reconstruction."""
    hv = require_holoviews()
    k = original.shape[2] // 2
    lo, hi = np.percentile(original, [1, 99.5])
    items = [("original", original), ("masked input", out["masked_input"]), ("reconstruction", out["reconstruction"])]
    return hv.Layout([hv.Image(v[:, :, k].T[::-1], bounds=(0, 0, 1, 1)).opts(
        cmap="gray", clim=(float(lo), float(hi)), width=size, height=size, xaxis=None, yaxis=None, title=t)
        for t, v in items]).cols(3)
