"""Radiology at native resolution: the volume store of ``hfmi data prepare radiology``.

Phases (``--phases``, comma-separated):

- ``prepare``: generates ``--cases`` scans at native sizes (two thirds CT-like, 512 x 512 x
  100-300 at 0.7-1.0 mm in-plane and 1-2.5 mm between slices, int16 HU; one third MR-like,
  256 x 256 x 180 at 1 mm), each with a lesion label, as NIfTI; then runs ``hfmi data prepare
  radiology`` on them in a child process: wall time, cases/s, input MB/s and peak resident memory.
  CT and MR cases share no modality, so each case keeps its own (a pretraining store).
- ``crops``: random ``--crop``-cube crops of the store through ``StoreCrops`` (pretraining and
  foreground-oversampled segmentation crops) against the raw Zarr read of the same windows, the
  page cache warm for both (one untimed raw pass first).
- ``train``: ``hfmi pretrain radiology`` on a store of ``--train-cases`` small cases and on its first
  quarter, each in a child process: the peak memory should not depend on the number of cases.
- ``infer``: whole-scan sliding-window inference of a 512 x 512 x 400 volume with a tiny segmenter
  (random weights: time and memory only) in a child process: wall time and peak memory.

    .venv/bin/python benchmarks/radiology_scale.py --cases 20 --out runs/radiology_scale
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def native_case(rng: np.random.Generator, ct: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label, affine) of one generated scan at native size: an elliptic body with organs of
    different intensities, noise, and a spherical lesion with a core."""
    if ct:
        nz = int(rng.integers(100, 301))
        shape, sp = (512, 512, nz), (float(rng.uniform(0.7, 1.0)),) * 2 + (float(rng.uniform(1.0, 2.5)),)
    else:
        shape, sp = (256, 256, 180), (1.0, 1.0, 1.0)
    x = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None]
    y = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :]
    body2d = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    organ2d = ((x - 0.3) / 0.25) ** 2 + (y / 0.3) ** 2 < 1
    air, tissue, organ = (-1000.0, 40.0, 80.0) if ct else (0.0, 300.0, 500.0)
    img = np.empty(shape, np.float32)
    plane = np.where(body2d, tissue, air).astype(np.float32)
    plane[organ2d] = organ
    img[...] = plane[:, :, None]
    img += rng.normal(0, 12.0 if ct else 20.0, size=shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    c = np.array([shape[0] * 0.4, shape[1] * 0.5, shape[2] * 0.5]) + rng.normal(0, 5, 3)
    r_mm = float(rng.uniform(8, 20))
    sl = tuple(slice(max(int(ci - r_mm / s) - 1, 0), int(ci + r_mm / s) + 2) for ci, s in zip(c, sp))
    grid = np.meshgrid(*[(np.arange(s_.start, s_.stop) - ci) * s for s_, ci, s in zip(sl, c, sp)], indexing="ij")
    d = np.sqrt(sum(g ** 2 for g in grid))
    lab[sl][d < r_mm] = 1
    lab[sl][d < 0.5 * r_mm] = 2
    img[sl][d < r_mm] += 30.0 if ct else 150.0
    aff = np.diag([-sp[0], -sp[1], sp[2], 1.0])  # an LPS-stored scan as scanners write them
    aff[:3, 3] = [sp[0] * shape[0] / 2, sp[1] * shape[1] / 2, -sp[2] * shape[2] / 2]
    return (img.round().astype(np.int16) if ct else img), lab, aff


def generate(root: Path, n: int, seed: int = 0) -> int:
    """``n`` cases as ``<id>_ct.nii.gz`` / ``<id>_T1w.nii.gz`` with ``<id>_seg.nii.gz``; bytes written."""
    import nibabel as nib

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        ct = i % 3 != 2
        img, lab, aff = native_case(rng, ct)
        for arr, name in ((img, "ct" if ct else "T1w"), (lab, "seg")):
            h = nib.Nifti1Image(arr, aff)
            h.header.set_xyzt_units("mm", "sec")
            nib.save(h, root / f"case{i:03d}_{name}.nii.gz")
    return sum(p.stat().st_size for p in root.iterdir())


def child(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd``; (wall s, peak resident GiB, last output line)."""
    t = time.time()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    wall = time.time() - t
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    peak = int(r.stderr.strip().splitlines()[-1]) / 2**20
    return wall, peak, (r.stdout.strip().splitlines() or [""])[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=20, help="native-size cases to prepare")
    ap.add_argument("--phases", default="prepare,crops,train,infer")
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--crops", type=int, default=200, help="crops timed per kind")
    ap.add_argument("--train-cases", type=int, default=200)
    ap.add_argument("--out", default="runs/radiology_scale")
    ap.add_argument("--keep", action="store_true", help="reuse generated data and stores in --out")
    a = ap.parse_args()
    phases = a.phases.split(",")
    root = Path(a.out)
    hfmi = [sys.executable, "-m", "hfmi_kit.cli"]
    src, store = root / "native", root / "native.zarr"

    if "prepare" in phases:
        if not (a.keep and src.exists()):
            shutil.rmtree(src, ignore_errors=True)
            t = time.time()
            nbytes = generate(src, a.cases)
            print(f"generated {a.cases} cases ({nbytes / 2**30:.2f} GiB of .nii.gz) in {time.time() - t:.0f} s")
        nbytes = sum(p.stat().st_size for p in src.iterdir())
        import nibabel as nib

        vox = sum(int(np.prod(nib.load(p).shape)) for p in src.glob("*_ct.nii.gz")) + \
            sum(int(np.prod(nib.load(p).shape)) for p in src.glob("*_T1w.nii.gz"))
        wall, peak, _ = child([*hfmi, "data", "prepare", "radiology", str(src), "--out", str(store)])
        print(f"prepare: {a.cases} cases ({vox / 1e6:.0f} M voxels of images, {nbytes / 2**20:.0f} MiB on disk) "
              f"in {wall:.1f} s = {a.cases / wall:.2f} cases/s, {vox * 4 / 2**20 / wall:.0f} MiB/s of float32 "
              f"voxels; peak memory {peak:.2f} GiB")
        st_bytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        print(f"store: {st_bytes / 2**20:.0f} MiB on disk")
        r = subprocess.run([*hfmi, "data", "inspect", str(store)], capture_output=True, text=True)
        print("\n".join("  " + x for x in r.stdout.strip().splitlines()[-6:]))

    if "crops" in phases:
        from hfmi_kit.domains.radiology.store import RadiologyStore, StoreCrops

        st = RadiologyStore(store)
        ct_cases = [c for c in st.ids if st.case(c).attrs["modalities"] == ["ct"]]
        for task in ("pretrain", "segment"):
            # segmentation crops need one set of channels: the CT cases
            ds = StoreCrops(store, st.ids if task == "pretrain" else ct_cases, crop=a.crop, task=task,
                            modalities=st.modalities if task == "pretrain" else ["ct"], seed=0)
            wins = []
            for i in range(a.crops):  # the same windows the dataset draws
                rng = np.random.default_rng([0, i])
                k = i % len(ds.ids)
                wins.append((k, ds.window(k, ds._centre(rng, k))))
            def raw(ds: StoreCrops = ds, wins: list = wins, task: str = task) -> None:
                for k, w in wins:
                    g = ds._group(k)
                    sl = tuple(slice(max(s, 0), e) for s, e in w)
                    np.asarray(g["image"][(slice(None), *sl)])
                    if task == "segment":
                        np.asarray(g["label"][sl])

            raw()  # the page cache warm with every chunk either pass reads
            t = time.time()
            for i in range(a.crops):
                ds[i]
            t_ds = time.time() - t
            t = time.time()
            raw()
            t_raw = time.time() - t
            print(f"crops {task} {a.crop}^3: StoreCrops {a.crops / t_ds:.1f}/s, raw Zarr read of the same windows "
                  f"{a.crops / t_raw:.1f}/s = {100 * t_raw / t_ds:.0f} %")

    if "train" in phases:
        small = root / "small"
        sstore = root / "small.zarr"
        if not (a.keep and sstore.exists()):
            from hfmi_kit.domains.radiology import StudyConfig, generate_study

            shutil.rmtree(small, ignore_errors=True)
            t = time.time()
            generate_study(small, StudyConfig(unlabelled=a.train_cases, labelled=0, spacing_scale=1.4,
                                              dicom_subject=None))
            child([*hfmi, "data", "prepare", "radiology", str(small), "--out", str(sstore)])
            print(f"small store of {a.train_cases} cases in {time.time() - t:.0f} s")
        import zarr

        full = json.loads(zarr.open_group(str(sstore), mode="r").attrs["hfmi_store"])["cases"]
        quarter = root / "quarter.zarr"
        if not quarter.exists():  # the first quarter of the cases, as a store of its own
            shutil.copytree(sstore, quarter)
            for c in sorted(p.name for p in (quarter / "cases").iterdir())[full // 4:]:
                shutil.rmtree(quarter / "cases" / c)
            zarr.consolidate_metadata(str(quarter))
        for name, s in ((f"{full // 4} cases", quarter), (f"{full} cases", sstore)):
            out = root / f"pre_{s.stem}"
            wall, peak, _ = child([*hfmi, "pretrain", "radiology", "--data", str(s), "--out", str(out), "--steps", "30",
                                   "--batch-size", "8", "--device", "cpu"])
            print(f"pretrain from the store, {name}: 30 steps in {wall:.1f} s, peak memory {peak:.2f} GiB")

    if "infer" in phases:
        code = (
            "import time, numpy as np, torch, resource\n"
            "from hfmi_kit.train import recipe\n"
            "from hfmi_kit.domains.radiology.model import sliding_window_labels\n"
            "torch.manual_seed(0)\n"
            "m = recipe.build('radiology_segmenter.tiny', {'modalities': ['ct'], 'crop': 32, 'patch': 4,"
            " 'classes': 3}, seed=0).eval()\n"
            "img = np.random.default_rng(0).normal(size=(1, 512, 512, 400)).astype(np.float32)\n"
            "t = time.time()\n"
            "with torch.inference_mode():\n"
            "    lab, conf = sliding_window_labels(m.logits, img, window=32, background=[0.0], overlap=0.25,"
            " batch_size=32)\n"
            "print(f'{time.time() - t:.1f} s, labels {lab.shape}')\n")
        wall, peak, last = child([sys.executable, "-c", code])
        print(f"whole-scan inference 512x512x400 (crop 32, overlap 0.25, tiny segmenter, CPU): {last}; peak memory "
              f"{peak:.2f} GiB")
    print(f"(this process: peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")


if __name__ == "__main__":
    main()
