"""3-D models: the masked-autoencoder pretrainer, the segmenter on the same backbone, a U-Net baseline.

Every modality is cut into the same 3-D patches by one shared patch embedding; a learned
modality token (an embedding added to each of its patch tokens) tells the encoder which
contrast it sees. The pretrainer sees one volume of any modality per sample; the segmenter
sees all of a subject's modalities at once (their tokens concatenated, so attention can
combine contrasts), averages the encoder outputs of each patch over modalities and decodes
them to voxels with a small convolutional decoder that also takes the full-resolution image
(UNETR-style). Inference runs over whole volumes with :func:`sliding_window_labels`: the windows'
logits are blended with a Gaussian weight, one window-deep slab at a time, so a volume costs one
label and one probability per voxel plus a slab of class buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hfmi_kit.errors import ConfigError
from hfmi_kit.models import Backbone, EncoderConfig, GridTokenizer, TokenBatch, register_model
from hfmi_kit.models.mae import mae_forward, make_decoder


class RadiologyNet(nn.Module):
    """Shared 3-D patch tokenizer + modality tokens + encoder."""

    def __init__(self, *, size: EncoderConfig, modalities: Sequence[str], crop: int = 32, patch: int = 4,
                 spacing: float | Sequence[float] = 3.0) -> None:
        super().__init__()
        self.modalities, self.crop, self.patch, self.spacing = list(modalities), crop, patch, spacing
        tok = GridTokenizer(groups=["image"], grid=(crop,) * 3, patch=(patch,) * 3, dim=size.dim)
        self.backbone = Backbone(tok, size)
        self.modality_embed = nn.Embedding(len(self.modalities), size.dim)
        nn.init.normal_(self.modality_embed.weight, std=0.02)

    @property
    def tokenizer(self) -> GridTokenizer:
        return self.backbone.tokenizer  # type: ignore[return-value]

    def tokens(self, image: torch.Tensor, modality: torch.Tensor) -> TokenBatch:
        """One volume per sample: ``image`` (B, c, c, c), ``modality`` (B,) -> tokens (B, N, D)."""
        tb = self.tokenizer({"image": image})
        tb.tokens = tb.tokens + self.modality_embed(modality)[:, None, :].to(tb.tokens.dtype)
        return tb

    def multi_tokens(self, image: torch.Tensor, ids: Sequence[int]) -> TokenBatch:
        """Several modalities: ``image`` (B, M, c, c, c) with modality ids ``ids`` -> (B, M*N, D)."""
        B, M = image.shape[:2]
        parts = [self.tokens(image[:, i], torch.full((B,), m, dtype=torch.long, device=image.device)).tokens
                 for i, m in enumerate(ids)]
        N = self.tokenizer.num_patches
        dev = image.device
        return TokenBatch(tokens=torch.cat(parts, 1), group_ids=torch.zeros(M * N, dtype=torch.long, device=dev),
                          pos_ids=torch.arange(N, device=dev).repeat(M),
                          maskable=torch.ones(M * N, dtype=torch.bool, device=dev),
                          layout={self.modalities[m]: (i * N, (i + 1) * N) for i, m in enumerate(ids)})


class RadiologyMAE(RadiologyNet):
    """3-D masked autoencoder over single-modality crops (targets: the normalised voxels of each patch)."""

    def __init__(self, *, mask_ratio: float = 0.75, **kw: Any) -> None:
        super().__init__(**kw)
        tok = self.tokenizer
        self.decoder = make_decoder(self.backbone, num_groups=1, num_positions=tok.num_patches,
                                    patch_numel=tok.patch_numel)
        self.mask_ratio = mask_ratio

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        img = batch["inputs"][:, 0]
        tb = self.tokens(img, batch["modality"])
        tgt = self.tokenizer.patchify(img)
        loss, _, _ = mae_forward(self.backbone, self.decoder, tb, tgt, mask_ratio=self.mask_ratio, strategy="random")
        return {"loss": loss}

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor, modality: torch.Tensor, *, seed: int = 0) -> dict[str, torch.Tensor]:
        """Masked input, reconstruction and mask as volumes (B, c, c, c), for the notebooks."""
        tb = self.tokens(image, modality)
        tgt = self.tokenizer.patchify(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, pred, masked = mae_forward(self.backbone, self.decoder, tb, tgt, mask_ratio=self.mask_ratio)
        m = masked[..., None].expand_as(tgt).to(image.dtype)
        tok = self.tokenizer
        return {"masked_input": tok.unpatchify(tgt * (1 - m)),
                "reconstruction": tok.unpatchify(pred * m + tgt * (1 - m)), "mask": tok.unpatchify(m)}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True),
                         nn.LeakyReLU(0.01, inplace=True), nn.Conv3d(cout, cout, 3, padding=1, bias=False),
                         nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01, inplace=True))


class SegDecoder(nn.Module):
    """Token grid (B, D, n, n, n) + image (B, M, c, c, c) -> logits (B, K, c, c, c); c = n * patch."""

    def __init__(self, *, dim: int, in_channels: int, classes: int, patch: int, width: int = 16) -> None:
        super().__init__()
        ups = int(round(math.log2(patch)))
        if 2**ups != patch:
            raise ValueError(f"patch {patch} must be a power of two")
        chans = [width * 2 ** (ups - 1 - i) for i in range(ups)]  # e.g. patch 4: [64, 32]
        self.ups = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.blocks = nn.ModuleList()
        cin = dim
        for i, c in enumerate(chans):
            stride = 2 ** (ups - 1 - i)  # skip from the image at this level's resolution
            self.ups.append(nn.ConvTranspose3d(cin, c, 2, stride=2))
            self.skips.append(nn.Sequential(nn.Conv3d(in_channels, c, 3, stride=stride, padding=1, bias=False),
                                            nn.InstanceNorm3d(c, affine=True), nn.LeakyReLU(0.01, inplace=True)))
            self.blocks.append(_block(2 * c, c))
            cin = c
        self.out = nn.Conv3d(cin, classes, 1)

    def forward(self, grid: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = grid
        for up, skip, block in zip(self.ups, self.skips, self.blocks):
            x = up(x)
            x = block(torch.cat([x, skip(image)], 1))
        return self.out(x)


def seg_loss(logits: torch.Tensor, label: torch.Tensor, classes: int) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the foreground classes (batch Dice, as nnU-Net); ``label``
    of any integer type (the store's crops come as uint8, a byte per voxel to move to the device)."""
    label = label.long()
    ce = F.cross_entropy(logits.float(), label)
    prob = logits.float().softmax(1)
    onehot = F.one_hot(label, classes).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)
    inter = (prob * onehot).sum(dims)[1:]
    denom = (prob + onehot).sum(dims)[1:]
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return ce + (1 - dice.mean())


def input_channels(table: Sequence[str], inputs: Sequence[str] | None) -> tuple[list[str], list[int]]:
    """A segmenter's image channels (``inputs``, default the whole modality ``table``) and their
    ids in the table.

    Raises:
        ValueError: a channel that is not in the table.
    """
    names = list(inputs or table)
    unknown = [m for m in names if m not in table]
    if unknown:
        raise ValueError(f"input modalities {unknown} are not in the modality table {list(table)}")
    return names, [list(table).index(m) for m in names]


class RadiologySegmenter(RadiologyNet):
    """Tumour segmentation on the pretrained backbone (``classes`` = background + tumour classes).

    ``modalities`` is the modality-token table (the pretrainer's); ``input_modalities`` the
    image channels, in order (default: all of the table).
    """

    def __init__(self, *, classes: int = 3, decoder_width: int = 16, input_modalities: Sequence[str] | None = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.classes = classes
        self.input_modalities, self.input_ids = input_channels(self.modalities, input_modalities)
        self.seg_decoder = SegDecoder(dim=self.backbone.cfg.dim, in_channels=len(self.input_modalities),
                                      classes=classes, patch=self.patch, width=decoder_width)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (B, M, c, c, c) -> (B, classes, c, c, c)."""
        B, M = image.shape[:2]
        tb = self.multi_tokens(image, self.input_ids)
        z = self.backbone.encode(tb)  # (B, M*N, D)
        n = self.crop // self.patch
        z = z.view(B, M, n**3, -1).mean(1)  # average each patch over modalities
        grid = z.transpose(1, 2).reshape(B, -1, n, n, n)
        return self.seg_decoder(grid, image)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": seg_loss(self.logits(batch["inputs"]), batch["target"], self.classes)}


class UNetBaseline(nn.Module):
    """MONAI DynUNet configured in the nnU-Net manner (3x3x3 convolutions, instance norm, leaky ReLU,
    stride-2 downsampling, transposed-convolution upsampling), the supervised reference."""

    def __init__(self, *, modalities: Sequence[str], classes: int = 3, crop: int = 32,
                 filters: Sequence[int] = (16, 32, 64, 128), spacing: float = 3.0,
                 input_modalities: Sequence[str] | None = None, **_: Any) -> None:
        super().__init__()
        from monai.networks.nets import DynUNet

        self.modalities, self.classes, self.crop, self.spacing = list(modalities), classes, crop, spacing
        self.input_modalities = list(input_modalities or self.modalities)
        n = len(filters)
        self.net = DynUNet(spatial_dims=3, in_channels=len(self.input_modalities), out_channels=classes,
                           kernel_size=[3] * n, strides=[1] + [2] * (n - 1), upsample_kernel_size=[2] * (n - 1),
                           filters=list(filters), norm_name=("instance", {"affine": True}),
                           act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}), res_block=False)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": seg_loss(self.logits(batch["inputs"]), batch["target"], self.classes)}


WINDOW_BLENDS = ("gaussian", "argmax")  # how overlapping windows combine at inference


@torch.no_grad()
def sliding_window_labels(logits_fn: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, *, window: int,
                          background: Sequence[float], overlap: float = 0.5, batch_size: int = 4,
                          device: str | torch.device = "cpu", blend: str = "gaussian"
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Label map and confidence of a whole volume ``image`` (M, I, J, K) by overlapping windows.

    ``blend="gaussian"``: the windows' logits are averaged with a Gaussian weight (nnU-Net's
    sliding-window inference), streamed one window-deep slab at a time
    (:func:`hfmi_kit.data.windows.blend_argmax_windows`); ``"argmax"``: a voxel keeps the label
    of the window most confident about it, centre-weighted
    (:func:`hfmi_kit.data.windows.argmax_windows`). Returns (labels uint8, probability of the
    label float32) on the input grid.
    """
    from hfmi_kit.data.windows import argmax_windows, blend_argmax_windows, centre_weight

    if blend not in WINDOW_BLENDS:
        raise ConfigError(f"window blend must be one of {', '.join(WINDOW_BLENDS)}, got {blend!r}")
    from hfmi_kit.domains.radiology.data import pad_to

    img, pads = pad_to(image, window, list(background))
    shape = img.shape[1:]
    x = torch.from_numpy(np.ascontiguousarray(img))

    def crop(c: tuple[int, ...]) -> torch.Tensor:
        return x[:, c[0]:c[0] + window, c[1]:c[1] + window, c[2]:c[2] + window]

    way = blend_argmax_windows if blend == "gaussian" else argmax_windows
    lab, best = way(logits_fn, crop, shape, window, overlap=overlap, batch_size=batch_size,
                    weight=centre_weight(window, 3), device=device)
    inner = tuple(slice(p0, n - p1) for (p0, p1), n in zip(pads, shape))
    return lab[inner], best[inner]


# the model families, created by name: create_model("<family>.<size>", **kwargs)
register_model("radiology_mae")(RadiologyMAE)
register_model("radiology_segmenter")(RadiologySegmenter)
register_model("radiology_unet")(UNetBaseline)
