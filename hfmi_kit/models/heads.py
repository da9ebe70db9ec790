"""Heads that map encoder tokens to what a task needs: dense fields, pooled scalars, sequences."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hfmi_kit.models.tokenizers import TokenBatch, unpatchify


class DenseHead(nn.Module):
    """Map the tokens of source groups back to full fields (one output field per source group).

    Args:
        dim: token width.
        outputs: output name -> source group name whose tokens predict it.
        grid, patch: the tokenizer's grid and patch (output fields have shape ``grid``).
        hidden: width of an optional hidden layer (0: a linear map per output).
    """

    def __init__(self, *, dim: int, outputs: Mapping[str, str], grid: Sequence[int],
                 patch: Sequence[int], hidden: int = 0) -> None:
        super().__init__()
        self.outputs = dict(outputs)
        self.grid = tuple(grid)
        self.patch = tuple(patch)
        P = math.prod(self.patch)

        def make() -> nn.Module:
            if hidden:
                return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, P))
            return nn.Linear(dim, P)

        self.proj = nn.ModuleDict({name: make() for name in self.outputs})

    def forward(self, z: torch.Tensor, batch: TokenBatch) -> dict[str, torch.Tensor]:
        """``z`` (B, T, D) encoder output -> name -> (B, *grid)."""
        out = {}
        for name, src in self.outputs.items():
            s, e = batch.layout[src]
            out[name] = unpatchify(self.proj[name](z[:, s:e]), self.grid, self.patch)
        return out


class PooledHead(nn.Module):
    """Mean-pool non-padding tokens, then a linear map (``hidden=0``, a linear probe) or an MLP."""

    def __init__(self, *, dim: int, out_dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net: nn.Module = (
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
            if hidden else nn.Linear(dim, out_dim)
        )

    def forward(self, z: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """``z`` (B, T, D) -> (B, out_dim)."""
        if batch.padding is None:
            pooled = z.mean(dim=1)
        else:
            w = (~batch.padding).to(z.dtype)[..., None]  # (B, T, 1)
            pooled = (z * w).sum(1) / w.sum(1).clamp_min(1.0)
        return self.net(self.norm(pooled))


class SequenceHead(nn.Module):
    """A per-token linear map: (B, T, D) -> (B, T, out_dim), e.g. masked-element prediction."""

    def __init__(self, *, dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, z: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        return self.proj(z)
