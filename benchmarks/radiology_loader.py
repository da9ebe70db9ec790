"""Radiology loader benchmark: volumes/s through loading + resampling against nibabel's raw read.

Generates (or reuses) a study set, then times, over every NIfTI image:
  raw     nibabel.load(...).get_fdata(float32): decompression and decoding only
  hfmi    load_nifti + checks + intensity normalisation + resampling to the 3 mm model grid
  monai   LoadImaged + EnsureChannelFirstd + Orientationd(RAS) + Spacingd(3 mm), for reference
and the memory the sliding-window inference keeps per voxel against a per-class accumulator.

    python benchmarks/radiology_loader.py --subjects 12
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/radiology_loader")
    ap.add_argument("--subjects", type=int, default=12)
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    import nibabel as nib

    from hfmi_kit.domains.radiology import StudyConfig, discover, generate_study
    from hfmi_kit.domains.radiology.data import normalise
    from hfmi_kit.domains.radiology.geometry import to_model_grid
    from hfmi_kit.domains.radiology.io import Volume, load_nifti

    study = Path(a.out) / "study"
    if not (study / "dataset.json").is_file():
        generate_study(study, StudyConfig(unlabelled=a.subjects, labelled=0, dicom_subject=None))
    files = [(p, m) for s in discover(study) for m, p in s.images.items()]
    vox = [int(np.prod(nib.load(p).shape)) for p, _ in files]
    print(f"{len(files)} volumes, {np.mean(vox) / 1e6:.2f} M voxels each on average")

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(a.repeats):
            t = time.perf_counter()
            for p, m in files:
                fn(p, m)
            best = min(best, time.perf_counter() - t)
        return len(files) / best

    def raw(p: str, m: str) -> None:
        nib.load(p).get_fdata(dtype=np.float32)

    def hfmi(p: str, m: str) -> None:
        v = load_nifti(p, modality=m)
        x, bg = normalise(v.data, m, p)
        to_model_grid(Volume(x, v.affine, p, m), a.spacing, cval=bg)

    r_raw, r_hfmi = timed(raw), timed(hfmi)
    print(f"nibabel raw read          {r_raw:7.2f} volumes/s")
    print(f"hfmi load+check+resample  {r_hfmi:7.2f} volumes/s  ({r_hfmi / r_raw:.2f} x raw)")
    try:
        from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

        tf = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"),
                      Orientationd(keys="image", axcodes="RAS"), Spacingd(keys="image", pixdim=a.spacing)])
        r_monai = timed(lambda p, m: tf({"image": p}))
        print(f"MONAI load+orient+spacing {r_monai:7.2f} volumes/s  ({r_monai / r_raw:.2f} x raw)")
    except Exception as e:  # MONAI is optional for this figure
        print(f"MONAI pipeline skipped: {e}")
    for shape, k in (((512, 512, 400), 3), ((512, 512, 400), 14)):
        n = int(np.prod(shape))
        ours = n * (4 + 1)
        acc = n * 4 * (k + 1)  # per-class float32 sums + a count map
        print(f"sliding-window buffers for a {shape} grid, {k} classes: {ours / 2**30:.2f} GiB "
              f"(label + confidence) vs {acc / 2**30:.2f} GiB per-class accumulation")


if __name__ == "__main__":
    main()
