"""Tokenizers: gridded fields (1D/2D/3D) in per-variable token groups, and unordered sets.

A token group is one named input (a variable at a time offset, a source, a modality). Each group
has its own patch embedding and a learned group embedding; positions get fixed sin-cos codes. An
absent group contributes no tokens, so inputs with different variable sets share one encoder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hfmi_kit.errors import DataError
from hfmi_kit.models.posenc import sincos_1d, sincos_grid


@dataclass
class TokenBatch:
    """Tokens and their bookkeeping.

    Attributes:
        tokens: (B, T, D) token embeddings (group and position codes added).
        group_ids: (T,) index of each token's group in the tokenizer's group list.
        pos_ids: (T,) patch index of each token, -1 for scalar tokens.
        maskable: (T,) bool, True for tokens a masked-autoencoder may hide.
        layout: group name -> (start, end) slice in the sequence.
        padding: optional (B, T) bool, True where a token is padding (set inputs).
    """

    tokens: torch.Tensor
    group_ids: torch.Tensor
    pos_ids: torch.Tensor
    maskable: torch.Tensor
    layout: dict[str, tuple[int, int]] = field(default_factory=dict)
    padding: torch.Tensor | None = None


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, *grid) -> (B, N, P) with N = prod(grid // patch), P = prod(patch), row-major."""
    B, *grid = x.shape
    nd = len(patch)
    if len(grid) != nd or any(g % p for g, p in zip(grid, patch)):
        raise DataError(f"patchify: grid {tuple(grid)} is not divisible by patch {patch}")
    counts = [g // p for g, p in zip(grid, patch)]
    shape = [B]
    for n, p in zip(counts, patch):
        shape += [n, p]
    x = x.reshape(shape)
    perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)]
    return x.permute(perm).reshape(B, math.prod(counts), math.prod(patch))


def unpatchify(p: torch.Tensor, grid: tuple[int, ...], patch: tuple[int, ...]) -> torch.Tensor:
    """(B, N, P) -> (B, *grid), the inverse of :func:`patchify`."""
    B = p.shape[0]
    nd = len(patch)
    counts = [g // q for g, q in zip(grid, patch)]
    x = p.reshape([B, *counts, *patch])
    perm = [0]
    for i in range(nd):
        perm += [1 + i, 1 + nd + i]
    return x.permute(perm).reshape(B, *grid)


class GridTokenizer(nn.Module):
    """Tokenize named fields on one ``grid`` (1D, 2D or 3D) plus named scalars.

    Args:
        groups: names of the gridded token groups (e.g. ``tas@t0``).
        grid: shape of every gridded field, e.g. ``(lat, lon)``.
        patch: patch size per axis; must divide ``grid``.
        dim: token width D.
        scalars: names of scalar inputs (one token each, never masked).
        condition_on_scalars: also add each scalar's embedding to every gridded token, so a
            global forcing (CO2, a lead time) reaches every position directly.
    """

    def __init__(
        self,
        *,
        groups: Sequence[str],
        grid: Sequence[int],
        patch: Sequence[int],
        dim: int,
        scalars: Sequence[str] = (),
        condition_on_scalars: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.condition_on_scalars = condition_on_scalars
        self.groups = list(groups)
        self.scalars = list(scalars)
        self.grid = tuple(int(g) for g in grid)
        self.patch = tuple(int(p) for p in patch)
        if len(self.grid) not in (1, 2, 3) or len(self.patch) != len(self.grid):
            raise DataError(f"GridTokenizer: grid {self.grid} / patch {self.patch} must be 1-3 d")
        if any(g % p for g, p in zip(self.grid, self.patch)):
            raise DataError(f"GridTokenizer: grid {self.grid} not divisible by patch {self.patch}")
        if len(set(self.groups + self.scalars)) != len(self.groups) + len(self.scalars):
            raise DataError("GridTokenizer: group and scalar names must be unique")
        self.dim = dim
        self.patch_grid = tuple(g // p for g, p in zip(self.grid, self.patch))
        self.num_patches = math.prod(self.patch_grid)
        self.patch_numel = math.prod(self.patch)
        G = len(self.groups)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(G, self.patch_numel, dim, **kw))  # (G, P, D)
        self.bias = nn.Parameter(torch.zeros(G, dim, **kw))
        self.group_embed = nn.Parameter(torch.zeros(G + len(self.scalars), dim, **kw))
        if self.scalars:  # no empty parameters: DDP would find them unused
            self.scalar_proj = nn.Parameter(torch.empty(len(self.scalars), dim, **kw))
            self.scalar_bias = nn.Parameter(torch.zeros(len(self.scalars), dim, **kw))
            nn.init.trunc_normal_(self.scalar_proj, std=1.0)
        else:
            self.register_parameter("scalar_proj", None)
            self.register_parameter("scalar_bias", None)
        self.register_buffer("pos_embed", sincos_grid(self.patch_grid, dim), persistent=False)
        nn.init.trunc_normal_(self.weight, std=1.0 / math.sqrt(self.patch_numel))
        nn.init.trunc_normal_(self.group_embed, std=0.02)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def group_index(self, name: str) -> int:
        return (self.groups + self.scalars).index(name)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.patch)

    def unpatchify(self, p: torch.Tensor) -> torch.Tensor:
        return unpatchify(p, self.grid, self.patch)

    def forward(
        self,
        fields: Mapping[str, torch.Tensor],
        scalars: Mapping[str, torch.Tensor] | None = None,
    ) -> TokenBatch:
        """Tokenize ``fields`` (name -> (B, *grid)) and ``scalars`` (name -> (B,)).

        Unknown names raise :class:`DataError`; absent names simply give no tokens.
        """
        scalars = scalars or {}
        unknown = sorted((set(fields) - set(self.groups)) | (set(scalars) - set(self.scalars)))
        if unknown:
            raise DataError(
                f"GridTokenizer: unknown input(s) {unknown}; this model knows fields "
                f"{self.groups} and scalars {self.scalars}"
            )
        parts, gids, pids, maskable, layout = [], [], [], [], {}
        start = 0
        dev = self.weight.device
        cond = 0.0
        for si, name in enumerate(self.scalars):  # scalar tokens first, never masked
            if name not in scalars:
                continue
            v = scalars[name]
            tok = v[:, None, None].to(self.scalar_proj.dtype) * self.scalar_proj[si] + self.scalar_bias[si]
            if self.condition_on_scalars:
                cond = cond + tok  # (B, 1, D), broadcast onto every gridded token below
            gi = len(self.groups) + si
            parts.append(tok + self.group_embed[gi])  # (B, 1, D)
            gids.append(torch.full((1,), gi, device=dev))
            pids.append(torch.full((1,), -1, device=dev))
            maskable.append(torch.zeros(1, dtype=torch.bool, device=dev))
            layout[name] = (start, start + 1)
            start += 1
        for gi, name in enumerate(self.groups):
            if name not in fields:
                continue
            x = fields[name]
            if tuple(x.shape[1:]) != self.grid:
                raise DataError(
                    f"GridTokenizer: field {name!r} has shape {tuple(x.shape[1:])}, expected grid {self.grid}"
                )
            p = self.patchify(x.to(self.weight.dtype))  # (B, N, P)
            tok = p @ self.weight[gi] + self.bias[gi]  # (B, N, D)
            tok = tok + self.pos_embed.to(tok.dtype) + self.group_embed[gi] + cond
            parts.append(tok)
            N = self.num_patches
            gids.append(torch.full((N,), gi, device=dev))
            pids.append(torch.arange(N, device=dev))
            maskable.append(torch.ones(N, dtype=torch.bool, device=dev))
            layout[name] = (start, start + N)
            start += N
        if not parts:
            raise DataError("GridTokenizer: no inputs given; at least one field or scalar is needed")
        return TokenBatch(
            tokens=torch.cat(parts, dim=1),
            group_ids=torch.cat(gids),
            pos_ids=torch.cat(pids),
            maskable=torch.cat(maskable),
            layout=layout,
        )


class SetTokenizer(nn.Module):
    """Tokenize unordered sets of (element id, amount), e.g. the elements of a composition.

    There is no order: an element's identity embedding plays the role of a position, and the
    amount (a fraction) is encoded with sin-cos features on a log scale, so permutations of the
    input give permuted tokens and identical pooled outputs.
    """

    def __init__(
        self,
        *,
        num_elements: int,
        dim: int,
        amount_features: int = 32,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_elements = num_elements
        self.dim = dim
        self.amount_features = amount_features
        self.element_embed = nn.Embedding(num_elements, dim, **kw)
        self.amount_proj = nn.Linear(amount_features, dim, **kw)
        nn.init.trunc_normal_(self.element_embed.weight, std=0.02)

    def forward(self, elements: torch.Tensor, amounts: torch.Tensor, padding: torch.Tensor) -> TokenBatch:
        """``elements`` (B, S) long, ``amounts`` (B, S) float, ``padding`` (B, S) bool (True = pad)."""
        if elements.shape != amounts.shape or elements.shape != padding.shape:
            raise DataError(
                f"SetTokenizer: elements {tuple(elements.shape)}, amounts {tuple(amounts.shape)} and "
                f"padding {tuple(padding.shape)} must have the same (B, S) shape"
            )
        if (elements[~padding] < 0).any() or (elements[~padding] >= self.num_elements).any():
            raise DataError(f"SetTokenizer: element ids must lie in [0, {self.num_elements})")
        B, S = elements.shape
        logamt = torch.log10(amounts.clamp_min(1e-6)) * 10.0  # decibel-like scale
        feats = sincos_1d(logamt.reshape(-1), self.amount_features).reshape(B, S, -1).to(amounts.device)
        tok = self.element_embed(elements.clamp_min(0)) + self.amount_proj(feats.to(self.amount_proj.weight.dtype))
        tok = tok.masked_fill(padding[..., None], 0.0)
        dev = elements.device
        return TokenBatch(
            tokens=tok,
            group_ids=torch.zeros(S, dtype=torch.long, device=dev),
            pos_ids=torch.arange(S, device=dev),
            maskable=torch.ones(S, dtype=torch.bool, device=dev),
            layout={"set": (0, S)},
            padding=padding,
        )
