"""Streaming climate training from a Zarr store: windows read block by block, never the whole set.

``load_climate(store, lazy=True)`` reads the store's metadata and first step; then

- :class:`StoreReader` reads blocks of consecutive steps of every field straight from the Zarr
  arrays (one read per stored variable and block, whatever the number of its levels; fill values
  to NaN; units to canonical; normalised; NaN outside a field's mask refused, naming the store,
  field and time). ``cache_dir`` copies the store to node-local disk first.
- :class:`StoreWindows` is :class:`~hfmi_kit.domains.climate.data.ForecastWindows` over a
  store: the same sample dicts, each cut from the span of steps it starts in (read once, with
  the steps its windows reach beyond it), with a ``sample_groups`` attribute (the span of each
  sample) that makes the trainer's
  :class:`~hfmi_kit.train.loop.ResumableSampler` shuffle blocks, then samples within them, and
  give each rank a contiguous part: disjoint shards, exact resume, chunk reads not repeated.
- :func:`skip_statistics` fits what the in-memory path fits on the training steps (the
  climatology, the tendency scale per variable, the per-cell forced anomaly persistence) in two
  passes over blocks, with the same arithmetic (:func:`~.data.add_phase_sums`,
  :class:`~.data.RegressionSums`).

Memory is that of a few blocks plus the climatology (bins x fields x grid).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hfmi_kit.data.cf import grid_dims, open_cf
from hfmi_kit.data.zarr_source import ZarrWindowSource, copy_to_local
from hfmi_kit.domains.climate import data as cdata
from hfmi_kit.errors import DataError

LOGGER = logging.getLogger(__name__)


def release_memory() -> None:
    """Hand the memory freed by a streaming pass back to the system (glibc keeps freed blocks of
    the sizes a pass used for later, so the peaks of successive passes would add up)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)  # type: ignore[arg-type]
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to do
        pass


def store_block(path: str | Path) -> int:
    """The store's time steps per chunk: what ``hfmi data prepare --time-chunk`` wrote (the
    chunking of its first gridded variable for another store)."""
    import zarr

    from hfmi_kit.domains.climate.prepare import STORE_MARK

    group = zarr.open_group(str(path), mode="r")
    mark = group.attrs.get(STORE_MARK)
    if mark:
        try:
            return max(int(json.loads(mark).get("time_chunk", 1)), 1)
        except (ValueError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: its {STORE_MARK} attribute is not what hfmi data prepare writes ({e})") from e
    for name in group.array_keys():
        a = group[name]
        if a.ndim >= 3:
            return int(a.chunks[0])
    return 1


class StoreReader:
    """Blocks ``[t0, t1)`` of every state and forcing field of ``data`` (loaded lazily), normalised.

    Args:
        data: from ``load_climate(store, lazy=True)``.
        normaliser: the per-field statistics (canonical units).
        cache_dir: copy the store there first (node-local disk), read the copy.
    """

    def __init__(self, data: cdata.ClimateData, normaliser: cdata.Normaliser, *,
                 cache_dir: str | Path | None = None) -> None:
        self.source = data.source
        self.path = copy_to_local(data.source, cache_dir) if cache_dir else Path(data.source)
        self.time = data.time
        names = [*data.state, *data.forcing]
        self.n_state, self.n_forcing = len(data.state), len(data.forcing)
        self.shape = (int(data.lat.size), int(data.lon.size))
        ds = open_cf(self.path)
        # stored variable -> [(position among the fields, level index or None)]
        self.plan: dict[str, list[tuple[int, int | None]]] = {}
        scale, offset, mean, std = [], [], [], []
        for k, f in enumerate(names):
            info = data.levels.get(f)
            var = info["variable"] if info else f
            da = ds[var]
            g = grid_dims(da, ds)
            z = [d for d in da.dims if d not in (da.dims[0], *(g or ()))]
            if g is None or tuple(da.dims[-2:]) != tuple(g) or len(z) != (1 if info else 0):
                raise DataError(f"{self.source}: variable {var!r} is stored as {da.dims}; streaming reads (time, "
                                "[level,] lat, lon), as hfmi data prepare climate writes it")
            level = None
            if info:
                values = np.asarray(ds[z[0]].values, dtype=np.float64)
                hit = np.flatnonzero(np.isclose(values, float(info["file_value"])))
                if hit.size != 1:
                    raise DataError(f"{self.source}: level {info['file_value']} of {var!r} not in its coordinate")
                level = int(hit[0])
            self.plan.setdefault(var, []).append((k, level))
            a, b = cdata.unit_conversion(str(da.attrs.get("standard_name", "")),
                                         str(da.attrs.get("units", "")).strip()) or (1.0, 0.0)
            scale.append(a)
            offset.append(b)
            st = normaliser.stats[f]
            mean.append(st["mean"])
            std.append(st["std"])
        ds.close()
        self.names = names
        # normalised = raw * gain + bias, per field
        self.gain = (np.asarray(scale) / np.asarray(std)).astype(np.float32)[:, None, None]
        self.bias = ((np.asarray(offset) - np.asarray(mean)) / np.asarray(std)).astype(np.float32)[:, None, None]
        valid = np.stack([data.valid[v] for v in data.state]) if data.state else np.zeros((0, *self.shape), bool)
        self.valid = np.concatenate([valid, np.ones((self.n_forcing, *self.shape), bool)])
        self.gain_t, self.bias_t = torch.from_numpy(self.gain), torch.from_numpy(self.bias)
        self.outside_t = None if self.valid.all() else torch.from_numpy(~self.valid)
        self._zarr: ZarrWindowSource | None = None

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open the store themselves
        return {**self.__dict__, "_zarr": None}

    def _open(self) -> ZarrWindowSource:
        if self._zarr is None:
            self._zarr = ZarrWindowSource(self.path, list(self.plan))
        return self._zarr

    def read(self, t0: int, t1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(state (n, V, H, W), forcing (n, F, H, W)) float32, normalised, 0 outside the masks.

        Each stored variable is read once and its fields normalised as they are copied out of it;
        the block is checked with one sum (the cells outside the masks set to 0 first)."""
        # field-major, so that each field is one contiguous piece; handed out as (n, V, H, W) views
        fm = torch.empty((len(self.names), t1 - t0, *self.shape))  # torch's kernels use the trainer's threads
        for fields, block in zip(self.plan.values(), self._open().read_arrays(t0, t1)):
            src = torch.from_numpy(block)
            for k, level in fields:  # copied out and normalised in one pass
                torch.addcmul(self.bias_t[k], src if level is None else src[:, level], self.gain_t[k], out=fm[k])
        x = fm.permute(1, 0, 2, 3)
        if self.outside_t is not None:
            x.masked_fill_(self.outside_t, 0.0)
        if not bool(torch.isfinite(x.sum())):
            t, k, i, j = (int(c) for c in torch.nonzero(~torch.isfinite(x))[0])
            bad = int((~torch.isfinite(x[:, k])).sum())
            raise DataError(f"{self.source}: field {self.names[k]!r} has {bad} NaN/inf value(s) outside its mask "
                            f"in steps {t0}-{t1 - 1}, first at time={self.time[t0 + t]}, cell ({i}, {j})")
        return x[:, : self.n_state], x[:, self.n_state :]


class _Spans:
    """Spans of ``block`` steps plus the steps that windows starting in them reach into (to
    ``ends[span]``), read in one piece each; the last few kept (a small LRU; one per process)."""

    def __init__(self, reader: StoreReader, block: int, ends: dict[int, int], keep: int = 1) -> None:
        self.reader, self.block, self.ends, self.keep = reader, block, ends, keep
        self.cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.reads = 0  # spans read
        self.steps_read = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "cache": OrderedDict()}

    def get(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        if g in self.cache:
            self.cache.move_to_end(g)
            return self.cache[g]
        t0, t1 = g * self.block, self.ends[g]  # to the last step a window starting in the span needs
        span = self.reader.read(t0, t1)
        self.reads += 1
        self.steps_read += t1 - t0
        self.cache[g] = span
        while len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return span

    def steps(self, t0: int, t1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(state, forcing) of the steps ``[t0, t1)``, from the span ``t0`` starts in."""
        g = t0 // self.block
        s, f = self.get(g)
        lo = t0 - g * self.block
        return s[lo : lo + t1 - t0], f[lo : lo + t1 - t0]


def read_block(chunk: int, steps: int = 12) -> int:
    """Steps a streamed read covers: at least ``steps``, a whole number of the store's chunks."""
    return max(chunk, -(-steps // chunk) * chunk)


class StoreWindows(Dataset):
    """:class:`~hfmi_kit.domains.climate.data.ForecastWindows` read from the store: samples at
    the times ``t`` whose context and horizon lie in ``indices``, with the same keys.

    Samples are grouped by the span of ``block`` steps their window starts in
    (``sample_groups``); a span is read once with the steps its windows reach beyond it, so a
    pass in the sampler's chunk-aware order reads each step about ``(block + C + K - 1) / block``
    times (``block``: a whole number of the store's chunks, see :func:`read_block`)."""

    def __init__(self, data: cdata.ClimateData, reader: StoreReader, normaliser: cdata.Normaliser,
                 indices: np.ndarray, *, context: int = 2, horizon: int = 1, block: int = 12) -> None:
        self.context, self.horizon = context, horizon
        self.times = cdata.window_times(indices, context, horizon)
        block = max(int(block), 1)
        self.sample_groups = [(t - context + 1) // block for t in self.times]
        ends: dict[int, int] = {}
        for g, t in zip(self.sample_groups, self.times):
            ends[g] = max(ends.get(g, 0), t + horizon + 1)
        self.spans = _Spans(reader, block, ends)
        sc = [np.nan_to_num(normaliser.norm(k, v), nan=0.0) for k, v in data.scalars.items()]
        self.scalars = torch.from_numpy(np.stack(sc, axis=1).astype(np.float32)) if sc else \
            torch.zeros(data.time.size, 0)
        self.mask = torch.from_numpy(reader.valid[: reader.n_state].astype(np.float32))
        self.phase = torch.from_numpy(data.phase.astype(np.int64))

    def __len__(self) -> int:
        return len(self.times)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = self.times[i]
        C, K = self.context, self.horizon
        state, forcing = self.spans.steps(t - C + 1, t + K + 1)
        return {
            "inputs": state[:C],  # (C, V, H, W)
            "forcing": forcing[C:],  # (K, F, H, W)
            "scalars": self.scalars[t + 1 : t + K + 1],  # (K, S)
            "target": state[C:],  # (K, V, H, W)
            "mask": self.mask,  # (V, H, W)
            "phase": self.phase[t + 1],
            "meta": torch.tensor([t]),
        }


def _runs(index: np.ndarray, block: int) -> list[tuple[int, int]]:
    """``[t0, t1)`` pieces covering ``index`` (sorted): its runs of consecutive steps, cut at the
    multiples of ``block`` (the store's chunks), so that each chunk is read once."""
    idx = np.unique(np.asarray(index))
    out: list[tuple[int, int]] = []
    for run in np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1):
        if run.size:
            a, end = int(run[0]), int(run[-1]) + 1
            while a < end:
                b = min((a // block + 1) * block, end)
                out.append((a, b))
                a = b
    return out


def field_statistics(data: cdata.ClimateData, index: np.ndarray, *, block: int = 12,
                     cache_dir: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Mean and (population) standard deviation of every field over the valid cells of the steps
    ``index``, in canonical units, in one pass over spans of ``block`` steps (what
    :func:`~hfmi_kit.domains.climate.data.compute_stats` gives, in the memory of one span), and
    of the scalar forcings."""
    names = [*data.state, *data.forcing]
    raw = StoreReader(data, cdata.Normaliser({f: {"mean": 0.0, "std": 1.0} for f in names}), cache_dir=cache_dir)
    cells = torch.from_numpy(raw.valid.reshape(len(names), -1).sum(1)).double()
    total = torch.zeros(3, len(names), dtype=torch.float64)  # cells, sum, sum of squares
    for t0, t1 in _runs(index, block):
        x, f = raw.read(t0, t1)  # 0 outside the masks: the sums see only valid cells
        for k, field in enumerate([*x.unbind(1), *f.unbind(1)]):
            v = field.double()
            total[1, k] += v.sum()
            total[2, k] += (v * v).sum()
        total[0] += cells * (t1 - t0)
    n, s1, s2 = total
    mean = s1 / n
    std = ((s2 / n - mean * mean).clamp_min(0.0)).sqrt()
    stats = {f: {"mean": float(mean[k]), "std": max(float(std[k]), 1e-6)} for k, f in enumerate(names)}
    release_memory()
    return {**stats, **cdata.scalar_stats(data, index)}


def skip_statistics(data: cdata.ClimateData, reader: StoreReader, normaliser: cdata.Normaliser,
                    index: np.ndarray, *, block: int = 12) -> dict[str, Any]:
    """What the skip path and the tendency loss need from the training steps ``index``, in two
    passes over blocks of ``block`` steps: ``climatology`` (P, V, H, W), ``residual_scale`` (one
    float per state variable: the std of one-step tendencies over valid cells) and the per-cell
    forced anomaly persistence ``damping`` (V, H, W), ``forcing_response`` (S, V, H, W) and
    ``forcing_ref`` (S,) (see :func:`~hfmi_kit.domains.climate.data.anomaly_regression`).

    Raises:
        DataError: a climatological bin without data, or too few consecutive steps."""
    V, (H, W) = reader.n_state, reader.shape
    idx = np.unique(np.asarray(index))
    phase = torch.from_numpy(data.phase.astype(np.int64))
    sums = torch.zeros(data.step.phases, V, H, W, dtype=torch.float64)
    counts = torch.zeros(data.step.phases, dtype=torch.float64)
    mask = torch.from_numpy(reader.valid[:V])
    moments = torch.zeros(3, V, dtype=torch.float64)  # count, sum, sum of squares of the tendencies
    pairs = idx[np.isin(idx + 1, idx)]
    pieces = _runs(idx, block)
    last: tuple[int, torch.Tensor] | None = None  # the previous piece's last step, for the tendency across
    for t0, t1 in pieces:
        x, _ = reader.read(t0, t1)
        cdata.add_phase_sums(sums, counts, x, phase[t0:t1])
        steps = torch.cat([last[1][None], x]) if last is not None and last[0] == t0 - 1 else x
        for v in range(V):
            dv = (steps[1:, v] - steps[:-1, v])[:, mask[v]].double()
            moments[:, v] += torch.stack([torch.tensor(float(dv.numel()), dtype=torch.float64), dv.sum(),
                                          (dv * dv).sum()])
        last = (t1 - 1, x[-1])
    clim = cdata.finish_phase_means(sums, counts, data.step)
    del sums
    n, s1, s2 = moments
    var = (s2 - s1 * s1 / n.clamp_min(1)) / (n - 1).clamp_min(1)
    scale = [float(max(float(var[v].sqrt()), 1e-3)) if n[v] > 1 else 1.0 for v in range(V)]
    S = len(data.scalars)
    if pairs.size < S + 2:
        raise DataError(f"{data.source}: too few consecutive training steps to fit the forced anomaly persistence")
    sc = (np.stack([normaliser.norm(k, v) for k, v in data.scalars.items()], axis=1) if S
          else np.zeros((data.time.size, 0)))
    scalars = torch.from_numpy(sc.astype(np.float32)).double()
    ref = scalars[torch.from_numpy(pairs + 1)].mean(0)
    reg = cdata.RegressionSums(S, (V, H, W))
    last = None
    for t0, t1 in pieces:
        x, _ = reader.read(t0, t1)
        anom = x.sub_(clim[phase[t0:t1]])  # float32: each span's sums are added to float64 totals
        first = t0
        if last is not None and last[0] == t0 - 1:
            anom, first = torch.cat([last[1][None], anom]), t0 - 1
        reg.add(anom[:-1], anom[1:], scalars[first + 1 : t1] - ref)
        last = (t1 - 1, anom[-1])
    if S:
        a, b = reg.solve(mask.float())
    else:  # the plain lag-1 coefficient, as anomaly_damping computes it
        num, den = reg.r[..., 0], reg.G[..., 0, 0]
        a = torch.where(den > 1e-8, num / den.clamp_min(1e-8), torch.ones_like(den)).clamp(0.0, 1.0).float()
        a = torch.where(mask, a, torch.ones_like(a))
        b = torch.zeros(0, V, H, W)
    del reg, anom, x
    release_memory()
    return {"climatology": clim, "residual_scale": scale, "damping": a, "forcing_response": b,
            "forcing_ref": ref.float()}
