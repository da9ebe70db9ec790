"""A token per patch and attention in local windows: a backbone whose cost grows linearly with the grid.

The grouped layout (:class:`~hfmi_kit.models.tokenizers.GridTokenizer`) gives every variable of
every patch its own token and attends globally: tokens = patches x variables, cost quadratic
in both. Here, as in Pangu-Weather, Aurora and FengWu, every variable (and level, context step
and field forcing) of a patch is embedded together into one token (:class:`PatchEmbed`), and
:class:`WindowedEncoder` attends within windows of ``window`` patches, every second block shifted
by half a window (Swin, Liu et al. 2021), periodic in longitude (the window rolls across the date
line) and with the latitude rows padded and masked. A block costs
``tokens x window`` instead of ``tokens^2``, so memory and time per sample grow linearly with
the number of grid cells, and information crosses the globe in ``depth`` blocks of shifted
windows. The blocks are the shared :class:`~hfmi_kit.models.encoder.Block`: parameter names
(``encoder.blocks.{i}``) and layer-wise learning-rate decay are those of every backbone.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hfmi_kit.models.config import EncoderConfig
from hfmi_kit.models.encoder import Encoder


def _divisor_at_most(n: int, k: int) -> int:
    """The largest divisor of ``n`` that is at most ``k``."""
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


class WindowedEncoder(Encoder):
    """:class:`~hfmi_kit.models.encoder.Encoder` blocks on shifted local windows of a
    (rows, cols) token grid, periodic along the columns (longitude) for a global grid.

    ``window`` is (rows, cols) of patches. On a periodic grid the window width becomes the
    largest divisor of the columns up to the one asked for (windows tile the circle exactly and
    roll across the date line); when that divisor is under half the width asked for, or the grid
    is not periodic (a regional domain), the columns are padded like the rows. Padded tokens are
    masked from attention.
    """

    def __init__(self, cfg: EncoderConfig, grid: tuple[int, int], window: tuple[int, int] = (8, 8), *,
                 periodic: bool = True) -> None:
        super().__init__(cfg)
        self.grid = (int(grid[0]), int(grid[1]))
        wh, ww = min(int(window[0]), self.grid[0]), min(int(window[1]), self.grid[1])
        d = _divisor_at_most(self.grid[1], ww)
        self.periodic = periodic and 2 * d >= ww
        self.window = (wh, d if self.periodic else ww)

    def _block(self, blk: nn.Module, x: torch.Tensor, shift: bool) -> torch.Tensor:
        B, H, W, D = x.shape
        wh, ww = self.window
        sh, sw = (wh // 2, ww // 2) if shift else (0, 0)
        if self.periodic:
            x = torch.roll(x, shifts=-sw, dims=2) if sw else x
            front_w, cols = 0, W
        else:  # shifted windows on a bounded axis: pad in front, as for the rows
            front_w, cols = sw, math.ceil((W + sw) / ww) * ww
        rows = math.ceil((H + sh) / wh) * wh  # ``sh`` padded rows in front, whole windows
        pad = torch.zeros(B, rows, cols, D, dtype=x.dtype, device=x.device)
        pad[:, sh : sh + H, front_w : front_w + W] = x
        valid = torch.zeros(rows, cols, dtype=torch.bool, device=x.device)
        valid[sh : sh + H, front_w : front_w + W] = True
        nh, nw = rows // wh, cols // ww
        win = pad.reshape(B, nh, wh, nw, ww, D).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, wh * ww, D)
        keep = valid.reshape(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(1, nh * nw, 1, 1, wh * ww)
        keep = keep.expand(B, -1, -1, -1, -1).reshape(B * nh * nw, 1, 1, wh * ww)
        mask = None if bool(valid.all()) else keep
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            y = checkpoint(blk, win, mask, use_reentrant=False)
        else:
            y = blk(win, mask)
        y = y.reshape(B, nh, nw, wh, ww, D).permute(0, 1, 3, 2, 4, 5).reshape(B, rows, cols, D)
        y = y[:, sh : sh + H, front_w : front_w + W]
        return torch.roll(y, shifts=sw, dims=2) if self.periodic and sw else y

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, rows * cols, D) in row-major grid order -> (B, rows * cols, D)."""
        if padding is not None:
            raise ValueError("WindowedEncoder: every grid token is real; padding masks are not supported")
        B, T, D = x.shape
        H, W = self.grid
        if T != H * W:
            raise ValueError(f"WindowedEncoder: {T} tokens for a {H} x {W} grid")
        g = x.reshape(B, H, W, D)
        for i, blk in enumerate(self.blocks):
            g = self._block(blk, g, shift=i % 2 == 1)
        return self.norm(g.reshape(B, T, D))


class PatchEmbed(nn.Module):
    """Every channel of a (B, C, H, W) field stack, one ``patch`` at a time, into one token:
    (B, rows * cols, D), with a 2-D sine-cosine position code and, optionally, scalar inputs
    (B, S) added to every token (the forcing a what-if changes)."""

    def __init__(self, channels: int, patch: tuple[int, int], grid: tuple[int, int], dim: int, *,
                 scalars: int = 0) -> None:
        super().__init__()
        from hfmi_kit.models.posenc import sincos_grid

        self.patch, self.grid = (int(patch[0]), int(patch[1])), (int(grid[0]), int(grid[1]))
        if self.grid[0] % self.patch[0] or self.grid[1] % self.patch[1]:
            raise ValueError(f"PatchEmbed: grid {self.grid} not divisible by patch {self.patch}")
        self.patch_grid = (self.grid[0] // self.patch[0], self.grid[1] // self.patch[1])
        self.proj = nn.Conv2d(channels, dim, kernel_size=self.patch, stride=self.patch)
        self.scalars = nn.Linear(scalars, dim) if scalars else None
        self.register_buffer("pos_embed", sincos_grid(self.patch_grid, dim), persistent=False)

    def forward(self, x: torch.Tensor, scalars: torch.Tensor | None = None) -> torch.Tensor:
        t = self.proj(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)
        if self.scalars is not None and scalars is not None:
            t = t + self.scalars(scalars)[:, None]
        return t


class PatchHead(nn.Module):
    """Tokens (B, rows * cols, D) -> ``channels`` fields (B, channels, H, W), one patch per token."""

    def __init__(self, dim: int, channels: int, patch: tuple[int, int], patch_grid: tuple[int, int],
                 hidden: int = 0) -> None:
        super().__init__()
        self.channels, self.patch, self.patch_grid = channels, tuple(patch), tuple(patch_grid)
        out = channels * patch[0] * patch[1]
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out)) if hidden else \
            nn.Linear(dim, out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B = z.shape[0]
        (gh, gw), (ph, pw) = self.patch_grid, self.patch
        y = self.net(z).reshape(B, gh, gw, self.channels, ph, pw)
        return y.permute(0, 3, 1, 4, 2, 5).reshape(B, self.channels, gh * ph, gw * pw)


class GridBackbone(nn.Module):
    """:class:`PatchEmbed` -> :class:`WindowedEncoder`, under the parameter names of
    :class:`~hfmi_kit.models.backbone.Backbone` (``tokenizer.*``, ``encoder.blocks.{i}.*``)."""

    def __init__(self, tokenizer: PatchEmbed, cfg: EncoderConfig, window: tuple[int, int] = (8, 8), *,
                 periodic: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.encoder = WindowedEncoder(cfg, tokenizer.patch_grid, window, periodic=periodic)

    @property
    def depth(self) -> int:
        return len(self.encoder.blocks)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, rows * cols, D) embedded patches -> (B, rows * cols, D)."""
        return self.encoder(tokens)
