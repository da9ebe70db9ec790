"""Fast windowed reads from Zarr for training: direct chunk reads, optional node-local copy.

Zarr reads are the known bottleneck of climate training pipelines. This reader opens the
store's arrays once (no xarray/dask graph per sample), reads a time window of several
variables, and can copy the store to node-local disk on first use (``cache_dir``, e.g.
``$TMPDIR`` or ``/local_scratch`` on a compute node) so later epochs never touch the shared
file system. Chunking should match the access pattern: one (or a few) time steps per chunk,
whole fields in space (:func:`hfmi_kit.data.cf.write_cf` writes that).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hfmi_kit.errors import DataError

LOGGER = logging.getLogger(__name__)


def copy_to_local(path: str | Path, cache_dir: str | Path) -> Path:
    """Copy a Zarr store into ``cache_dir`` once (atomically) and return the local path."""
    src = Path(path)
    dst = Path(cache_dir) / f"{src.name}"
    if dst.exists():
        return dst
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{src.name}.tmp-", dir=cache_dir))
    try:
        shutil.copytree(src, tmp / src.name)
        os.replace(tmp / src.name, dst)
        LOGGER.info("copied %s to node-local %s", src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


class ZarrWindowSource:
    """Read ``[t0, t1)`` windows of several (time, ...) variables from one Zarr store."""

    def __init__(self, path: str | Path, variables: Sequence[str], *, cache_dir: str | Path | None = None) -> None:
        import zarr

        self.source = Path(path)
        if not self.source.exists():
            raise DataError(f"{self.source}: no such Zarr store")
        self.path = copy_to_local(self.source, cache_dir) if cache_dir else self.source
        try:
            group = zarr.open_group(str(self.path), mode="r")
        except Exception as e:
            raise DataError(f"{self.path}: cannot open as a Zarr group ({e})") from e
        missing = [v for v in variables if v not in group]
        if missing:
            raise DataError(f"{self.source}: variable(s) {missing} not in the store")
        self.variables = list(variables)
        self.arrays = [group[v] for v in self.variables]
        self.length = int(self.arrays[0].shape[0])
        self.fill = [a.fill_value for a in self.arrays]

    def __len__(self) -> int:
        return self.length

    def read_arrays(self, t0: int, t1: int) -> list[np.ndarray]:
        """Each variable's ``(t1 - t0, ...)`` float32 window, fill values as NaN (variables of
        different shapes, e.g. one on pressure levels beside a surface field).

        Raises:
            DataError: a window outside the store, or a chunk that cannot be read (naming the
                store, the variable and the steps)."""
        if not 0 <= t0 < t1 <= self.length:
            raise DataError(f"{self.source}: window [{t0}, {t1}) outside [0, {self.length})")
        out = []
        for name, a, f in zip(self.variables, self.arrays, self.fill):
            try:
                x = np.asarray(a[t0:t1], dtype=np.float32)
            except Exception as e:  # the codecs raise many types for a damaged chunk
                raise DataError(f"{self.source}: variable {name!r}, steps {t0}-{t1 - 1} cannot be read, the store "
                                f"is corrupt or truncated ({type(e).__name__}: {e})") from e
            if f is not None and np.isfinite(f):
                x[x == np.float32(f)] = np.nan
            out.append(x)
        return out

    def read(self, t0: int, t1: int) -> np.ndarray:
        """(t1 - t0, V, ...) float32 with fill values as NaN (variables of one shape)."""
        return np.stack(self.read_arrays(t0, t1), axis=1)
