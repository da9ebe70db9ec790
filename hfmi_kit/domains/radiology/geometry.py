"""World-coordinate geometry: a volume's model grid, resampling to it and back.

The model sees every scan on a grid with the scan's own direction cosines, its axes permuted
and flipped to the nearest RAS+ order (what ``nibabel.as_closest_canonical`` does for the data
array) and an isotropic spacing. Oblique scans stay oblique (no rotation is interpolated away),
and the inverse mapping is one affine: a prediction goes back to the input grid by sampling it
at the world position of every input voxel. All resampling goes through
:func:`resample`, which maps output voxels to input voxels through the two affines, so there is
one place where a flip or half-voxel shift could hide, and the round-trip tests cover it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from hfmi_kit.domains.radiology.io import Volume


def model_grid(affine: np.ndarray, shape: Sequence[int], spacing: float | Sequence[float]
               ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of the RAS-ordered grid that covers the volume ``(affine, shape)``.

    The grid's axes follow the input's direction cosines, permuted and flipped so the first
    axis points nearest to +R, the second to +A and the third to +S; its voxels are ``spacing``
    mm cubes (or boxes of ``(sR, sA, sS)`` mm, an anisotropic target as nnU-Net plans one) and it
    covers the input's field of view (voxel centres of the corners).
    """
    import nibabel as nib

    A = np.asarray(affine, dtype=np.float64)
    zooms = np.linalg.norm(A[:3, :3], axis=0)
    R = A[:3, :3] / zooms
    ornt = nib.orientations.io_orientation(A)  # for input axis i: (output axis, flip)
    D = np.zeros((3, 3))
    for i, (ax, flip) in enumerate(ornt):
        D[:, int(ax)] = R[:, i] * flip
    # corners of the input's field of view in the new directions' frame
    n = np.asarray(shape, dtype=np.float64) - 1
    corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])])
    world = corners @ A[:3, :3].T + A[:3, 3]
    coords = world @ D  # (8, 3) coordinates along the new axes
    lo, hi = coords.min(0), coords.max(0)
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    out_shape = tuple(int(np.ceil((h - lo_) / s - 1e-6)) + 1 for lo_, h, s in zip(lo, hi, sp))
    out = np.eye(4)
    out[:3, :3] = D * sp  # column j scaled by the spacing of output axis j
    out[:3, 3] = D @ lo
    return out, out_shape  # type: ignore[return-value]


def resample(data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int], *,
             order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Sample ``data`` (on ``src_affine``) at the voxel centres of the grid ``(dst_affine, dst_shape)``.

    ``order`` 1 (trilinear) for images, 0 (nearest) for label maps; points outside the source
    get ``cval``.
    """
    M = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    out_dtype = data.dtype if order == 0 else np.float32
    L, t = M[:3, :3], M[:3, 3]
    rows = np.argmax(np.abs(L), axis=0)  # the source axis each output axis runs along
    diag = L[rows, [0, 1, 2]]
    off = L.copy()
    off[rows, [0, 1, 2]] = 0.0
    if len(set(rows.tolist())) == 3 and np.abs(off).max() <= 1e-9 * np.abs(diag).max():
        # axis-aligned (the usual scan: the grids differ by an axis order, flips and spacings): the
        # source's axes reordered to the output's make the map diagonal, and trilinear (or
        # nearest) interpolation is then three 1-D passes, several times faster than scipy's
        return _separable(np.transpose(data, rows), diag, t[rows], [int(s) for s in dst_shape], order=order,
                          cval=cval, dtype=out_dtype)
    return ndimage.affine_transform(data, L, offset=t, output_shape=tuple(int(s) for s in dst_shape),
                                    order=order, mode="constant", cval=cval, prefilter=False,
                                    output=out_dtype)


def ras_spacing(affine: np.ndarray) -> np.ndarray:
    """The voxel size (mm) along the R, A and S axes of the model grid: the input's spacings in
    the order :func:`model_grid` permutes its axes to (no resampling)."""
    import nibabel as nib

    A = np.asarray(affine, dtype=np.float64)
    zooms = np.linalg.norm(A[:3, :3], axis=0)
    out = np.zeros(3)
    for i, (ax, _) in enumerate(nib.orientations.io_orientation(A)):
        out[int(ax)] = zooms[i]
    return out


def _separable(data: np.ndarray, scale: np.ndarray, offset: np.ndarray, shape: Sequence[int], *, order: int,
               cval: float, dtype: Any) -> np.ndarray:
    """``data`` sampled at ``scale * i + offset`` along each axis (as :func:`scipy.ndimage.affine_transform`
    with a diagonal matrix, mode ``constant``: a point outside the source's [0, n - 1] on any axis
    takes ``cval``), one axis at a time (torch's threaded gathers); ``order`` 1 linear, 0 nearest."""
    import torch

    safe = data.flags.writeable and min(data.strides) >= 0  # torch takes no read-only or reversed arrays
    x = torch.from_numpy(data if safe else np.ascontiguousarray(data))
    if order != 0 and x.dtype != torch.float32:
        x = x.float()
    for ax in range(3):
        n = x.shape[ax]
        c = scale[ax] * np.arange(shape[ax], dtype=np.float64) + offset[ax]
        outside = torch.from_numpy((c < -1e-6) | (c > n - 1 + 1e-6))
        if order == 0:
            x = x.index_select(ax, torch.from_numpy(np.clip(np.floor(c + 0.5).astype(np.int64), 0, n - 1)))
        else:
            i0 = np.clip(np.floor(c).astype(np.int64), 0, max(n - 2, 0))
            w = torch.from_numpy(np.clip(c - i0, 0.0, 1.0).astype(np.float32))
            bshape = [1, 1, 1]
            bshape[ax] = -1
            lo = x.index_select(ax, torch.from_numpy(i0))
            lo.lerp_(x.index_select(ax, torch.from_numpy(np.minimum(i0 + 1, n - 1))), w.reshape(bshape))
            x = lo
        if outside.any():
            x.index_fill_(ax, outside.nonzero()[:, 0], cval)
    return x.numpy().astype(dtype, copy=False)


def to_model_grid(vol: Volume, spacing: float | Sequence[float], *, order: int = 1, cval: float | None = None,
                  grid: tuple[np.ndarray, Sequence[int]] | None = None) -> Volume:
    """``vol`` resampled to its model grid (or to ``grid``: another volume's model grid)."""
    aff, shape = grid if grid is not None else model_grid(vol.affine, vol.data.shape, spacing)
    bg = float(vol.data.min()) if cval is None else cval
    data = resample(vol.data, vol.affine, aff, shape, order=order, cval=bg)
    return Volume(data=data, affine=aff, path=vol.path, modality=vol.modality)


def to_input_grid(labels: np.ndarray, model_affine: np.ndarray, ref: Volume) -> np.ndarray:
    """A label map on the model grid, sampled (nearest) at every voxel of ``ref``'s grid."""
    return resample(labels, model_affine, ref.affine, ref.data.shape, order=0, cval=0)
