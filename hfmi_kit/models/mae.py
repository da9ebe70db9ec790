"""Masked-autoencoder pretext task on any :class:`TokenBatch` (random and structured masking).

Masking is expressed as a score per token (low = keep) so that every strategy keeps the same
number of tokens in each sample of a batch:

- ``random``: independent noise per token.
- ``block``: one score per patch position, shared by every group (the same places are hidden in
  every variable: the model must fill space from neighbours, not copy another variable).
- ``group``: one score per group (whole variables or sources are hidden and predicted from
  the others); with ``group_map`` groups sharing a value are hidden together (all bands of
  one sensor).

The loss is computed on masked tokens only, on per-variable normalised inputs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hfmi_kit.errors import ConfigError
from hfmi_kit.models.encoder import Block, _init_weights
from hfmi_kit.models.posenc import sincos_1d
from hfmi_kit.models.tokenizers import TokenBatch

MaskStrategy = Literal["random", "block", "group"]


def mask_scores(batch: TokenBatch, strategy: str, batch_size: int,
                generator: torch.Generator | None = None, group_map: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token scores (B, T): unmaskable tokens get -inf (always kept); low score = keep.

    ``group_map`` (num_groups,) long: for ``group`` masking, the unit each group is hidden with.
    """
    T = batch.group_ids.numel()
    dev = batch.tokens.device
    if strategy == "random":
        s = torch.rand(batch_size, T, generator=generator).to(dev)
    elif strategy == "block":
        npos = int(batch.pos_ids.max().item()) + 1
        per_pos = torch.rand(batch_size, npos, generator=generator).to(dev)
        s = per_pos[:, batch.pos_ids.clamp_min(0)]
        s = s + 1e-6 * batch.group_ids.float()[None]  # ties broken by group, whole positions first
    elif strategy == "group":
        unit = batch.group_ids if group_map is None else group_map.to(dev)[batch.group_ids]
        per_unit = torch.rand(batch_size, int(unit.max().item()) + 1, generator=generator).to(dev)
        s = per_unit[:, unit] + 1e-6 * batch.pos_ids.float().clamp_min(0)[None]
    else:
        raise ConfigError(f"unknown mask strategy {strategy!r}; expected random, block or group")
    return s.masked_fill(~batch.maskable[None], float("-inf"))


class MAEDecoder(nn.Module):
    """Light transformer decoder: visible latents + mask tokens -> patch values per group.

    ``activation_checkpointing`` recomputes each block in the backward, as the encoder does: the
    decoder sees every token, so it holds most of an MAE's activations."""

    def __init__(self, *, enc_dim: int, dim: int, depth: int, heads: int, num_groups: int,
                 num_positions: int, patch_numel: int, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.group_embed = nn.Parameter(torch.zeros(num_groups, dim))
        self.register_buffer(
            "pos_embed", sincos_1d(torch.arange(num_positions + 1).float(), dim), persistent=False
        )
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, patch_numel)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.group_embed, std=0.02)

    def forward(self, latent: torch.Tensor, keep_idx: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """``latent`` (B, K, De) of kept tokens at ``keep_idx`` (B, K) -> (B, T, P) predictions."""
        B = latent.shape[0]
        T = batch.group_ids.numel()
        x = self.mask_token.expand(B, T, -1).clone()  # (B, T, Dd)
        emb = self.embed(latent)  # (B, K, Dd); bf16 under autocast
        x = x.to(emb.dtype).scatter(1, keep_idx[..., None].expand(-1, -1, x.shape[-1]), emb)
        x = x + self.group_embed[batch.group_ids] + self.pos_embed[batch.pos_ids + 1]
        for blk in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.out(self.norm(x))


def masked_mse(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over masked tokens only.

    ``pred``/``target`` (B, T, P); ``masked`` (B, T) bool; ``weight`` (B, T, P) or None marks
    valid elements (e.g. ocean cells of an ocean variable).
    """
    w = masked[..., None].to(pred.dtype).expand_as(pred)
    if weight is not None:
        w = w * weight
    return ((pred - target) ** 2 * w).sum() / w.sum().clamp_min(1.0)


def mae_forward(backbone: nn.Module, decoder: MAEDecoder, batch: TokenBatch, targets: torch.Tensor,
                weights: torch.Tensor | None = None, *, mask_ratio: float = 0.75, strategy: str = "random",
                group_map: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One MAE step: mask, encode visible tokens, decode all, loss on masked tokens
    (``group_map``: see :func:`mask_scores`).

    ``targets`` (B, T, P) are aligned with the batch's tokens (scalar tokens may hold anything:
    they are never masked); ``weights`` of the same shape marks valid elements. Returns
    ``(loss, pred, masked)``.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
    B, T, _ = batch.tokens.shape
    scores = mask_scores(batch, strategy, B, group_map=group_map)  # (B, T)
    n_maskable = int(batch.maskable.sum())
    n_keep = T - int(round(n_maskable * mask_ratio))
    keep_idx = torch.argsort(scores, dim=1)[:, :n_keep]  # (B, K)
    masked = torch.ones(B, T, dtype=torch.bool, device=scores.device)
    masked.scatter_(1, keep_idx, False)
    latent = backbone.encode(batch, keep_idx)  # (B, K, D)
    pred = decoder(latent, keep_idx, batch)  # (B, T, P)
    return masked_mse(pred, targets, masked, weights), pred, masked


def make_decoder(backbone: nn.Module, *, num_groups: int, num_positions: int, patch_numel: int) -> MAEDecoder:
    """The MAE decoder sized from the backbone's config."""
    cfg = backbone.cfg
    return MAEDecoder(enc_dim=cfg.dim, dim=cfg.decoder_dim, depth=cfg.decoder_depth,
                      heads=max(1, cfg.decoder_dim // 32), num_groups=num_groups,
                      num_positions=num_positions, patch_numel=patch_numel,
                      activation_checkpointing=cfg.activation_checkpointing)


class MaskedAutoencoder(nn.Module):
    """A backbone plus an MAE decoder; ``forward(batch, targets, weights)`` -> (loss, pred, masked)."""

    def __init__(self, backbone: nn.Module, *, num_groups: int, num_positions: int, patch_numel: int,
                 mask_ratio: float = 0.75, strategy: str = "random") -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        self.backbone = backbone
        self.decoder = make_decoder(backbone, num_groups=num_groups, num_positions=num_positions,
                                    patch_numel=patch_numel)
        self.mask_ratio = mask_ratio
        self.strategy = strategy

    def forward(self, batch: TokenBatch, targets: torch.Tensor, weights: torch.Tensor | None = None,
                strategy: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mae_forward(self.backbone, self.decoder, batch, targets, weights,
                           mask_ratio=self.mask_ratio, strategy=strategy or self.strategy)
