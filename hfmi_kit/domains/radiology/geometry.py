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

import numpy as np
from scipy import ndimage

from hfmi_kit.domains.radiology.io import Volume


def model_grid(affine: np.ndarray, shape: Sequence[int], spacing: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of the isotropic, RAS-ordered grid that covers the volume ``(affine, shape)``.

    The grid's axes follow the input's direction cosines, permuted and flipped so the first
    axis points nearest to +R, the second to +A and the third to +S; its voxels are ``spacing``
    mm cubes and it covers the input's field of view (voxel centres of the corners).
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
    out_shape = tuple(int(np.ceil((h - lo_) / spacing - 1e-6)) + 1 for lo_, h in zip(lo, hi))
    out = np.eye(4)
    out[:3, :3] = D * spacing
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
    return ndimage.affine_transform(data, M[:3, :3], offset=M[:3, 3], output_shape=tuple(int(s) for s in dst_shape),
                                    order=order, mode="constant", cval=cval, prefilter=False,
                                    output=out_dtype)


def to_model_grid(vol: Volume, spacing: float, *, order: int = 1, cval: float | None = None,
                  grid: tuple[np.ndarray, Sequence[int]] | None = None) -> Volume:
    """``vol`` resampled to its model grid (or to ``grid``: another volume's model grid)."""
    aff, shape = grid if grid is not None else model_grid(vol.affine, vol.data.shape, spacing)
    bg = float(vol.data.min()) if cval is None else cval
    data = resample(vol.data, vol.affine, aff, shape, order=order, cval=bg)
    return Volume(data=data, affine=aff, path=vol.path, modality=vol.modality)


def to_input_grid(labels: np.ndarray, model_affine: np.ndarray, ref: Volume) -> np.ndarray:
    """A label map on the model grid, sampled (nearest) at every voxel of ``ref``'s grid."""
    return resample(labels, model_affine, ref.affine, ref.data.shape, order=0, cval=0)
