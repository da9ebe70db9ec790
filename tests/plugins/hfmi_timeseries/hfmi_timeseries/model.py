"""One backbone over patches of a series: a masked autoencoder to pretrain, a pooled regressor."""

from __future__ import annotations

import torch
from torch import nn

from hfmi_kit.models import Backbone, GridTokenizer, PooledHead, register_model
from hfmi_kit.models.config import EncoderConfig
from hfmi_kit.models.mae import MaskedAutoencoder


def _backbone(size: EncoderConfig, length: int, patch: int) -> Backbone:
    return Backbone(GridTokenizer(groups=["x"], grid=(length,), patch=(patch,), dim=size.dim), size)


@register_model("timeseries_mae")
class SeriesMAE(nn.Module):
    """Masked reconstruction of 1-D series (B, L): half of the patches hidden and predicted."""

    def __init__(self, *, size: EncoderConfig, length: int = 64, patch: int = 8, mask_ratio: float = 0.5) -> None:
        super().__init__()
        self.backbone = _backbone(size, length, patch)
        tok = self.backbone.tokenizer
        self.mae = MaskedAutoencoder(self.backbone, num_groups=1, num_positions=tok.num_patches,
                                     patch_numel=tok.patch_numel, mask_ratio=mask_ratio)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["inputs"]  # (B, L)
        tb = self.backbone.tokenizer({"x": x})
        loss, _, _ = self.mae(tb, self.backbone.tokenizer.patchify(x))
        return {"loss": loss}


@register_model("timeseries_regressor")
class SeriesRegressor(nn.Module):
    """The same backbone, mean-pooled, to one number per series."""

    def __init__(self, *, size: EncoderConfig, length: int = 64, patch: int = 8) -> None:
        super().__init__()
        self.backbone = _backbone(size, length, patch)
        self.head = PooledHead(dim=size.dim, out_dim=1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        tb = self.backbone.tokenizer({"x": x})
        return self.head(self.backbone.encode(tb), tb)[:, 0]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": ((self.predict(batch["inputs"]) - batch["target"]) ** 2).mean()}
