"""One transformer encoder for every domain, on ``scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hfmi_kit.models.config import EncoderConfig


class Attention(nn.Module):
    """Multi-head self-attention; a boolean ``keep`` mask (B, 1, 1, T) hides padded keys."""

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, H, T, C/H)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, *, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, dropout=dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), keep)
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    """A stack of :class:`Block` with a final LayerNorm.

    ``forward(x, padding)`` takes tokens (B, T, D) and an optional padding mask (B, T) with True
    for padded tokens, and returns (B, T, D).
    """

    def __init__(self, cfg: EncoderConfig, *, depth: int | None = None, dim: int | None = None,
                 heads: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.dim = dim or cfg.dim
        n = depth or cfg.depth
        h = heads or cfg.heads
        self.blocks = nn.ModuleList(
            Block(self.dim, h, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, dropout=cfg.dropout)
            for _ in range(n)
        )
        self.norm = nn.LayerNorm(self.dim)
        self.activation_checkpointing = cfg.activation_checkpointing
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        keep = None if padding is None else (~padding)[:, None, None, :]  # (B, 1, 1, T)
        for blk in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, keep, use_reentrant=False)
            else:
                x = blk(x, keep)
        return self.norm(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
