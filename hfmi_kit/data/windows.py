"""Grid windows: whole-field prediction by overlapping windows, 2-D and 3-D, written once.

A model sees fixed-size windows (a carbon tile, a CT crop); a field or a volume is larger.
:func:`grid_windows` places windows at a stride of ``window * (1 - overlap)`` with the last one
flush with the end, so every cell is covered; :func:`blend_windows` averages overlapping
outputs (optionally weighted towards each window's centre) into a ``(channels, *shape)``
array; :func:`blend_argmax_windows` blends the windows' class probabilities with weights (a
Gaussian, as nnU-Net does) and keeps the label, streaming the blend along one axis so that only a
slab one window deep is ever accumulated: one byte (label) and one float (probability) per cell
of the output, whatever the number of classes; :func:`argmax_windows` is its cheaper, approximate
sibling: a cell keeps the class of the window most confident about it.

Windows are read through ``crop(corner)``, so a caller can cut them from an in-memory array, a
dict of source layers or a memory-mapped file; only ``batch_size`` windows are in memory at a
time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hfmi_kit.errors import ConfigError

Corner = tuple[int, ...]


def _as_window(window: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    w = (int(window),) * ndim if isinstance(window, (int, np.integer)) else tuple(int(x) for x in window)
    if len(w) != ndim or min(w) < 1:
        raise ConfigError(f"window {window!r} does not fit a {ndim}-D grid")
    return w


def window_starts(n: int, window: int, step: int) -> list[int]:
    """Start offsets along one axis of length ``n``: every ``step``, the last flush with the end
    (a single window at 0 when ``n <= window``)."""
    if step < 1:
        raise ConfigError(f"window step must be >= 1, got {step}")
    last = max(n - window, 0)
    s = list(range(0, last + 1, step))
    if s[-1] != last:
        s.append(last)
    return s


def grid_windows(shape: Sequence[int], window: int | Sequence[int], *, overlap: float = 0.5) -> list[Corner]:
    """Corners of the windows covering a grid of ``shape`` (2-D or 3-D) with ``overlap`` in [0, 1)."""
    if not 0 <= overlap < 1:
        raise ConfigError(f"window overlap must lie in [0, 1), got {overlap!r}")
    w = _as_window(window, len(shape))
    axes = [window_starts(int(n), wi, max(1, int(round(wi * (1 - overlap))))) for n, wi in zip(shape, w)]
    return list(itertools.product(*axes))


def centre_weight(window: int | Sequence[int], ndim: int, *, sigma: float = 0.25) -> torch.Tensor:
    """A separable Gaussian over a window (``sigma`` in window widths): the centre counts most,
    as in nnU-Net's sliding-window inference."""
    w = _as_window(window, ndim)
    out = torch.ones(())
    for i, wi in enumerate(w):
        ax = torch.arange(wi, dtype=torch.float32) - (wi - 1) / 2
        g = torch.exp(-(ax**2) / (2 * (wi * sigma) ** 2))
        out = out[..., None] * g.reshape((1,) * i + (wi,)) if i else g
    return out


def _stack(samples: Sequence[Any], device: torch.device | str) -> Any:
    if isinstance(samples[0], Mapping):
        return {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}
    return torch.stack(list(samples)).to(device)


def _slices(corner: Corner, w: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(a, a + wi) for a, wi in zip(corner, w))


@torch.no_grad()
def blend_windows(fn: Callable[[Any], torch.Tensor], crop: Callable[[Corner], Any], shape: Sequence[int],
                  window: int | Sequence[int], *, channels: int, overlap: float = 0.5, batch_size: int = 8,
                  weight: torch.Tensor | None = None, device: torch.device | str = "cpu",
                  corners: Sequence[Corner] | None = None) -> np.ndarray:
    """``(channels, *shape)`` float64: ``fn(batch) -> (B, channels, *window)`` over every window,
    overlaps averaged (weighted by ``weight``, one value per window cell, when given).

    ``crop(corner)`` returns one window's input (a tensor or a dict of tensors); windows are
    stacked ``batch_size`` at a time and moved to ``device``. ``corners`` (default
    :func:`grid_windows` of ``shape``) places the windows, e.g. the part of a larger grid's
    lattice that covers one block of it (see :func:`lattice_block`).
    """
    w = _as_window(window, len(shape))
    acc = np.zeros((channels, *shape))
    cnt = np.zeros(tuple(shape))
    wt = None if weight is None else weight.numpy().astype(np.float64)
    corners = grid_windows(shape, w, overlap=overlap) if corners is None else list(corners)
    for i in range(0, len(corners), batch_size):
        chunk = corners[i:i + batch_size]
        out = fn(_stack([crop(c) for c in chunk], device)).float().cpu().numpy()
        for c, o in zip(chunk, out):
            sl = _slices(c, w)
            if wt is None:
                acc[(slice(None), *sl)] += o
                cnt[sl] += 1
            else:
                acc[(slice(None), *sl)] += o * wt
                cnt[sl] += wt
    return acc / np.maximum(cnt, 1e-12 if wt is not None else 1)


def lattice_block(shape: Sequence[int], window: int | Sequence[int], lo: Sequence[int], hi: Sequence[int], *,
                  overlap: float = 0.5) -> tuple[tuple[int, ...], tuple[int, ...], list[Corner]]:
    """The windows of the lattice of a grid of ``shape`` (:func:`grid_windows`) that cover any cell
    of the block ``[lo, hi)``: ``(start, end, corners)``, the span they cover and their corners
    relative to ``start``. Blending them over the span gives, on the block, exactly the values of
    blending the whole grid, so a map can be made block by block with the same seams."""
    w = _as_window(window, len(shape))
    start, end, axes = [], [], []
    for n, wi, a, b in zip(shape, w, lo, hi):
        s = [x for x in window_starts(int(n), wi, max(1, int(round(wi * (1 - overlap))))) if x < b and x + wi > a]
        if not s:
            raise ConfigError(f"block {tuple(lo)}..{tuple(hi)} lies outside the grid {tuple(shape)}")
        start.append(s[0])
        end.append(s[-1] + wi)
        axes.append([x - s[0] for x in s])
    return tuple(start), tuple(end), list(itertools.product(*axes))


@torch.no_grad()
def argmax_windows(fn: Callable[[Any], torch.Tensor], crop: Callable[[Corner], Any], shape: Sequence[int],
                   window: int | Sequence[int], *, overlap: float = 0.5, batch_size: int = 4,
                   weight: torch.Tensor | None = None, device: torch.device | str = "cpu"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Label map (uint8) and confidence (float32) over a grid of ``shape``: ``fn(batch)`` gives
    logits ``(B, classes, *window)``; each window's softmax is reduced at once to (class,
    probability x ``weight``) and a cell keeps the class of the window most confident about it.
    Memory: one float32 and one uint8 per cell, whatever the number of classes."""
    w = _as_window(window, len(shape))
    best = torch.full(tuple(shape), -1.0)
    lab = torch.zeros(tuple(shape), dtype=torch.uint8)
    corners = grid_windows(shape, w, overlap=overlap)
    for i in range(0, len(corners), batch_size):
        chunk = corners[i:i + batch_size]
        prob = fn(_stack([crop(c) for c in chunk], device)).float().softmax(1).cpu()
        conf, cls = prob.max(1)
        if weight is not None:
            conf = conf * weight
        for c, cf, cl in zip(chunk, conf, cls):
            sl = _slices(c, w)
            upd = cf > best[sl]
            best[sl] = torch.where(upd, cf, best[sl])
            lab[sl] = torch.where(upd, cl.to(torch.uint8), lab[sl])
    return lab.numpy(), best.numpy()


def _along(axis: int, ndim: int, sl: slice, rest: Sequence[slice] | None = None) -> tuple[slice, ...]:
    """A slice tuple that is ``sl`` on ``axis`` and ``rest`` (default: everything) elsewhere."""
    out = [slice(None)] * ndim if rest is None else list(rest)
    out[axis] = sl
    return tuple(out)


@torch.no_grad()
def blend_argmax_windows(fn: Callable[[Any], torch.Tensor], crop: Callable[[Corner], Any], shape: Sequence[int],
                         window: int | Sequence[int], *, overlap: float = 0.5, batch_size: int = 4,
                         weight: torch.Tensor | None = None, device: torch.device | str = "cpu",
                         axis: int | None = None, average: str = "logits") -> tuple[np.ndarray, np.ndarray]:
    """Label map (uint8) and probability of that label (float32) over a grid of ``shape``:
    ``fn(batch)`` gives logits ``(B, classes, *window)``; the windows' logits (``average="logits"``,
    as nnU-Net blends them) or softmax probabilities (``"probabilities"``) are averaged with
    ``weight`` (one value per window cell; e.g. :func:`centre_weight`), exactly as
    :func:`blend_windows` would, and each cell takes the most probable class (the probability is
    the softmax of the averaged logits, or the averaged probability).

    The windows are visited in order along ``axis`` (default: the axis where a window is the
    smallest fraction of the grid). A cell is final once no later window can reach it, so only a
    slab ``window`` deep across the other axes is accumulated, ``classes + 1`` floats per slab
    cell; the output is 5 bytes per cell.
    """
    if average not in ("logits", "probabilities"):
        raise ConfigError(f"average must be 'logits' or 'probabilities', got {average!r}")
    ndim = len(shape)
    w = _as_window(window, ndim)
    if any(n < wi for n, wi in zip(shape, w)):
        raise ConfigError(f"grid {tuple(shape)} is smaller than the window {w}: pad it first")
    ax = int(np.argmin([wi / n for wi, n in zip(w, shape)])) if axis is None else int(axis)
    corners = sorted(grid_windows(shape, w, overlap=overlap), key=lambda c: c[ax])
    wt = torch.ones(w) if weight is None else weight.float().cpu()
    depth = w[ax]
    slab = tuple(depth if i == ax else int(n) for i, n in enumerate(shape))
    lab = np.zeros(tuple(shape), dtype=np.uint8)
    conf = np.zeros(tuple(shape), dtype=np.float32)
    state: dict[str, Any] = {"lo": 0, "acc": None, "cnt": torch.zeros(slab)}

    def flush(upto: int) -> None:
        """Finalise rows [lo, upto) along the axis and shift the slab past them."""
        lo, acc, cnt = state["lo"], state["acc"], state["cnt"]
        n = upto - lo
        if n <= 0:
            return
        head = _along(ax, ndim, slice(0, n))
        p = acc[(slice(None), *head)] / cnt[head].clamp_min(1e-12)
        best, cls = (p.softmax(0) if average == "logits" else p).max(0)
        out = _along(ax, ndim, slice(lo, upto))
        lab[out] = cls.to(torch.uint8).numpy()
        conf[out] = best.numpy()
        keep, tail = _along(ax, ndim, slice(n, depth)), _along(ax, ndim, slice(0, depth - n))
        cnt[tail] = cnt[keep].clone()
        acc[(slice(None), *tail)] = acc[(slice(None), *keep)].clone()
        cnt[_along(ax, ndim, slice(depth - n, depth))] = 0
        acc[(slice(None), *_along(ax, ndim, slice(depth - n, depth)))] = 0
        state["lo"] = upto

    for i in range(0, len(corners), batch_size):
        chunk = corners[i:i + batch_size]
        prob = fn(_stack([crop(c) for c in chunk], device)).float()
        prob = (prob.softmax(1) if average == "probabilities" else prob).cpu()
        if state["acc"] is None:
            state["acc"] = torch.zeros((prob.shape[1], *slab))
        for c, pr in zip(chunk, prob):
            flush(c[ax])
            sl = _along(ax, ndim, slice(0, depth), _slices(c, w))
            state["acc"][(slice(None), *sl)] += pr * wt
            state["cnt"][sl] += wt
    flush(int(shape[ax]))
    return lab, conf
