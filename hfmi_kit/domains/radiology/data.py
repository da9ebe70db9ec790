"""Studies on disk -> subjects -> preprocessed volumes on the model grid -> dictionary samples.

A study folder holds either a ``dataset.json`` (as written by :mod:`.synth`, in the spirit of
the Medical Segmentation Decathlon / nnU-Net files) or plain files named
``<subject>_<modality>.nii[.gz]`` (labels: ``<subject>_seg.nii[.gz]``) and DICOM series
folders, found recursively. Preprocessing (MONAI-style dictionary samples with ``image``,
``label``, ``modality`` keys) resamples every modality of a subject onto one isotropic model
grid (the first modality's, see :mod:`.geometry`), and normalises intensities: CT by a fixed
HU window, MR by z-scoring over the head (the nnU-Net conventions).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hfmi_kit.config import json_kind, read_json_object
from hfmi_kit.data.safety import inside
from hfmi_kit.domains.radiology.geometry import model_grid, resample, to_model_grid
from hfmi_kit.domains.radiology.io import NIFTI_SUFFIXES, Volume, is_dicom_dir, is_nifti, load_volume
from hfmi_kit.domains.radiology.synth import LABELS
from hfmi_kit.errors import DataError

LABEL_SUFFIXES = ("seg", "label", "labels", "mask")
CT_WINDOW = (-100.0, 200.0)  # HU; brain window wide enough for oedema (~15 HU) to haemorrhage (~80 HU)


@dataclass
class Subject:
    """One subject: modality -> image path (NIfTI file or DICOM folder), optional label path."""

    id: str
    images: dict[str, str]
    label: str | None = None
    dicom: dict[str, str] = field(default_factory=dict)  # modality -> DICOM series of the same scan
    classes: dict[int, str] | None = None  # label value -> name, as the study's dataset.json declares
    classes_from: str = ""  # the file that declares ``classes`` (for error messages)


def _strip(name: str) -> str:
    for s in NIFTI_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def discover(root: str | Path) -> list[Subject]:
    """Subjects of a study folder (see the module docstring), sorted by id."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such study folder")
    if root.is_file():
        raise DataError(f"{root}: expected a folder of NIfTI files or DICOM series, got a file")
    meta = root / "dataset.json"
    if meta.is_file():
        return _read_study(meta)
    found: dict[str, Subject] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and is_nifti(p):
            stem = _strip(p.name)
            sid, _, mod = stem.rpartition("_")
            if not sid:
                sid, mod = stem, "image"
            sub = found.setdefault(sid, Subject(id=sid, images={}))
            if mod.lower() in LABEL_SUFFIXES:
                sub.label = str(p)
            elif mod in sub.images:
                raise DataError(f"{p}: a second {mod!r} image for subject {sid!r} ({sub.images[mod]})")
            else:
                sub.images[mod] = str(p)
        elif p.is_dir() and is_dicom_dir(p):
            import pydicom
            from pydicom.errors import InvalidDicomError

            first = next(f for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith("."))
            try:
                ds = pydicom.dcmread(first, stop_before_pixels=True)
            except (InvalidDicomError, OSError, EOFError, ValueError) as e:
                raise DataError(f"{first}: not a readable DICOM file ({type(e).__name__}: {e})") from e
            mod = "ct" if str(getattr(ds, "Modality", "")).upper() == "CT" else str(getattr(ds, "Modality", "MR"))
            sid = p.parent.name if p.parent != root else p.name
            sub = found.setdefault(sid, Subject(id=sid, images={}))
            if mod in sub.images:  # a NIfTI of the same scan exists; keep the DICOM for DICOM-SEG output
                sub.dicom[mod] = str(p)
            else:
                sub.images[mod] = str(p)
    subs = [s for s in found.values() if s.images]
    if not subs:
        raise DataError(f"{root}: no NIfTI files (.nii, .nii.gz) or DICOM series found")
    return sorted(subs, key=lambda s: s.id)


_kind = json_kind


def _read_classes(meta: Path, js: dict[str, Any]) -> dict[int, str] | None:
    """The ``labels`` entry of a dataset.json (value -> name), checked; None when absent."""
    if "labels" not in js:
        return None
    labels = js["labels"]
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{meta}: 'labels' must map label values to names (e.g. {{\"0\": \"background\"}}), got "
                        f"{_kind(labels)}")
    out = {}
    for k, v in labels.items():
        try:
            out[int(k)] = str(v)
        except ValueError:
            raise DataError(f"{meta}: 'labels' key {k!r} is not an integer label value") from None
    return out


def _read_study(meta: Path) -> list[Subject]:
    """Subjects of a study described by ``meta`` (dataset.json), every entry and file checked."""
    root = meta.parent
    js = read_json_object(meta, error=DataError,
                          expected="a JSON object with 'subjects' (and 'labels', 'modalities')")
    entries = js.get("subjects")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{meta}: 'subjects' must be a non-empty list of subjects, got {_kind(entries)}")
    classes = _read_classes(meta, js)
    subs, seen = [], set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("id"), str) or not e["id"]:
            raise DataError(f"{meta}: subjects[{i}] must be an object with a string 'id', got {_kind(e)}")
        sid = e["id"]
        if sid in seen:
            raise DataError(f"{meta}: subject {sid} is listed twice")
        seen.add(sid)
        files: dict[str, dict[str, str]] = {}
        for key, required in (("images", True), ("dicom", False)):
            v = e.get(key, {} if not required else None)
            if not isinstance(v, dict) or (required and not v) or \
                    not all(isinstance(m, str) and isinstance(f, str) for m, f in v.items()):
                raise DataError(f"{meta}: subject {sid}: {key!r} must map modality names to file paths, got "
                                f"{_kind(v)}")
            for f in v.values():
                inside(root, f, manifest=meta)  # relative, no '..', not leading out through a link
            files[key] = {m: str(root / f) for m, f in v.items()}
        label = e.get("label")
        if label is not None and not isinstance(label, str):
            raise DataError(f"{meta}: subject {sid}: 'label' must be a file path, got {_kind(label)}")
        if label:
            inside(root, label, manifest=meta)
        listed = [("image", f) for f in files["images"].values()] + [("DICOM series", f) for f in
                                                                    files["dicom"].values()]
        if label:
            listed.append(("label", str(root / label)))
        for what, f in listed:
            if not Path(f).exists():
                raise DataError(f"{meta}: subject {sid}: {what} {os.path.relpath(f, root)} does not exist")
        subs.append(Subject(id=sid, images=files["images"], label=str(root / label) if label else None,
                            dicom=files["dicom"], classes=classes, classes_from=str(meta) if classes else ""))
    return sorted(subs, key=lambda s: s.id)


def check_label_values(sub: Subject, values: np.ndarray) -> None:
    """Raise :class:`DataError` naming the label file and the values when ``values`` (the unique
    voxel values of ``sub``'s label map) are not all classes the study declares (its dataset.json
    ``labels``, else background 0, oedema 1, tumour core 2)."""
    if np.any(values != np.round(values)):
        raise DataError(f"{sub.label}: label values must be integers, got {values[values != np.round(values)][:8]}")
    classes = sub.classes if sub.classes is not None else LABELS
    bad = sorted(int(v) for v in values if int(v) not in classes)
    if bad:
        where = f"{Path(sub.classes_from).name} declares" if sub.classes is not None else "are (the default labels)"
        names = ", ".join(f"{k} {v}" for k, v in sorted(classes.items()))
        raise DataError(f"{sub.label}: label values {bad[:8]} are not among the classes {where}: {names}")


def normalise(data: np.ndarray, modality: str, where: str = "") -> tuple[np.ndarray, float]:
    """CT: clip to the HU window and scale; MR: z-score over the head. Returns (image, air value)."""
    if modality.lower() == "ct":
        lo, hi = CT_WINDOW
        return ((np.clip(data, lo, hi) - 40.0) / 60.0).astype(np.float32), (lo - 40.0) / 60.0
    pos = data[data > 0]
    if pos.size < 10:
        raise DataError(f"{where or modality}: empty image (fewer than 10 positive voxels)")
    thr = 0.1 * float(np.percentile(pos, 99))
    fg = data[data > thr]
    mu, sd = float(fg.mean()), float(fg.std()) + 1e-6
    return ((data - mu) / sd).astype(np.float32), -mu / sd


@dataclass
class Prepared:
    """A subject on its model grid: ``image`` (M, I, J, K), ``label`` (I, J, K) or None."""

    id: str
    modalities: list[str]
    image: np.ndarray
    affine: np.ndarray
    label: np.ndarray | None = None
    background: list[float] = field(default_factory=list)  # normalised air value per modality
    label_ref: Volume | None = None  # the label on its original grid (for metrics in input space)
    ref: Volume | None = None  # the reference image on its original grid (header for outputs)
    dicom: dict[str, str] = field(default_factory=dict)


def _same_grid(a: Volume, b: Volume, tol: float = 1e-3) -> bool:
    return a.data.shape == b.data.shape and bool(np.allclose(a.affine, b.affine, atol=tol))


def prepare(sub: Subject, modalities: Sequence[str], spacing: float | Sequence[float], *, with_label: bool = True,
            keep_ref: bool = False) -> Prepared:
    """Load, co-register (by world coordinates) and normalise one subject's ``modalities``."""
    missing = [m for m in modalities if m not in sub.images]
    if missing:
        raise DataError(f"subject {sub.id}: no {missing} image(s); it has {sorted(sub.images)}")
    vols = [load_volume(sub.images[m], modality=m) for m in modalities]
    grid = model_grid(vols[0].affine, vols[0].data.shape, spacing)
    chans, bgs = [], []
    for m, v in zip(modalities, vols):
        x, bg = normalise(v.data, m, v.path)
        chans.append(to_model_grid(Volume(x, v.affine, v.path, m), spacing, grid=grid, cval=bg).data)
        bgs.append(bg)
    out = Prepared(id=sub.id, modalities=list(modalities), image=np.stack(chans), affine=grid[0],
                   background=bgs, dicom=dict(sub.dicom))
    if keep_ref:
        out.ref = vols[0]
    if with_label and sub.label:
        lab = load_volume(sub.label)
        if not any(_same_grid(lab, v) for v in vols):
            raise DataError(f"{sub.label}: label grid (shape {lab.data.shape}) matches none of subject "
                            f"{sub.id}'s images {[v.data.shape for v in vols]}; a label must share its image's "
                            "shape and affine")
        small = lab.data.astype(np.uint8)
        if np.array_equal(small, lab.data):  # the usual label map: small integers, counted in one pass
            check_label_values(sub, np.flatnonzero(np.bincount(small.ravel(), minlength=256)).astype(np.float64))
        else:
            check_label_values(sub, np.unique(lab.data))
        lab.data = small
        out.label = resample(lab.data, lab.affine, grid[0], grid[1], order=0)
        out.label_ref = lab
    return out


def pad_to(x: np.ndarray, size: int, value: float | Sequence[float]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Pad the last three axes of ``x`` to at least ``size`` (centred); returns the padding."""
    pads = [(0, 0)] * (x.ndim - 3)
    sp = []
    for n in x.shape[-3:]:
        extra = max(size - n, 0)
        sp.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in sp):
        return x, sp
    if isinstance(value, int | float):
        return np.pad(x, pads + sp, constant_values=value), sp
    return np.stack([np.pad(c, sp, constant_values=v) for c, v in zip(x, value)]), sp


class PretrainCrops(Dataset):
    """Random ``crop``-cubes from single-modality volumes: ``{"inputs": (1, c, c, c), "modality": ()}``.

    Item ``i`` is a fixed function of (seed, i): volume ``i mod n`` and a crop centred on a random
    head voxel, with random flips, so a resumed run sees the same samples.
    """

    def __init__(self, volumes: Sequence[tuple[np.ndarray, int, float]], *, crop: int = 32, length: int = 100_000,
                 seed: int = 0) -> None:
        if not volumes:
            raise DataError("no volumes to pretrain on")
        self.vols = [pad_to(v, crop, bg)[0] for v, _, bg in volumes]
        self.mods = [m for _, m, _ in volumes]
        self.fg = [np.argwhere(v > bg + 0.5) for v, (_, _, bg) in zip(self.vols, volumes)]
        self.crop, self.length, self.seed = crop, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i])
        k = i % len(self.vols)
        v = self.vols[k]
        fg = self.fg[k]
        c = fg[rng.integers(len(fg))] if len(fg) else np.array(v.shape) // 2
        x = _crop(v[None], c, self.crop)[0]
        for ax in range(3):
            if rng.random() < 0.5:
                x = np.flip(x, ax)
        return {"inputs": torch.from_numpy(np.ascontiguousarray(x))[None], "modality": torch.tensor(self.mods[k])}


def _crop(x: np.ndarray, centre: np.ndarray, size: int) -> np.ndarray:
    """A ``size``-cube of the last three axes around ``centre``, kept inside the volume."""
    sl = []
    for c, n in zip(centre, x.shape[-3:]):
        s = int(np.clip(int(c) - size // 2, 0, n - size))
        sl.append(slice(s, s + size))
    return x[(Ellipsis, *sl)]


class SegCrops(Dataset):
    """Crops with all modalities and the label: ``{"inputs": (M, c, c, c), "target": (c, c, c)}``.

    Half of the crops are centred on a tumour voxel (foreground oversampling, as nnU-Net), the
    rest anywhere in the head; random flips along each axis.
    """

    def __init__(self, subjects: Sequence[Prepared], *, crop: int = 32, length: int = 100_000, seed: int = 0,
                 fg_fraction: float = 0.5) -> None:
        if not subjects or any(s.label is None for s in subjects):
            raise DataError("fine-tuning needs labelled subjects")
        self.items = []
        for s in subjects:
            bg = s.background
            img, _ = pad_to(s.image, crop, bg)
            lab, _ = pad_to(s.label, crop, 0)
            self.items.append((img, lab, np.argwhere(lab > 0), np.argwhere(img[0] > bg[0] + 0.5)))
        self.crop, self.length, self.seed, self.fg_fraction = crop, length, seed, fg_fraction

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i])
        img, lab, fg, head = self.items[i % len(self.items)]
        pool = fg if (len(fg) and rng.random() < self.fg_fraction) else head
        c = pool[rng.integers(len(pool))] if len(pool) else np.array(lab.shape) // 2
        x, y = _crop(img, c, self.crop), _crop(lab, c, self.crop)
        for ax in range(3):
            if rng.random() < 0.5:
                x, y = np.flip(x, ax + 1), np.flip(y, ax)
        return {"inputs": torch.from_numpy(np.ascontiguousarray(x)),
                "target": torch.from_numpy(np.ascontiguousarray(y).astype(np.int64))}


def split_subjects(subjects: Sequence[Subject], *, test_fraction: float = 0.3) -> tuple[list[Subject], list[Subject]]:
    """(pool, test) of the labelled subjects: the test set is the last ``test_fraction`` by id.

    Deterministic and independent of the seed and the label budget, so every run and baseline
    is scored on the same cases.
    """
    lab = [s for s in subjects if s.label]
    if len(lab) < 3:
        raise DataError(f"{len(lab)} labelled subject(s); fine-tuning needs at least 3 (training + test)")
    n_test = max(1, int(round(test_fraction * len(lab))))
    return lab[:-n_test], lab[-n_test:]


def modality_order(subjects: Sequence[Subject]) -> list[str]:
    """Modalities every subject has, in a stable order (T1w first when present)."""
    common = set.intersection(*(set(s.images) for s in subjects)) if subjects else set()
    pref = ["T1w", "T2w", "FLAIR", "T1ce", "ct", "MR"]
    return sorted(common, key=lambda m: (pref.index(m) if m in pref else len(pref), m))


def describe(subjects: Sequence[Subject]) -> dict[str, Any]:
    """Counts for logs and model cards."""
    mods: dict[str, int] = {}
    for s in subjects:
        for m in s.images:
            mods[m] = mods.get(m, 0) + 1
    return {"subjects": len(subjects), "labelled": sum(1 for s in subjects if s.label), "modalities": mods}
