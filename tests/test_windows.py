"""Grid windows (hfmi_kit.data.windows): coverage, exact blending and the lean argmax, 2-D and 3-D."""

import numpy as np
import pytest
import torch

from hfmi_kit.data.windows import argmax_windows, blend_windows, centre_weight, grid_windows, window_starts
from hfmi_kit.errors import ConfigError


def test_starts_cover_the_axis_with_the_last_window_flush():
    assert window_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert window_starts(64, 32, 16) == [0, 16, 32]
    assert window_starts(10, 32, 16) == [0]
    with pytest.raises(ConfigError):
        window_starts(10, 4, 0)


@pytest.mark.parametrize("shape,window", [((50, 37), 16), ((20, 33, 17), (8, 12, 8))])
def test_every_cell_is_covered(shape, window):
    w = (window,) * len(shape) if isinstance(window, int) else window
    seen = np.zeros(shape, int)
    for c in grid_windows(shape, window, overlap=0.5):
        seen[tuple(slice(a, a + k) for a, k in zip(c, w))] += 1
        assert all(a + k <= n for a, k, n in zip(c, w, shape))
    assert seen.min() >= 1


@pytest.mark.parametrize("weighted", [False, True])
def test_blending_a_pointwise_model_returns_its_output_exactly(weighted):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(2, 40, 29)).astype(np.float32))

    def crop(c):
        return {"x": x[:, c[0]:c[0] + 16, c[1]:c[1] + 16]}

    out = blend_windows(lambda b: 3 * b["x"], crop, (40, 29), 16, channels=2, overlap=0.5,
                        weight=centre_weight(16, 2) if weighted else None)
    np.testing.assert_allclose(out, 3 * x.numpy(), rtol=1e-5, atol=1e-5)


def test_blending_averages_disagreeing_windows():
    # a model that outputs its window's corner row: overlapping cells get the mean of the windows
    def fn(b):
        return b[:, :1, :, :] * 0 + b[:, 1:2, :1, :1]

    rows = torch.arange(12, dtype=torch.float32)[:, None].expand(12, 4)
    x = torch.stack([torch.zeros(12, 4), rows])
    out = blend_windows(fn, lambda c: x[:, c[0]:c[0] + 8, c[1]:c[1] + 4], (12, 4), (8, 4), channels=1, overlap=0.5)
    assert out[0, 0, 0] == 0 and out[0, 11, 0] == 4  # one window each
    assert out[0, 5, 0] == pytest.approx(2.0)  # windows at rows 0 and 4


def test_argmax_keeps_the_most_confident_window_3d():
    shape = (12, 10, 9)
    # class 1 wherever the window starts at the origin, with low confidence elsewhere
    def fn(b):
        logits = torch.zeros(b.shape[0], 3, 6, 6, 6)
        first = b[:, 0, 0, 0, 0] == 0
        logits[first, 1] = 5.0
        logits[~first, 2] = 1.0
        return logits

    grid = torch.arange(np.prod(shape), dtype=torch.float32).reshape(1, *shape)
    lab, conf = argmax_windows(fn, lambda c: grid[:, c[0]:c[0] + 6, c[1]:c[1] + 6, c[2]:c[2] + 6], shape, 6)
    assert lab.dtype == np.uint8 and conf.shape == shape
    assert (lab[:6, :6, :6] == 1).all() and (lab[6:] == 2).all()
    assert conf.min() > 0


def test_bad_window_options_name_the_problem():
    with pytest.raises(ConfigError, match="overlap"):
        grid_windows((10, 10), 4, overlap=1.0)
    with pytest.raises(ConfigError, match="window"):
        grid_windows((10, 10), (4, 4, 4))


def test_windows_of_a_volume_not_divisible_by_the_window_match_a_whole_volume_forward():
    from hfmi_kit.domains.radiology.model import sliding_window_labels

    torch.manual_seed(0)
    head = torch.nn.Conv3d(2, 3, 1)  # a voxel-wise model: every window must give what the whole volume gives
    x = torch.randn(2, 37, 29, 45)
    with torch.no_grad():
        whole = head(x[None])[0]
        out = blend_windows(head, lambda c: x[:, c[0]:c[0] + 16, c[1]:c[1] + 16, c[2]:c[2] + 16], (37, 29, 45), 16,
                            channels=3, overlap=0.5, weight=centre_weight(16, 3))
        np.testing.assert_allclose(out, whole.numpy(), rtol=1e-5, atol=1e-5)
        lab, conf = sliding_window_labels(head, x.numpy(), window=16, background=[0.0, 0.0], overlap=0.5)
    assert lab.shape == (37, 29, 45)
    assert np.array_equal(lab, whole.argmax(0).numpy())
    assert np.all(conf <= whole.softmax(0).max(0).values.numpy() + 1e-6)


@pytest.mark.parametrize("average", ["logits", "probabilities"])
@pytest.mark.parametrize("axis", [None, 0, 1, 2])
def test_the_streamed_gaussian_blend_equals_blending_the_whole_volume_at_once(axis, average):
    """The slab-by-slab blend gives exactly the labels and probabilities of blending every
    window's logits (or softmax) over the whole grid at once, along any streaming axis."""
    from hfmi_kit.data.windows import blend_argmax_windows

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 4, 3, padding=1))
    x = torch.randn(1, 37, 29, 45)
    shape, w = (37, 29, 45), (16, 12, 16)

    def crop(c):
        return x[:, c[0]:c[0] + w[0], c[1]:c[1] + w[1], c[2]:c[2] + w[2]]

    weight = centre_weight(w, 3)
    with torch.no_grad():
        out = (lambda b: net(b).softmax(1)) if average == "probabilities" else net
        ref = blend_windows(out, crop, shape, w, channels=4, overlap=0.5, weight=weight)
        if average == "logits":
            ref = torch.from_numpy(ref).softmax(0).numpy()
        lab, conf = blend_argmax_windows(net, crop, shape, w, overlap=0.5, weight=weight, batch_size=3, axis=axis,
                                         average=average)
    assert lab.dtype == np.uint8 and conf.dtype == np.float32
    # a convolution with zero padding differs at window edges: the blend is not the whole-volume forward
    assert len(np.unique(lab)) > 1
    np.testing.assert_array_equal(lab, ref.argmax(0))
    np.testing.assert_allclose(conf, ref.max(0), rtol=1e-5, atol=1e-6)


def test_the_streamed_blend_refuses_a_grid_smaller_than_its_window():
    from hfmi_kit.data.windows import blend_argmax_windows

    with pytest.raises(ConfigError, match="smaller than the window"):
        blend_argmax_windows(lambda b: b, lambda c: torch.zeros(1, 8, 8), (6, 9), 8)
    with pytest.raises(ConfigError, match="average must be"):
        blend_argmax_windows(lambda b: b, lambda c: torch.zeros(1, 8, 8), (8, 9), 8, average="max")


def test_a_segmenter_checkpoint_keeps_its_window_blend_and_older_ones_keep_the_argmax():
    from hfmi_kit.domains.radiology.model import sliding_window_labels
    from hfmi_kit.domains.radiology.tasks import SegmentationPredictor

    net = torch.nn.Conv3d(1, 3, 1)
    assert SegmentationPredictor(net, {}).blend == "argmax"  # scored so before the choice existed
    assert SegmentationPredictor(net, {"processors": {"window_blend": "gaussian"}}).blend == "gaussian"
    with pytest.raises(ConfigError, match="window blend must be one of gaussian, argmax"):
        sliding_window_labels(net, np.zeros((1, 8, 8, 8), np.float32), window=8, background=[0.0], blend="mean")
