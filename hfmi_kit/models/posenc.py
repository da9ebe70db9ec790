"""Fixed positional encodings for 1D, 2D and 3D patch grids and for scalar amounts."""

from __future__ import annotations

import math

import torch


def sincos_1d(positions: torch.Tensor, dim: int, *, max_period: float = 10000.0) -> torch.Tensor:
    """Sin-cos features of real-valued ``positions`` (N,) -> (N, dim); ``dim`` must be even."""
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    angles = positions.double()[:, None] * freqs[None, :]  # (N, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_grid(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Sin-cos encoding of an n-d patch grid, row-major order -> (prod(grid), dim).

    The width is split between axes (each part even); leftover channels are zero.
    """
    nd = len(grid)
    part = (dim // nd) // 2 * 2
    if part == 0:
        raise ValueError(f"sincos_grid: dim={dim} too small for a {nd}-d grid")
    coords = torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")
    feats = [sincos_1d(c.reshape(-1), part) for c in coords]
    out = torch.cat(feats, dim=1)
    if out.shape[1] < dim:
        out = torch.cat([out, torch.zeros(out.shape[0], dim - out.shape[1])], dim=1)
    return out  # (N, dim)
