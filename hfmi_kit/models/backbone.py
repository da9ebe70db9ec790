"""The shared backbone: a tokenizer followed by the transformer encoder."""

from __future__ import annotations

import torch
from torch import nn

from hfmi_kit.models.config import EncoderConfig
from hfmi_kit.models.encoder import Encoder
from hfmi_kit.models.tokenizers import TokenBatch


class Backbone(nn.Module):
    """``tokenizer`` -> :class:`Encoder`. Parameter names are stable across domains.

    Names under ``backbone.tokenizer.*`` have layer id 0, ``backbone.encoder.blocks.{i}.*`` layer
    ``i + 1`` and everything else (final norm, heads) ``depth + 1``; the engine uses these ids for
    layer-wise learning-rate decay.
    """

    def __init__(self, tokenizer: nn.Module, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.encoder = Encoder(cfg)

    @property
    def depth(self) -> int:
        return len(self.encoder.blocks)

    def encode(self, batch: TokenBatch, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Encode all tokens (B, T, D), or only those at ``keep_idx`` (B, K) -> (B, K, D)."""
        x, pad = batch.tokens, batch.padding
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
            pad = None if pad is None else torch.gather(pad, 1, keep_idx)
        return self.encoder(x, pad)


def layer_id(name: str, depth: int) -> int:
    """Layer index of parameter ``name`` for layer-wise LR decay (see :class:`Backbone`)."""
    if ".tokenizer." in f".{name}" or name.startswith("tokenizer."):
        return 0
    marker = "encoder.blocks."
    if marker in name:
        return int(name.split(marker, 1)[1].split(".", 1)[0]) + 1
    return depth + 1
