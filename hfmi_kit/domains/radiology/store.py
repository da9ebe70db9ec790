"""``hfmi data prepare radiology``: a study folder preprocessed once into a chunked volume store.

In the manner of nnU-Net's fingerprint -> plan -> preprocess: a first pass reads only the
headers of every scan (shape, voxel size along R, A and S) and picks the target spacing from
that fingerprint (the median per axis; on anisotropic data the coarse axis takes the 10th
percentile of its spacings, as nnU-Net does, so thin slices are not thrown away). A second pass
takes one case at a time: its modalities are read, reordered to RAS and resampled once onto that
grid (:func:`.geometry.model_grid`; oblique scans stay oblique), intensities normalised as in
training (CT by the HU window, MR z-scored within the head) and written as compressed chunks
(``cases/<id>/image`` (M, I, J, K) float32, ``label`` uint8 on the same grid, ``label_input``
on the label's own grid for scoring in input space), with the case's geometry, the head's
bounding box and up to :data:`LOCATIONS` voxel positions per tumour class (for foreground
oversampling) in its attributes. Memory holds one case; the store is written under a temporary
name and renamed when complete, so an interrupted run leaves no half store.

:class:`RadiologyStore` reads it back: cases as lazy arrays, :class:`StoreCrops` random 3-D
crops (each a fixed function of (seed, index): a resumed run sees the same crops) reading only
the chunks a crop touches, and :meth:`RadiologyStore.prepared` one whole case for scoring.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hfmi_kit import options as opt
from hfmi_kit.config import move_into_place
from hfmi_kit.data.safety import check_zarr
from hfmi_kit.domains.radiology import data as rdata
from hfmi_kit.domains.radiology.geometry import ras_spacing
from hfmi_kit.domains.radiology.io import Volume, check_nifti_file, is_nifti, load_volume
from hfmi_kit.errors import DataError
from hfmi_kit.train.env import code_version

LOGGER = logging.getLogger(__name__)
STORE_MARK = "hfmi_store"
STORE_FORMAT = 1
LOCATIONS = 10_000  # foreground voxel positions kept per class and case (nnU-Net keeps as many)
ANISOTROPY = 3.0  # a coarse axis this many times the finest spacing is "anisotropic" (nnU-Net's threshold)
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _compressor() -> Any:
    import numcodecs

    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)


# ----------------------------------------------------------------------------------- fingerprint

def header_geometry(path: str | Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """(affine, shape) of a scan without reading its voxels (NIfTI); a DICOM series is read."""
    p = Path(path)
    if is_nifti(p) and p.is_file():
        import nibabel as nib

        check_nifti_file(p)
        try:
            img = nib.load(str(p))
            shape = tuple(int(n) for n in img.shape)
        except Exception as e:  # nibabel raises many types for a bad header
            raise DataError(f"{p}: cannot read the NIfTI header ({type(e).__name__}: {e})") from e
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise DataError(f"{p}: {len(shape)}-D image of shape {shape}; expected a 3-D volume")
        return np.asarray(img.affine, dtype=np.float64), shape
    v = load_volume(p)
    return v.affine, tuple(v.data.shape)


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """The spacing (mm along R, A, S) to resample every case to, from their ``spacings`` and
    ``shapes`` (N, 3) in RAS order: the median per axis; when the coarsest axis is more than
    :data:`ANISOTROPY` times the others and has fewer than a third of their voxels, that axis
    takes the 10th percentile of its spacings instead (not finer than the other axes)."""
    spacings = np.asarray(spacings, dtype=np.float64)
    target = np.median(spacings, axis=0)
    size = np.median(np.asarray(shapes, dtype=np.float64) * spacings / target, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    if target[worst] > ANISOTROPY * max(target[others]) and size[worst] * ANISOTROPY < min(size[others]):
        target[worst] = max(float(np.percentile(spacings[:, worst], 10)), float(max(target[others])))
    return target


def fingerprint(subjects: Sequence[rdata.Subject], modalities: dict[str, list[str]]) -> dict[str, Any]:
    """Shapes and spacings (RAS order) of every case's first modality (``modalities``: subject id
    -> its modalities), from the headers."""
    import nibabel as nib

    rows = []
    for s in subjects:
        aff, shape = header_geometry(s.images[modalities[s.id][0]])
        order = np.argsort([int(a) for a, _ in nib.orientations.io_orientation(aff)])
        rows.append({"id": s.id, "modality": modalities[s.id][0], "shape": [int(shape[i]) for i in order],
                     "spacing": [round(float(x), 6) for x in ras_spacing(aff)]})
    sp = np.array([r["spacing"] for r in rows])
    sh = np.array([r["shape"] for r in rows])
    return {"cases": rows, "median_spacing": np.median(sp, 0).tolist(), "median_shape": np.median(sh, 0).tolist(),
            "target_spacing": [round(float(x), 6) for x in target_spacing(sp, sh)]}


# ----------------------------------------------------------------------------------------- write

def _spacing3(spacing: Sequence[float] | None, where: str) -> np.ndarray | None:
    if spacing is None:
        return None
    sp = np.asarray(list(spacing), dtype=np.float64)
    if sp.size == 1:
        sp = np.repeat(sp, 3)
    if sp.size != 3 or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise DataError(f"{where}: --spacing must be one or three positive numbers in mm (R, A, S), got "
                        f"{list(spacing)}")
    return sp


def _locations(label: np.ndarray, seed: int) -> np.ndarray:
    """Up to :data:`LOCATIONS` voxel positions of every class > 0: rows (class, i, j, k)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in np.flatnonzero(np.bincount(label.ravel(), minlength=1)):
        if k == 0:
            continue
        idx = np.flatnonzero(label == k)
        if idx.size > LOCATIONS:
            idx = np.sort(rng.choice(idx, LOCATIONS, replace=False))
        ijk = np.stack(np.unravel_index(idx, label.shape), 1)
        rows.append(np.column_stack([np.full(len(ijk), int(k)), ijk]))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def _bbox(mask: np.ndarray) -> list[list[int]]:
    """[[lo, hi) per axis] of the true voxels of ``mask`` (the whole grid when none)."""
    out = []
    for ax in range(mask.ndim):
        any_ = mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax))
        nz = np.flatnonzero(any_)
        out.append([int(nz[0]), int(nz[-1]) + 1] if nz.size else [0, int(mask.shape[ax])])
    return out


def _write_case(group: Any, case: rdata.Prepared, sub: rdata.Subject, root: Path, chunk: int) -> dict[str, Any]:
    cg = group.create_group(case.id)
    img = case.image
    a = cg.create_array("image", shape=img.shape, chunks=(1, *(min(chunk, n) for n in img.shape[1:])),
                        dtype="float32", compressors=_compressor(), fill_value=0.0)
    a[...] = img
    head = img[0] > case.background[0] + 0.5
    attrs: dict[str, Any] = {
        "id": case.id, "modalities": case.modalities, "shape": list(img.shape[1:]),
        "affine": case.affine.tolist(), "background": [float(b) for b in case.background],
        "head_bbox": _bbox(head), "labelled": case.label is not None,
        "images": {m: os.path.relpath(p, root) for m, p in sub.images.items() if m in case.modalities},
    }
    ref = case.ref
    if ref is not None:
        attrs["input_affine"] = ref.affine.tolist()
        attrs["input_shape"] = list(ref.data.shape)
    if case.label is not None and case.label_ref is not None:
        ch = tuple(min(chunk, n) for n in case.label.shape)
        cg.create_array("label", shape=case.label.shape, chunks=ch, dtype="uint8", compressors=_compressor(),
                        fill_value=0)[...] = case.label
        li = case.label_ref.data.astype(np.uint8)
        cg.create_array("label_input", shape=li.shape, chunks=tuple(min(chunk, n) for n in li.shape),
                        dtype="uint8", compressors=_compressor(), fill_value=0)[...] = li
        attrs["label_input_affine"] = case.label_ref.affine.tolist()
        loc = _locations(case.label, seed=zlib.crc32(case.id.encode()))  # the same draw on every run
        cg.create_array("locations", shape=loc.shape, chunks=(max(len(loc), 1), 4), dtype="int32",
                        compressors=_compressor(), fill_value=0)[...] = loc
        attrs["classes_present"] = sorted({int(k) for k in loc[:, 0]})
    cg.attrs.update(attrs)
    return attrs


def prepare(*, sources: Annotated[Sequence[str | Path], opt.Opt("the study folder (NIfTI files, DICOM series, "
                                                                "dataset.json)")],
            out: opt.Out,
            spacing: Annotated[Sequence[float] | None, opt.Opt("target voxel spacing in mm, one number or three "
                                                               "(R, A, S); None: from the data's fingerprint "
                                                               "(median, anisotropy kept)")] = None,
            variables: opt.Variables = None,
            chunk: Annotated[int, opt.Opt("edge of the stored chunks, in voxels (about the training crop)",
                                          low=8)] = 64,
            progress: opt.Progress = True) -> Path:
    """Preprocess the study ``sources`` (one folder) into a volume store at ``out`` (see the module
    docstring); returns it. ``variables`` selects modalities (default: those every subject has).

    Raises:
        DataError: naming the file or subject: no study, a subject without a modality, a label
            off its image's grid or with undeclared classes, an unreadable scan, a bad spacing.
    """
    out = Path(out)
    if out.suffix != ".zarr":
        raise DataError(f"{out}: the store's name must end in .zarr")
    if len(sources) != 1:
        raise DataError(f"radiology prepares one study folder at a time, got {len(sources)} sources: "
                        f"{', '.join(map(str, sources))}")
    root = Path(sources[0])
    subjects = rdata.discover(root)
    for s in subjects:
        if not _CASE_ID.match(s.id):
            raise DataError(f"{root}: subject id {s.id!r} is not a plain name (letters, digits, '.', '_', '-')")
    mods = rdata.modality_order(subjects) if not variables else list(variables)
    per_case = {s.id: list(mods) for s in subjects}
    if not mods:  # no modality common to all (CT cases beside MR cases): each case keeps its own, for pretraining
        mods = rdata.modality_order([rdata.Subject(id="all", images={m: "" for s in subjects for m in s.images})])
        per_case = {s.id: [m for m in mods if m in s.images] for s in subjects}
        LOGGER.info("%s: no modality in every subject; each case keeps its own (%s)", root, ", ".join(mods))
    for s in subjects:
        missing = [m for m in per_case[s.id] if m not in s.images]
        if missing:
            raise DataError(f"{root}: subject {s.id} has no {missing} image(s); it has {sorted(s.images)}")
    fp = fingerprint(subjects, per_case)
    sp = _spacing3(spacing, str(root))
    target = sp if sp is not None else np.asarray(fp["target_spacing"])
    LOGGER.info("preparing %d cases (%s) at %s mm", len(subjects), mods, target.round(3).tolist())
    import zarr

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)) / out.name
    try:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        cases = g.create_group("cases")
        classes: dict[int, str] = {}
        labelled = 0
        intensity: list[list[float]] = []  # raw percentiles of each case's first modality
        from tqdm.auto import tqdm

        for s in tqdm(subjects, desc="prepare", unit="case", disable=not progress, dynamic_ncols=True,
                      mininterval=1.0):
            case = rdata.prepare(s, per_case[s.id], target, with_label=True, keep_ref=True)
            if case.ref is not None:
                raw = case.ref.data[:: max(1, case.ref.data.shape[0] // 64)]
                intensity.append([round(float(x), 4) for x in np.percentile(raw, [0.5, 50, 99.5])])
            _write_case(cases, case, s, root, chunk)
            labelled += case.label is not None
            classes.update(s.classes or {})
            del case
        g.attrs.update({
            STORE_MARK: json.dumps({"domain": "radiology", "format": STORE_FORMAT, "modalities": mods,
                                    "spacing_mm": [float(x) for x in target], "chunk": chunk,
                                    "cases": len(subjects), "labelled": labelled,
                                    "classes": {str(k): v for k, v in sorted((classes or rdata.LABELS).items())}}),
            "hfmi_fingerprint": json.dumps({**fp, "intensity_percentiles_0.5_50_99.5": intensity}),
            "hfmi_sources": json.dumps({"path": str(root), **_dataset_json(root)}),
            "history": f"{np.datetime64('now')}: hfmi data prepare radiology ({code_version()}) from {root}",
        })
        zarr.consolidate_metadata(str(tmp))
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return out


def _dataset_json(root: Path) -> dict[str, str]:
    import hashlib

    meta = root / "dataset.json"
    if not meta.is_file():
        return {}
    js = json.loads(meta.read_text(encoding="utf-8"))
    return {"description": str(js.get("description", "")), "licence": str(js.get("licence", "unknown")),
            "dataset_json_sha256": hashlib.sha256(meta.read_bytes()).hexdigest()}


# ------------------------------------------------------------------------------------------ read

def is_store(path: str | Path) -> bool:
    """True for a directory that looks like a Zarr store (``.zgroup`` or ``zarr.json`` at its root)."""
    p = Path(path)
    return p.is_dir() and ((p / ".zgroup").is_file() or (p / "zarr.json").is_file())


@dataclass
class StoreCase:
    """One case of a store: its attributes and its lazy arrays."""

    id: str
    attrs: dict[str, Any]
    group: Any

    @property
    def label(self) -> bool:  # what :func:`.data.split_subjects` asks of a subject
        return bool(self.attrs.get("labelled"))

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.attrs["affine"], dtype=np.float64)


class RadiologyStore:
    """A store written by :func:`prepare`, opened read-only and checked.

    Raises:
        DataError: not such a store (naming it), a pickle codec, a case name that is not plain.
    """

    def __init__(self, path: str | Path, *, checked: bool = False) -> None:
        import zarr

        self.path = Path(path)
        if not is_store(self.path):
            raise DataError(f"{self.path}: not a Zarr store")
        if not checked:  # a walk over every metadata file; skipped where this process checked it already
            check_zarr(self.path)
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
            mark = json.loads(self.group.attrs.get(STORE_MARK, "null") or "null")
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"{self.path}: unreadable store metadata ({e})") from e
        except Exception as e:  # zarr raises its own types for damaged metadata
            raise DataError(f"{self.path}: cannot open as a Zarr group ({type(e).__name__}: {e})") from e
        if not isinstance(mark, dict) or mark.get("domain") != "radiology":
            raise DataError(f"{self.path}: not a radiology store written by `hfmi data prepare radiology`")
        if mark.get("format") != STORE_FORMAT:
            raise DataError(f"{self.path}: store format {mark.get('format')!r}; this hfmi_kit reads format "
                            f"{STORE_FORMAT}: prepare it again")
        self.info = mark
        self.modalities = [str(m) for m in mark["modalities"]]
        self.spacing = [float(x) for x in mark["spacing_mm"]]
        if "cases" not in self.group:
            raise DataError(f"{self.path}: no cases group")
        names = sorted(self.group["cases"].group_keys())
        bad = [n for n in names if not _CASE_ID.match(n)]
        if bad:
            raise DataError(f"{self.path}: case name(s) {bad[:4]} are not plain names")
        self.ids = names

    def case(self, cid: str) -> StoreCase:
        if cid not in self.ids:
            raise DataError(f"{self.path}: no case {cid!r}")
        g = self.group["cases"][cid]
        return StoreCase(id=cid, attrs=dict(g.attrs), group=g)

    def cases(self) -> list[StoreCase]:
        return [self.case(c) for c in self.ids]

    def prepared(self, cid: str, modalities: Sequence[str] | None = None) -> rdata.Prepared:
        """Case ``cid`` whole (its ``modalities``, default all), as :func:`.data.prepare` gives it
        with ``keep_ref`` (its label on the input grid kept for scoring; the reference image is a
        zero-stride placeholder of the input's shape: its grid is all outputs need)."""
        c = self.case(cid)
        a = c.attrs
        mods = list(modalities or a["modalities"])
        missing = [m for m in mods if m not in a["modalities"]]
        if missing:
            raise DataError(f"{self.path}: case {cid} has no {missing} image(s); it has {a['modalities']}")
        chans = [list(a["modalities"]).index(m) for m in mods]
        try:
            image = np.asarray(c.group["image"].oindex[chans, :, :, :] if chans != list(range(len(a["modalities"])))
                               else c.group["image"][...], dtype=np.float32)
            label = np.asarray(c.group["label"][...]) if c.label else None
            lab_in = np.asarray(c.group["label_input"][...]) if c.label else None
        except Exception as e:
            raise DataError(f"{self.path}: case {cid}: a damaged chunk ({type(e).__name__}: {e})") from e
        if not np.all(np.isfinite(image)):
            raise DataError(f"{self.path}: case {cid}: non-finite voxels in the stored image")
        shape = tuple(a.get("input_shape", image.shape[1:]))
        ref = Volume(np.broadcast_to(np.float32(0), shape), np.asarray(a.get("input_affine", a["affine"])),
                     path=f"{self.path}/cases/{cid}", modality=self.modalities[0])
        label_ref = (Volume(lab_in, np.asarray(a["label_input_affine"]), path=f"{self.path}/cases/{cid}/label_input")
                     if lab_in is not None else None)
        return rdata.Prepared(id=cid, modalities=mods, image=image, affine=c.affine, label=label,
                              background=[a["background"][j] for j in chans], label_ref=label_ref, ref=ref)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class LazyCases(Sequence[rdata.Prepared]):
    """Cases of a store loaded one at a time when iterated (for scoring: memory holds one)."""

    def __init__(self, store: RadiologyStore, ids: Sequence[str], modalities: Sequence[str] | None = None) -> None:
        self.store, self.ids, self.modalities = store, list(ids), modalities

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> rdata.Prepared:  # type: ignore[override]
        return self.store.prepared(self.ids[i], self.modalities)

    def __iter__(self) -> Iterator[rdata.Prepared]:
        for cid in self.ids:
            yield self.store.prepared(cid, self.modalities)


class StoreCrops(Dataset):
    """Random ``crop``-cubes read from a store, a fixed function of (seed, index).

    ``task="pretrain"``: ``{"inputs": (1, c, c, c), "modality": ()}``, one modality of case
    ``i mod n`` (``modality`` indexes ``modalities``), centred anywhere in the head's box.
    ``task="segment"``: ``{"inputs": (M, c, c, c), "target": (c, c, c) uint8}``; a ``fg_fraction`` of
    the crops is centred on a stored voxel of a tumour class (a class drawn first, as nnU-Net
    does, so small classes are seen), the rest anywhere in the head. Random flips per axis. A
    crop reads only the chunks it touches; parts outside the volume take the background value.
    The store is opened in each worker process on first use.
    """

    def __init__(self, store: str | Path, ids: Sequence[str], *, crop: int = 32, task: str = "pretrain",
                 modalities: Sequence[str] | None = None, length: int = 100_000, seed: int = 0,
                 fg_fraction: float = 0.5) -> None:
        if task not in ("pretrain", "segment"):
            raise ValueError(f"task must be 'pretrain' or 'segment', got {task!r}")
        if not ids:
            raise DataError(f"{store}: no cases to crop from")
        self.path, self.ids, self.crop, self.task = Path(store), list(ids), int(crop), task
        self.length, self.seed, self.fg_fraction = length, seed, fg_fraction
        st = RadiologyStore(self.path)
        self.modalities = list(modalities or st.modalities)
        self.meta = [st.case(c).attrs for c in self.ids]
        missing = [m for m in self.modalities if m not in st.modalities]
        if missing:
            raise DataError(f"{self.path}: no {missing} image(s); the store holds {st.modalities}")
        if task == "segment":
            short = [c for c, a in zip(self.ids, self.meta) if set(self.modalities) - set(a["modalities"])]
            if short:
                raise DataError(f"{self.path}: case(s) {short[:4]} lack one of the image channels {self.modalities}")
        # segment crops: the image channels of each case, in the order asked for
        self.channels = [[list(a["modalities"]).index(m) if m in a["modalities"] else -1 for m in self.modalities]
                         for a in self.meta]
        if task == "segment":
            unlabelled = [c for c, a in zip(self.ids, self.meta) if not a.get("labelled")]
            if unlabelled:
                raise DataError(f"{self.path}: case(s) {unlabelled[:4]} have no label to fine-tune on")
        self._store: RadiologyStore | None = None
        self._loc: dict[int, dict[int, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None, "_loc": {}}

    def __len__(self) -> int:
        return self.length

    def _group(self, k: int) -> Any:
        if self._store is None:  # in a worker: the store was checked when the dataset was made
            self._store = RadiologyStore(self.path, checked=True)
        return self._store.group["cases"][self.ids[k]]

    def _centre(self, rng: np.random.Generator, k: int) -> np.ndarray:
        a = self.meta[k]
        if self.task == "segment" and a.get("classes_present") and rng.random() < self.fg_fraction:
            if k not in self._loc:
                loc = np.asarray(self._group(k)["locations"][...])
                self._loc[k] = {int(c): loc[loc[:, 0] == c, 1:] for c in a["classes_present"]}
            cls = a["classes_present"][rng.integers(len(a["classes_present"]))]
            rows = self._loc[k][int(cls)]
            return rows[rng.integers(len(rows))]
        return np.array([rng.integers(lo, hi) for lo, hi in a["head_bbox"]])

    def window(self, k: int, centre: np.ndarray) -> list[tuple[int, int]]:
        """The crop's [start, stop) per axis around ``centre``, kept inside the volume where it fits."""
        out = []
        for c, n in zip(centre, self.meta[k]["shape"]):
            s = int(np.clip(int(c) - self.crop // 2, 0, max(n - self.crop, 0))) if n >= self.crop else \
                -((self.crop - n) // 2)
            out.append((s, s + self.crop))
        return out

    def _read(self, arr: Any, win: list[tuple[int, int]], shape: Sequence[int], fill: Sequence[float] | float,
              lead: tuple[Any, ...] = ()) -> np.ndarray:
        src = tuple(slice(max(s, 0), min(e, n)) for (s, e), n in zip(win, shape))
        part = np.asarray(arr[(*lead, *src)])
        if part.shape[-3:] == (self.crop,) * 3:
            return part
        dst = tuple(slice(sl.start - s, sl.stop - s) for sl, (s, _) in zip(src, win))
        if part.ndim == 4:
            out = np.empty((part.shape[0], *(self.crop,) * 3), part.dtype)
            for m, f in enumerate(fill):  # type: ignore[arg-type]
                out[m] = f
            out[(slice(None), *dst)] = part
        else:
            out = np.full((self.crop,) * 3, fill, part.dtype)
            out[dst] = part
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i])
        k = i % len(self.ids)
        a = self.meta[k]
        g = self._group(k)
        win = self.window(k, self._centre(rng, k))
        shape = a["shape"]
        flips = [rng.random() < 0.5 for _ in range(3)]
        try:
            if self.task == "pretrain":
                have = [j for j, name in enumerate(a["modalities"]) if name in self.modalities]
                m = have[int(rng.integers(len(have)))]
                x = self._read(g["image"], win, shape, a["background"][m], lead=(m,))
                x = np.flip(x, [ax for ax in range(3) if flips[ax]]) if any(flips) else x
                return {"inputs": torch.from_numpy(np.ascontiguousarray(x))[None],
                        "modality": torch.tensor(self.modalities.index(a["modalities"][m]))}
            x = self._read(g["image"], win, shape, a["background"], lead=(slice(None),))
            if self.channels[k] != list(range(len(a["modalities"]))):
                x = x[self.channels[k]]
            y = self._read(g["label"], win, shape, 0)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{self.path}: case {self.ids[k]}: cannot read crop {win} "
                            f"({type(e).__name__}: {e})") from e
        axes = [ax for ax in range(3) if flips[ax]]
        if axes:
            x, y = np.flip(x, [ax + 1 for ax in axes]), np.flip(y, axes)
        return {"inputs": torch.from_numpy(np.ascontiguousarray(x)),
                "target": torch.from_numpy(np.ascontiguousarray(y))}  # uint8: the loss takes any integer type


def split(store: RadiologyStore) -> tuple[list[str], list[str]]:
    """(pool, test) case ids, the same rule as :func:`.data.split_subjects` (last 30 % by id)."""
    pool, test = rdata.split_subjects(store.cases())  # type: ignore[arg-type]
    return [c.id for c in pool], [c.id for c in test]


def inspect_store(store: str | Path) -> list[str]:
    """What a radiology store holds, one line each."""
    st = RadiologyStore(store)
    info = st.info
    fp = json.loads(st.group.attrs.get("hfmi_fingerprint", "{}"))
    src = json.loads(st.group.attrs.get("hfmi_sources", "{}"))
    shapes = np.array([st.case(c).attrs["shape"] for c in st.ids])
    lines = [f"{st.path} ({st.size_bytes() / 2**20:.1f} MiB on disk): a radiology store of {len(st.ids)} cases "
             f"({info['labelled']} labelled)",
             f"modalities: {', '.join(st.modalities)}",
             f"spacing: {' x '.join(f'{x:g}' for x in st.spacing)} mm (R, A, S); "
             f"data median {' x '.join(f'{x:g}' for x in fp.get('median_spacing', []))} mm",
             f"grid shapes: {shapes.min(0).tolist()} .. {shapes.max(0).tolist()} voxels (median "
             f"{np.median(shapes, 0).astype(int).tolist()}); chunks of {info['chunk']}",
             "classes: " + ", ".join(f"{k} {v}" for k, v in info.get("classes", {}).items()),
             f"source: {src.get('path', '?')}" + (f" ({src['description']})" if src.get("description") else "")]
    return lines
