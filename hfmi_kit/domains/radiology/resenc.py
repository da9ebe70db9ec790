"""A residual-encoder U-Net (in the manner of nnU-Net's ResEnc presets) and its masked-image pretraining.

The OpenMind / nnssl study found masked-image pretraining of a residual-encoder U-Net the
strongest 3-D SSL recipe, ahead of transformer backbones. This module gives that backbone under
the same registry and recipe as the transformer: ``radiology_resenc_mae.<size>`` pretrains,
``radiology_resenc_segmenter.<size>`` fine-tunes, and every weight but the two one-voxel heads
carries over.

- **Encoder**: a 3x3x3 stem, then stages of residual blocks (two 3x3x3 convolutions with instance
  norm and leaky ReLU around an identity or strided 1x1x1 shortcut); each stage after the first
  halves the grid. Stage widths and block counts come from the size (``tiny`` 16-128 with
  1, 1, 2, 2 blocks up to ``1b`` at nnU-Net ResEnc-L's 32-320 with 1, 3, 4, 6, 6, 6).
- **Decoder**: transposed-convolution upsampling, the encoder's skip concatenated, two plain
  convolutions per stage (nnU-Net's decoder).
- **Modalities**: the stem is one single-channel convolution shared by every modality, with a
  learned bias per modality; a multi-modal input is the mean of its channels' stems. So the
  pretrainer (one modality per crop) and a segmenter of any channel set share every stem weight.
- **Pretraining**: dense masking (SparK / nnssl): a ``mask_ratio`` share of the crop's ``patch``
  cubes is set to zero, the network reconstructs the voxels, the loss is the mean squared error
  on the masked voxels only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hfmi_kit.domains.radiology.model import input_channels, seg_loss
from hfmi_kit.errors import ConfigError
from hfmi_kit.models import EncoderConfig, register_model
from hfmi_kit.models.config import SIZES

#: (stage widths, residual blocks per stage) per size
PLANS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "tiny": ((16, 32, 64, 128), (1, 1, 2, 2)),
    "small": ((32, 64, 128, 256), (1, 2, 3, 4)),
    "base": ((32, 64, 128, 256, 320), (1, 3, 4, 6, 6)),
    "1b": ((32, 64, 128, 256, 320, 320), (1, 3, 4, 6, 6, 6)),
}


def _size_name(size: EncoderConfig) -> str:
    for name, cfg in SIZES.items():
        if cfg.dim == size.dim and cfg.depth == size.depth:
            return name
    raise ConfigError(f"no residual-encoder plan for an encoder of width {size.dim} and depth {size.depth}; "
                      f"sizes: {', '.join(PLANS)}")


def _norm_act(c: int) -> list[nn.Module]:
    return [nn.InstanceNorm3d(c, affine=True), nn.LeakyReLU(0.01, inplace=True)]


class ResBlock(nn.Module):
    """conv-norm-act-conv-norm plus a shortcut (1x1x1, strided, when the shape changes), then act."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), *_norm_act(cout),
                                  nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True))
        self.skip = (nn.Identity() if cin == cout and stride == 1 else
                     nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False),
                                   nn.InstanceNorm3d(cout, affine=True)))
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class ResEncUNet(nn.Module):
    """The residual-encoder U-Net body: ``features(x, modality_ids)`` -> (B, widths[0], c, c, c)."""

    def __init__(self, *, size: EncoderConfig, modalities: Sequence[str], crop: int = 32,
                 spacing: float | Sequence[float] = 3.0, **_: Any) -> None:
        super().__init__()
        widths, blocks = PLANS[_size_name(size)]
        if crop % 2 ** (len(widths) - 1):
            raise ConfigError(f"crop {crop} must be divisible by {2 ** (len(widths) - 1)} for the "
                              f"{len(widths)}-stage residual encoder")
        self.modalities, self.crop, self.spacing, self.widths = list(modalities), crop, spacing, widths
        self.stem = nn.Conv3d(1, widths[0], 3, padding=1, bias=False)
        self.modality_bias = nn.Embedding(len(self.modalities), widths[0])
        nn.init.zeros_(self.modality_bias.weight)
        self.stem_act = nn.Sequential(*_norm_act(widths[0]))
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stages.append(nn.Sequential(ResBlock(cin, w, stride=1 if i == 0 else 2),
                                        *[ResBlock(w, w) for _ in range(n - 1)]))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.ups = nn.ModuleList(nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2)
                                 for i in range(len(widths) - 1))
        self.dec = nn.ModuleList(nn.Sequential(nn.Conv3d(2 * widths[i], widths[i], 3, padding=1, bias=False),
                                               *_norm_act(widths[i]),
                                               nn.Conv3d(widths[i], widths[i], 3, padding=1, bias=False),
                                               *_norm_act(widths[i])) for i in range(len(widths) - 1))

    def stem_of(self, image: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        """``image`` (B, M, c, c, c) with modality ids ``ids`` (M) or (B, M): the mean of the channels' stems."""
        B, M = image.shape[:2]
        x = self.stem(image.reshape(B * M, 1, *image.shape[2:])).reshape(B, M, -1, *image.shape[2:])
        idx = torch.as_tensor(ids, device=image.device).reshape(-1, M).expand(B, M)
        x = x + self.modality_bias(idx)[..., None, None, None]
        return self.stem_act(x.mean(1))

    def features(self, image: torch.Tensor, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        x = self.stem_of(image, ids)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        for i in reversed(range(len(self.ups))):
            x = self.dec[i](torch.cat([self.ups[i](x), skips[i]], 1))
        return x


class ResEncMAE(ResEncUNet):
    """Masked-image pretraining of :class:`ResEncUNet` on single-modality crops (``inputs``
    (B, 1, c, c, c), ``modality`` (B,)): MSE on the masked ``patch`` cubes."""

    def __init__(self, *, mask_ratio: float = 0.75, patch: int = 4, **kw: Any) -> None:
        super().__init__(**kw)
        if self.crop % patch:
            raise ConfigError(f"crop {self.crop} must be divisible by the mask patch {patch}")
        self.mask_ratio, self.patch = mask_ratio, patch
        self.recon_head = nn.Conv3d(self.widths[0], 1, 1)

    def mask(self, image: torch.Tensor) -> torch.Tensor:
        """A (B, 1, c, c, c) mask, 1 on the hidden cubes (``mask_ratio`` of them, at random)."""
        B, g = image.shape[0], self.crop // self.patch
        n = g ** 3
        keep = torch.rand(B, n, device=image.device).argsort(1) < round(self.mask_ratio * n)
        m = keep.reshape(B, 1, g, g, g).to(image.dtype)
        return F.interpolate(m, scale_factor=self.patch, mode="nearest")

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["inputs"]
        m = self.mask(x)
        pred = self.recon_head(self.features(x * (1 - m), batch["modality"].reshape(-1, 1)))
        err = (pred.float() - x.float()) ** 2 * m
        return {"loss": err.sum() / m.sum().clamp_min(1.0)}

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor, modality: torch.Tensor, *, seed: int = 0) -> dict[str, torch.Tensor]:
        """Masked input, reconstruction (hidden cubes predicted, the rest kept) and mask as
        volumes (B, c, c, c), for the notebooks (as :meth:`.model.RadiologyMAE.reconstruct`)."""
        x = image[:, None]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            m = self.mask(x)
        pred = self.recon_head(self.features(x * (1 - m), modality.reshape(-1, 1)))
        return {"masked_input": (x * (1 - m))[:, 0], "reconstruction": (pred * m + x * (1 - m))[:, 0],
                "mask": m[:, 0]}


class ResEncSegmenter(ResEncUNet):
    """Tumour segmentation on :class:`ResEncUNet` (``modalities``: the modality table, the
    pretrainer's; ``input_modalities``: the image channels)."""

    def __init__(self, *, classes: int = 3, input_modalities: Sequence[str] | None = None, **kw: Any) -> None:
        kw.pop("patch", None)
        kw.pop("mask_ratio", None)
        super().__init__(**kw)
        self.classes = classes
        self.input_modalities, self.input_ids = input_channels(self.modalities, input_modalities)
        self.seg_head = nn.Conv3d(self.widths[0], classes, 1)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.seg_head(self.features(image, self.input_ids))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": seg_loss(self.logits(batch["inputs"]), batch["target"], self.classes)}


register_model("radiology_resenc_mae")(ResEncMAE)
register_model("radiology_resenc_segmenter")(ResEncSegmenter)
