"""A study set built from real anatomy: the MNI152 2009 template that nilearn ships.

Each subject is the template's T1 and grey/white-matter maps warped by a random affine and a
smooth elastic field, scanned on its own oblique, anisotropic acquisition grid. Three
modalities come from the tissue classes: the real T1 contrast, a T2-like contrast (CSF bright,
white matter dark) and a CT-like one in Hounsfield units (with a skull). A tumour (a necrotic /
enhancing core inside oedema, irregular ellipsoids at a random site in the brain) is inserted
with its exact label map; its contrast differs per modality. MR volumes get a smooth bias field
and Rician noise, CT Gaussian noise. The set is written as NIfTI (one folder per subject) and
one study's CT additionally as a DICOM series, so the real readers are exercised.

Layout::

    DIR/dataset.json                  labels, modalities, subjects, provenance
    DIR/sub-000/sub-000_T1w.nii.gz    (and _T2w, _ct; _seg for labelled subjects)
    DIR/sub-007/dicom_ct/IM00000.dcm  one study's CT as a DICOM series
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from hfmi_kit.config import atomic_write_json
from hfmi_kit.domains.radiology.io import Patient, Volume, save_nifti, write_dicom_series

LABELS = {0: "background", 1: "oedema", 2: "tumour core"}
MODALITIES = ("T1w", "T2w", "ct")


@dataclass(frozen=True)
class StudyConfig:
    """Size and variability of a generated study set."""

    unlabelled: int = 24  # subjects without labels (pretraining)
    labelled: int = 28  # subjects with a tumour label map (fine-tuning pool and test set)
    spacing_scale: float = 1.0  # multiplies every acquisition spacing (>1: smaller, faster volumes)
    tumour_fraction_unlabelled: float = 0.5  # share of unlabelled subjects that carry a tumour
    dicom_subject: int | None = -1  # labelled subject (python index) whose CT is also DICOM; -1: the last
    # (a test case, so fine-tuning writes a DICOM-SEG for it); None: no DICOM
    seed: int = 0


@dataclass
class _Template:
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    skull: np.ndarray
    scalp: np.ndarray
    affine: np.ndarray


def load_template() -> _Template:
    """The MNI152 2009 template (T1, GM, WM probability, brain mask) from nilearn, offline, at 2 mm.

    The template is skull-stripped; a skull (6 mm) and scalp (4 mm) shell are added around the
    brain mask for the CT-like contrast.
    """
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    bm = datasets.load_mni152_brain_mask(resolution=1)

    def down(img: Any) -> np.ndarray:  # 2x2x2 block mean of the 1 mm maps: 2 mm voxels
        a = np.asarray(img.dataobj, dtype=np.float32)
        n = [s - s % 2 for s in a.shape]
        a = a[: n[0], : n[1], : n[2]]
        return a.reshape(n[0] // 2, 2, n[1] // 2, 2, n[2] // 2, 2).mean(axis=(1, 3, 5))

    half = np.array([[2.0, 0, 0, 0.5], [0, 2.0, 0, 0.5], [0, 0, 2.0, 0.5], [0, 0, 0, 1]])
    affine = np.asarray(t1.affine, dtype=np.float64) @ half
    brain = down(bm) > 0.5
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(brain, iterations=2))
    d_out = ndimage.distance_transform_edt(~brain) * 2.0  # mm outside the brain
    skull = (d_out > 0) & (d_out <= 7.0)
    scalp = (d_out > 7.0) & (d_out <= 11.0)
    return _Template(t1=down(t1), gm=down(gm), wm=down(wm), brain=brain.astype(np.float32),
                     skull=skull.astype(np.float32), scalp=scalp.astype(np.float32), affine=affine)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ang = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def acquisition_grid(rng: np.random.Generator, scale: float, *, centre: np.ndarray,
                     fov: tuple[float, float, float] = (176.0, 212.0, 176.0)) -> tuple[np.ndarray, tuple[int, ...]]:
    """A random oblique, anisotropic scanner grid (affine, shape) covering ``fov`` mm around ``centre``."""
    choices = [(2.0, 2.0, 3.5), (2.5, 2.5, 2.5), (1.8, 1.8, 4.0), (2.2, 2.2, 3.0), (2.5, 3.5, 2.5)]
    sp = np.array(choices[int(rng.integers(len(choices)))]) * scale
    R = _rotation(rng, 12.0)
    perm = rng.permutation(3) if rng.random() < 0.3 else np.arange(3)  # sometimes a sagittal/coronal stack
    flips = np.where(rng.random(3) < 0.3, -1.0, 1.0)
    D = R[:, perm] * flips
    shape = tuple(int(np.ceil(f / s)) for f, s in zip(np.array(fov)[perm], sp))
    A = np.eye(4)
    A[:3, :3] = D * sp
    A[:3, 3] = centre - A[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return A, shape


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int, amp: float) -> np.ndarray:
    f = rng.normal(0.0, amp, (coarse, coarse, coarse))
    return ndimage.zoom(f, [s / coarse for s in shape], order=1)[: shape[0], : shape[1], : shape[2]]


def _ellipsoid(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rotation and relative semi-axes of an irregular lesion."""
    return _rotation(rng, 90.0), rng.uniform(0.75, 1.25, 3)


@dataclass
class _Lesion:
    centre: np.ndarray  # template world mm
    r_core: float
    r_oedema: float
    rot: np.ndarray
    axes: np.ndarray
    wobble: np.ndarray  # (3,) direction-dependent radius modulation


def _draw_lesion(rng: np.random.Generator, tpl: _Template) -> _Lesion:
    inner = ndimage.distance_transform_edt(tpl.brain > 0) * 2.0
    r_core = float(rng.uniform(5.0, 11.0))
    r_oed = r_core * float(rng.uniform(1.5, 2.1))
    cand = np.argwhere(inner > r_core + 6.0)
    ijk = cand[int(rng.integers(len(cand)))]
    centre = tpl.affine[:3, :3] @ ijk + tpl.affine[:3, 3]
    rot, axes = _ellipsoid(rng)
    return _Lesion(centre, r_core, r_oed, rot, axes, rng.normal(0, 0.15, 3))


def _lesion_labels(les: _Lesion, pts: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Label (0/1/2) of template-space points ``pts`` (N, 3)."""
    q = (pts - les.centre) @ les.rot / les.axes
    r = np.linalg.norm(q, axis=1)
    u = q / np.maximum(r, 1e-6)[:, None]
    rr = r / (1.0 + u @ les.wobble)
    lab = np.zeros(len(pts), dtype=np.uint8)
    lab[(rr < les.r_oedema) & (brain > 0.5)] = 1
    lab[rr < les.r_core] = 2
    return lab


def render_subject(tpl: _Template, rng: np.random.Generator, grid: tuple[np.ndarray, tuple[int, ...]],
                   warp: dict[str, Any], lesion: _Lesion | None) -> dict[str, np.ndarray]:
    """Tissue maps and the lesion label of one subject on an acquisition ``grid``."""
    A, shape = grid
    ii = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    world = ii @ A[:3, :3].T + A[:3, 3]  # subject world mm
    # subject world -> template world: inverse of the subject's affine deformation, then elastic
    pts = (world - warp["shift"]) @ np.linalg.inv(warp["lin"]).T
    tvox = (pts - tpl.affine[:3, 3]) @ np.linalg.inv(tpl.affine[:3, :3]).T
    disp = np.stack([ndimage.map_coordinates(warp["elastic"][c], tvox.T / warp["elastic_step"], order=1,
                                             mode="nearest") for c in range(3)], axis=1)
    tvox = tvox + disp / 2.0  # displacement in mm, template voxels are 2 mm
    maps = {}
    for name in ("t1", "gm", "wm", "brain", "skull", "scalp"):
        maps[name] = ndimage.map_coordinates(getattr(tpl, name), tvox.T, order=1, mode="constant",
                                             cval=0.0).reshape(shape)
    pts_t = tvox @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
    maps["label"] = (_lesion_labels(lesion, pts_t, maps["brain"].ravel()).reshape(shape) if lesion is not None
                     else np.zeros(shape, np.uint8))
    return maps


def contrasts(maps: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """T1w, T2w (arbitrary units) and CT (HU) images from tissue maps, lesion, bias and noise."""
    brain, gm, wm = maps["brain"], maps["gm"], maps["wm"]
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    skull, scalp = maps["skull"], maps["scalp"]
    lab = maps["label"]
    core, oed = (lab == 2).astype(np.float32), (lab == 1).astype(np.float32)
    t1 = maps["t1"] * brain + 0.08 * skull + 0.65 * scalp
    t1 = t1 * (1 - core * 0.45 - oed * 0.18)
    t2 = (1.0 * csf + 0.55 * gm + 0.32 * wm) + 0.05 * skull + 0.45 * scalp
    t2 = t2 * (1 - core - oed) + core * 0.72 + oed * 0.88
    head = np.clip(brain + skull + scalp, 0, 1)
    ct = -1000.0 * (1 - head) + head * (8.0 * csf + 40.0 * gm + 27.0 * wm + 1100.0 * skull + 30.0 * scalp)
    ct = ct * (1 - core - oed) + core * 62.0 + oed * 16.0
    out = {}
    shape = t1.shape
    for name, img in (("T1w", t1), ("T2w", t2)):
        bias = np.exp(_smooth_field(rng, shape, 3, 0.12))
        sigma = float(rng.uniform(0.015, 0.04))
        re = img * bias + rng.normal(0, sigma, shape)
        im = rng.normal(0, sigma, shape)
        out[name] = np.sqrt(re**2 + im**2).astype(np.float32)  # Rician magnitude
    out["ct"] = (ct + rng.normal(0, float(rng.uniform(4.0, 9.0)), shape)).astype(np.float32)
    return out


def generate_study(out_dir: str | Path, config: StudyConfig | None = None, *, progress: bool = False) -> Path:
    """Write a study set (see the module docstring); returns ``out_dir``."""
    cfg = config or StudyConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tpl = load_template()
    centre = tpl.affine[:3, :3] @ (np.array(tpl.t1.shape) / 2.0) + tpl.affine[:3, 3] + np.array([0.0, -18.0, 10.0])
    subjects: list[dict[str, Any]] = []
    n_total = cfg.unlabelled + cfg.labelled
    for s in range(n_total):
        labelled = s >= cfg.unlabelled
        sid = f"sub-{s:03d}"
        srng = np.random.default_rng([cfg.seed, s])
        lin = _rotation(srng, 8.0) * srng.uniform(0.92, 1.08, 3)
        step = 8.0
        coarse = tuple(int(np.ceil(n * 2.0 / step)) + 1 for n in tpl.t1.shape)
        elastic = np.stack([ndimage.gaussian_filter(srng.normal(0, 10.0, coarse), 1.0) for _ in range(3)])
        warp = {"lin": lin, "shift": srng.normal(0, 4.0, 3), "elastic": elastic, "elastic_step": step / 2.0}
        has_tumour = labelled or srng.random() < cfg.tumour_fraction_unlabelled
        lesion = _draw_lesion(srng, tpl) if has_tumour else None
        subj_centre = centre + warp["shift"]
        mr_grid = acquisition_grid(srng, cfg.spacing_scale, centre=subj_centre)
        ct_grid = acquisition_grid(srng, cfg.spacing_scale, centre=subj_centre)
        maps_mr = render_subject(tpl, srng, mr_grid, warp, lesion)
        maps_ct = render_subject(tpl, srng, ct_grid, warp, lesion)
        img_mr = contrasts(maps_mr, srng)
        img_ct = contrasts(maps_ct, srng)
        d = out / sid
        files = {"T1w": f"{sid}/{sid}_T1w.nii.gz", "T2w": f"{sid}/{sid}_T2w.nii.gz", "ct": f"{sid}/{sid}_ct.nii.gz"}
        save_nifti(out / files["T1w"], img_mr["T1w"], mr_grid[0], description="hfmi synthetic T1w")
        save_nifti(out / files["T2w"], img_mr["T2w"], mr_grid[0], description="hfmi synthetic T2w")
        save_nifti(out / files["ct"], img_ct["ct"], ct_grid[0], description="hfmi synthetic CT (HU)")
        entry: dict[str, Any] = {"id": sid, "images": files, "labelled": labelled}
        if labelled:
            entry["label"] = f"{sid}/{sid}_seg.nii.gz"
            save_nifti(out / entry["label"], maps_mr["label"], mr_grid[0], dtype=np.uint8,
                       description="hfmi tumour label 1=oedema 2=core")
            entry["tumour_voxels"] = int((maps_mr["label"] > 0).sum())
            if cfg.dicom_subject is not None and s - cfg.unlabelled == cfg.dicom_subject % cfg.labelled:
                write_dicom_series(Volume(img_ct["ct"], ct_grid[0]), d / "dicom_ct", modality="CT",
                                   patient=Patient(name=f"Synthetic^{sid}", patient_id=sid),
                                   uid_entropy=f"hfmi_kit generated study, seed {cfg.seed}, {sid}")
                entry["dicom"] = {"ct": f"{sid}/dicom_ct"}
        if lesion is not None:
            entry["lesion"] = {"centre_template_mm": [round(float(x), 2) for x in lesion.centre],
                               "r_core_mm": round(lesion.r_core, 2), "r_oedema_mm": round(lesion.r_oedema, 2)}
        subjects.append(entry)
        if progress:
            print(f"  {sid} ({'labelled' if labelled else 'unlabelled'})", flush=True)
    meta = {
        "name": "hfmi_kit synthetic brain tumour study set",
        "description": "Subjects warped from the MNI152 2009c template (nilearn), three contrasts, "
                       "inserted tumours with exact labels.",
        "labels": {str(k): v for k, v in LABELS.items()},
        "modalities": list(MODALITIES),
        "source": "MNI ICBM152 non-linear symmetric 2009 template (c) 1993-2009 Louis Collins, McConnell "
                  "Brain Imaging Centre; shipped with nilearn",
        "licence": "template: MNI/ICBM licence (free use with acknowledgement); generated set: CC0-1.0",
        "config": asdict(cfg),
        "subjects": subjects,
    }
    atomic_write_json(out / "dataset.json", meta)
    return out
