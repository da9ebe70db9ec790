"""Streaming climate training from a Zarr store: the windows, statistics and skip path read block
by block equal the in-memory ones; ranks see disjoint samples and together all; a resumed
stream continues at the same sample; a NaN outside a mask is named when its block is read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from hfmi_kit.cli import main
from hfmi_kit.domains.climate import GeneratorConfig, generate
from hfmi_kit.domains.climate import data as cdata
from hfmi_kit.domains.climate.stream import (
    StoreReader,
    StoreWindows,
    _runs,
    field_statistics,
    read_block,
    skip_statistics,
    store_block,
)
from hfmi_kit.errors import DataError
from hfmi_kit.train.loop import ResumableSampler


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A prepared store (levels of ta in Pa, ocean fields with a land mask, CO2) in 5-step chunks."""
    from hfmi_kit.data.cf import write_cf

    root = tmp_path_factory.mktemp("stream")
    src = write_cf(generate(GeneratorConfig(years=5, spinup_years=1, seed=4, pressure_levels=(850, 500),
                                            ocean_depths=(10.0, 100.0))), root / "src.nc")
    out = root / "store.zarr"
    assert main(["data", "prepare", "climate", str(src), "--out", str(out), "--time-chunk", "5"]) == 0
    return out


def _both(store):
    lazy = cdata.load_climate(store, lazy=True)
    full = cdata.load_climate(store)
    split = cdata.split_years(full)
    stats = cdata.compute_stats(store, full, time_index=split.train)
    return lazy, full, split, cdata.Normaliser(stats)


def test_store_windows_are_the_in_memory_windows(store):
    lazy, full, split, norm = _both(store)
    assert store_block(store) == 5 and read_block(5) == 15 and read_block(1) == 12
    assert lazy.state_vars == full.state_vars and any("_" in v for v in lazy.state)
    for v in full.state:
        np.testing.assert_array_equal(lazy.valid[v], full.valid[v])
    with pytest.raises(DataError, match="streamed from its store"):
        cdata.to_tensors(lazy, norm)
    tens = cdata.to_tensors(full, norm)
    mem = cdata.ForecastWindows(tens, split.train, context=2, horizon=2)
    st = StoreWindows(lazy, StoreReader(lazy, norm), norm, split.train, context=2, horizon=2, block=10)
    assert st.times == mem.times and len(set(st.sample_groups)) > 3
    for i in (0, 7, len(st) - 1):
        a, b = mem[i], st[i]
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    # in the sampler's chunk-aware order, a pass reads each span once: (10 + 3) / 10 steps per step
    st.spans.cache.clear()
    st.spans.reads = st.spans.steps_read = 0
    for i in ResumableSampler(len(st), seed=0, groups=st.sample_groups):
        st[i]
    assert st.spans.reads == len(set(st.sample_groups))
    assert st.spans.steps_read <= 1.3 * (max(st.times) + 3 - min(st.times) + 1)


def test_field_statistics_streamed_equal_the_dask_pass(store):
    lazy, _, split, norm = _both(store)
    got = field_statistics(lazy, split.train, block=7)
    assert got.keys() == norm.stats.keys()
    for k, v in norm.stats.items():
        assert got[k]["mean"] == pytest.approx(v["mean"], rel=1e-5, abs=1e-6), k
        assert got[k]["std"] == pytest.approx(v["std"], rel=1e-4, abs=1e-6), k


def test_skip_statistics_streamed_equal_the_in_memory_fit(store):
    lazy, full, split, norm = _both(store)
    tens = cdata.to_tensors(full, norm)
    got = skip_statistics(lazy, StoreReader(lazy, norm), norm, split.train, block=5)
    clim = cdata.climatology(tens, split.train)
    torch.testing.assert_close(got["climatology"], clim, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["residual_scale"], cdata.residual_scale(tens, split.train), rtol=1e-4)
    a, b, ref = cdata.anomaly_regression(tens, split.train, clim)
    torch.testing.assert_close(got["damping"], a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["forcing_response"], b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["forcing_ref"], ref)


def test_runs_follow_the_index_and_cut_at_the_chunks():
    assert _runs(np.r_[3:12, 20:23], 5) == [(3, 5), (5, 10), (10, 12), (20, 23)]


def test_two_ranks_see_disjoint_chunk_runs_and_together_every_sample():
    groups = [i // 6 for i in range(50)]  # 50 samples in chunks of 6
    seen = []
    for rank in (0, 1):
        s = ResumableSampler(50, seed=3, rank=rank, world_size=2, groups=groups)
        idx = list(s)
        assert len(idx) == 25
        # within a rank, each chunk's samples come together (one run per chunk, except at the shard cut)
        runs = [groups[i] for k, i in enumerate(idx) if k == 0 or groups[i] != groups[idx[k - 1]]]
        assert len(runs) == len(set(runs))
        seen.append(set(idx))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(50))
    s = ResumableSampler(50, seed=3, groups=groups)
    first = list(s)
    s.epoch = 1
    second = list(s)
    assert second != first and sorted(second) == list(range(50))  # a new order each epoch


def test_a_resumed_stream_continues_at_the_same_sample():
    groups = [i // 4 for i in range(30)]
    s = ResumableSampler(30, seed=1, groups=groups)
    s.epoch = 2
    whole = list(s)
    s.offset = 11  # what the trainer restores from batches_in_epoch * batch_size
    assert list(s) == whole[11:]


def test_streamed_pretraining_from_the_store(store, tmp_path, capsys):
    out = tmp_path / "pre"
    assert main(["pretrain", "climate", "--data", str(store), "--out", str(out), "--steps", "3", "--stream", "true",
                 "--layout", "windowed", "--window", "2,2", "--workers", "1"]) == 0
    from hfmi_kit.train.pretrained import load_pretrained

    m = load_pretrained(out / "model")
    assert m is not None
    assert main(["pretrain", "climate", "--data", str(store), "--out", str(tmp_path / "x"), "--steps", "1",
                 "--stream", "true", "--lim-modes", "4"]) == 1
    assert "--lim-modes" in capsys.readouterr().err


def test_a_nan_outside_the_mask_is_named_when_its_block_is_read(store, tmp_path):
    import shutil

    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    arr = zarr.open_group(str(bad), mode="r+")["tas"]
    x = arr[17]
    x[3, 4] = np.nan
    arr[17] = x
    lazy = cdata.load_climate(bad, lazy=True)  # the first step is clean
    norm = cdata.Normaliser({k: {"mean": 0.0, "std": 1.0} for k in [*lazy.state, *lazy.forcing, *lazy.scalars]})
    reader = StoreReader(lazy, norm)
    reader.read(0, 15)
    with pytest.raises(DataError, match=r"bad\.zarr: field 'tas' has 1 NaN/inf value\(s\) outside its mask"):
        reader.read(15, 20)
    with pytest.raises(DataError, match="streaming reads a Zarr store"):
        cdata.load_climate(store.parent / "src.nc", lazy=True)


def test_a_store_is_streamed_when_asked_or_when_it_is_large(store, monkeypatch):
    from hfmi_kit.domains.climate import tasks

    assert tasks._streams(store, True) and not tasks._streams(store, False)
    assert not tasks._streams(store, None)  # 0.4 MB of values: loaded
    monkeypatch.setattr(tasks, "STREAM_ABOVE", 1000)
    assert tasks._streams(store, None) and not tasks._streams(store.parent / "src.nc", None)
