"""Backbone size table: named encoder configs, from ``tiny`` (tests, laptops) to ``1b`` (planned)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hfmi_kit.errors import ConfigError


@dataclass(frozen=True)
class EncoderConfig:
    """Transformer encoder hyper-parameters (one flat config, nanoGPT style)."""

    dim: int = 192  # token width D
    depth: int = 6  # number of transformer blocks
    heads: int = 3  # attention heads; dim must divide by heads
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * dim
    dropout: float = 0.0  # dropout on attention output and MLP
    qkv_bias: bool = True  # bias in the q, k, v projection
    decoder_dim: int = 128  # width of the MAE decoder
    decoder_depth: int = 2  # blocks in the MAE decoder
    activation_checkpointing: bool = False  # recompute block activations in backward to save memory

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ConfigError(f"EncoderConfig: dim={self.dim} must be divisible by heads={self.heads}")
        if self.depth < 1 or self.dim < 8:
            raise ConfigError(f"EncoderConfig: depth={self.depth} and dim={self.dim} must be >= 1 and >= 8")

    def num_params(self) -> int:
        """Parameters of the encoder blocks alone (attention + MLP + norms)."""
        hidden = int(self.dim * self.mlp_ratio)
        per_block = 4 * self.dim * self.dim + 2 * self.dim * hidden + 9 * self.dim + hidden
        return self.depth * per_block


# Sizes are a table of configs, not functions. ``1b`` is planned (pre-flight, FSDP) and never
# built in tests.
SIZES: dict[str, EncoderConfig] = {
    "tiny": EncoderConfig(dim=64, depth=4, heads=4, decoder_dim=64, decoder_depth=1),
    "small": EncoderConfig(dim=384, depth=8, heads=6, decoder_dim=192, decoder_depth=2),
    "base": EncoderConfig(dim=768, depth=12, heads=12, decoder_dim=384, decoder_depth=4),
    "1b": EncoderConfig(dim=2048, depth=20, heads=16, decoder_dim=512, decoder_depth=4),
}


def get_size(name: str, **overrides: object) -> EncoderConfig:
    """Return the named size, with optional field overrides (e.g. ``activation_checkpointing``)."""
    if name not in SIZES:
        raise ConfigError(f"unknown model size {name!r}; expected one of {sorted(SIZES)}")
    cfg = SIZES[name]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg  # type: ignore[arg-type]
