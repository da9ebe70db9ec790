"""The windowed backbone: a token per patch, attention in shifted local windows, periodic in
longitude on a global grid and bounded on a regional one."""

from __future__ import annotations

import torch

from hfmi_kit.models.config import EncoderConfig
from hfmi_kit.models.windowed import WindowedEncoder


def _enc(depth: int, grid: tuple[int, int], window: tuple[int, int], periodic: bool = True) -> WindowedEncoder:
    torch.manual_seed(0)
    enc = WindowedEncoder(EncoderConfig(dim=16, depth=depth, heads=2), grid, window, periodic=periodic).eval()
    with torch.no_grad():  # weights large enough that every path shows (the 0.02 init barely mixes tokens)
        for p in enc.parameters():
            p.normal_(0.0, 0.3)
    return enc


def _reach(enc: WindowedEncoder, at: tuple[int, int]) -> torch.Tensor:
    """(rows, cols) bool: which outputs change when the token at ``at`` changes."""
    H, W = enc.grid
    x = torch.randn(1, H * W, 16)
    y = x.clone()
    y[0, at[0] * W + at[1]] += 5.0 * torch.randn(16)  # not a constant: LayerNorm would remove it
    with torch.no_grad():
        return (enc(x) - enc(y)).abs().sum(-1).reshape(H, W) > 1e-5


def test_one_block_sees_only_its_window():
    reach = _reach(_enc(1, (4, 8), (2, 4)), (0, 1))
    expected = torch.zeros(4, 8, dtype=torch.bool)
    expected[0:2, 0:4] = True
    assert torch.equal(reach, expected)


def test_shifted_windows_cross_the_date_line_on_a_global_grid_only():
    glob = _reach(_enc(2, (4, 8), (2, 4)), (1, 0))
    assert glob[:, 7].any() and glob[:, 6].any()  # through the window rolled across longitude 0
    regional = _reach(_enc(2, (4, 8), (2, 4), periodic=False), (1, 0))
    assert not regional[:, 6:].any()  # a bounded domain: nothing wraps round to the last columns


def test_a_global_grid_is_equivariant_to_a_rotation_by_whole_windows():
    enc = _enc(4, (6, 12), (3, 4))
    x = torch.randn(2, 6, 12, 16)
    with torch.no_grad():
        y = enc(x.reshape(2, -1, 16)).reshape(2, 6, 12, 16)
        yr = enc(torch.roll(x, 4, dims=2).reshape(2, -1, 16)).reshape(2, 6, 12, 16)
    torch.testing.assert_close(torch.roll(y, 4, dims=2), yr, atol=1e-5, rtol=1e-5)


def test_a_window_that_does_not_tile_the_circle_is_padded_and_masked():
    enc = _enc(2, (5, 13), (4, 4))  # 13 columns: no divisor near 4
    assert not enc.periodic and enc.window == (4, 4)
    with torch.no_grad():
        out = enc(torch.randn(2, 5 * 13, 16))
    assert out.shape == (2, 65, 16) and torch.isfinite(out).all()
    assert _enc(1, (6, 90), (8, 8)).window == (6, 6)  # 1 degree, patch 4: 90 columns, windows of 6
