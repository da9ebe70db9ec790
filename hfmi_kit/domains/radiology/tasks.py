"""Radiology pretraining, few-label fine-tuning with baselines, evaluation and prediction, end to end."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch

from hfmi_kit import options as opt
from hfmi_kit.checkpoints import resolve as resolve_checkpoint
from hfmi_kit.config import atomic_write_json
from hfmi_kit.domains.base import Bundle, Scored, get_domain
from hfmi_kit.domains.radiology import data as rdata
from hfmi_kit.domains.radiology import metrics as M
from hfmi_kit.domains.radiology import store as rstore
from hfmi_kit.domains.radiology.geometry import to_input_grid
from hfmi_kit.domains.radiology.io import load_volume, save_nifti, write_dicom_seg
from hfmi_kit.domains.radiology.model import WINDOW_BLENDS, RadiologySegmenter, UNetBaseline, sliding_window_labels
from hfmi_kit.domains.radiology.resenc import ResEncSegmenter
from hfmi_kit.domains.radiology.store import inspect_store, prepare  # noqa: F401 (the domain's data commands)
from hfmi_kit.domains.radiology.synth import LABELS
from hfmi_kit.errors import ConfigError, DataError
from hfmi_kit.train import load_pretrained, recipe
from hfmi_kit.train.budget import LabelBudget
from hfmi_kit.train.infer import Predictor
from hfmi_kit.train.pretrained import ModelConfig
from hfmi_kit.train.provenance import recorded

LOGGER = logging.getLogger(__name__)
SEGMENT_NAMES = ("oedema", "tumour core")
ENGINE = recipe.EngineDefaults(warmup_cap=20)
#: backbone -> (pretraining family, segmentation family)
BACKBONES = {"transformer": ("radiology_mae", "radiology_segmenter"),
             "resenc": ("radiology_resenc_mae", "radiology_resenc_segmenter")}
Backbone = Annotated[str, opt.Opt("transformer: 3-D ViT masked autoencoder; resenc: residual-encoder U-Net with "
                                  "masked-image pretraining (nnU-Net ResEnc / nnssl)")]


def _families(backbone: str) -> tuple[str, str]:
    if backbone not in BACKBONES:
        raise ConfigError(f"--backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
    return BACKBONES[backbone]


def _backbone_of(model_type: str) -> str:
    """The backbone of a checkpoint's ``model_type`` (``radiology_resenc_mae.tiny`` -> resenc)."""
    family = model_type.partition(".")[0]
    return next((b for b, fams in BACKBONES.items() if family in fams), "transformer")


def _card(root: Path, subjects: Sequence[rdata.Subject] | Sequence[rstore.StoreCase], summary: str
          ) -> dict[str, Any]:
    meta = root / "dataset.json"
    if subjects and isinstance(subjects[0], rstore.StoreCase):
        mods: dict[str, int] = {}
        for c in subjects:
            for m in c.attrs["modalities"]:
                mods[m] = mods.get(m, 0) + 1
        described = {"subjects": len(subjects), "labelled": sum(1 for c in subjects if c.label), "modalities": mods}
        source = json.loads(rstore.RadiologyStore(root, checked=True).group.attrs.get("hfmi_sources", "{}"))
        described.update({k: v for k, v in source.items() if k in ("description", "licence")})
        described["store_of"] = source.get("path", "")
    else:
        described = rdata.describe(subjects)  # type: ignore[arg-type]
    entry: dict[str, Any] = {"file": root.name, "path": str(root), **described}
    if meta.is_file():
        js = json.loads(meta.read_text(encoding="utf-8"))
        entry.update({"description": js.get("description", ""), "source": js.get("source", ""),
                      "licence": js.get("licence", "unknown"),
                      "sha256": hashlib.sha256(meta.read_bytes()).hexdigest()})
    return {"summary": summary, "data": [entry], "licence": "Apache-2.0 (weights and code)",
            "intended_use": "research on few-label tumour segmentation; not a medical device",
            "limitations": "trained on synthetic lesions in warped template anatomy unless stated otherwise"}


@recorded("radiology", "pretrain")
def pretrain(*, data: opt.Data, out: opt.Out, config: opt.Size = "tiny", steps: opt.Steps = 6000,
             seed: opt.Seed = 0,
             resume: opt.Resume = False, batch_size: opt.BatchSize = 8, lr: opt.LearningRate = 1e-3,
             spacing: Annotated[float | None, opt.Opt("isotropic voxel spacing the volumes are resampled to, in "
                                                  "mm (None: 3 mm; a store's own spacing)", above=0)] = None,
             crop: Annotated[int, opt.Opt("edge of the cubic training crops, in voxels", low=1)] = 32,
             patch: Annotated[int, opt.Opt("edge of the cubic patches (tokens), in voxels", low=1)] = 4,
             mask_ratio: opt.MaskRatio = 0.75, precision: opt.Precision = "auto", device: opt.Device = "auto",
             progress: opt.Progress = True, checkpoint_every: opt.CheckpointEvery = 0,
             variables: opt.Variables = None, workers: opt.Workers = 0,
             backbone: Backbone = "transformer") -> Path:
    """3-D masked-autoencoder pretraining on every unlabelled volume of ``data`` (all modalities).
    The defaults are the recipe of the shipped ``radiology.tiny`` (6000 steps).

    ``data`` is a study folder (every volume resampled to ``spacing`` and held in memory) or a
    store of ``hfmi data prepare radiology`` (crops read from it as training goes; memory does
    not grow with the number of cases). Test subjects (see :func:`.data.split_subjects`) are
    left out so later scores stay honest; labels are never read. ``variables`` restricts the
    modalities. Returns ``out/model``.
    """
    mae_family, _ = _families(backbone)
    root, out = Path(data), Path(out)
    ds: Any
    if rstore.is_store(root):
        st = rstore.RadiologyStore(root)
        sp: float | list[float] = _store_spacing(st, spacing)
        test_ids = set(rstore.split(st)[1]) if st.info["labelled"] >= 3 else set()
        ids = [c for c in st.ids if c not in test_ids]
        mods = [m for m in st.modalities if variables is None or m in variables]
        if not mods:
            raise DataError(f"{root}: no images of modalities {list(variables or [])}; the store holds "
                            f"{st.modalities}")
        ds = rstore.StoreCrops(root, ids, crop=crop, task="pretrain", modalities=mods, seed=seed)
        n_vols, card_of = len(ids) * len(mods), [st.case(c) for c in ids]
        LOGGER.info("pretraining on crops of %d volumes (%s) of %d cases read from %s", n_vols, mods, len(ids), root)
    else:
        sp = 3.0 if spacing is None else float(spacing)
        subjects = rdata.discover(root)
        test_ids = set()
        if sum(1 for s in subjects if s.label) >= 3:
            test_ids = {s.id for s in rdata.split_subjects(subjects)[1]}
        use = [s for s in subjects if s.id not in test_ids]
        mods = sorted({m for s in use for m in s.images if variables is None or m in variables})
        if not mods:
            raise DataError(f"{root}: no images of modalities {list(variables or [])}")
        vols = []
        for s in use:
            for m in s.images:
                if m in mods:
                    p = rdata.prepare(s, [m], sp, with_label=False)
                    vols.append((p.image[0], mods.index(m), p.background[0]))
        LOGGER.info("pretraining on %d volumes (%s) of %d subjects", len(vols), mods, len(use))
        ds = rdata.PretrainCrops(vols, crop=crop, seed=seed)
        n_vols, card_of = len(vols), use  # type: ignore[assignment]
    mk = {"modalities": mods, "crop": crop, "patch": patch, "spacing": sp, "mask_ratio": mask_ratio}
    model = recipe.build(f"{mae_family}.{config}", mk, seed=seed)
    tc = recipe.engine(ENGINE, steps=steps, batch_size=batch_size, lr=lr, seed=seed, precision=precision,
                       device=device, progress=progress, checkpoint_every=checkpoint_every or max(steps // 2, 1),
                       num_workers=workers)
    mc = ModelConfig(domain="radiology", task="pretrain", model_type=f"{mae_family}.{config}", model_kwargs=mk,
                     geometry={"spacing_mm": sp, "crop": crop, "modalities": mods,
                               "excluded_test_subjects": sorted(test_ids), "volumes": n_vols},
                     card=_card(root, card_of, "3-D masked autoencoder pretrained on unlabelled CT/MR volumes "
                                           "(modality tokens, shared patch embedding)." if backbone == "transformer"
                                else "Residual-encoder U-Net pretrained by masked-image reconstruction (dense "
                                     "masking, MSE on the hidden cubes) on unlabelled CT/MR volumes."))
    res = recipe.fit(model, ds, tc, out_dir=out, config=mc, resume=resume)
    mc.training = {**dataclasses.asdict(tc), "seed": seed, "data": str(root)}
    path = recipe.finish(model, out, mc, {"train_loss": res.last_loss})
    LOGGER.info("pretrained model written to %s", path)
    return path


def _store_spacing(st: rstore.RadiologyStore, spacing: float | Sequence[float] | None) -> list[float]:
    """The store's spacing; a different ``spacing`` asked for is refused (the store is resampled once)."""
    if spacing is not None and not np.allclose(np.broadcast_to(np.asarray(spacing, float), (3,)), st.spacing,
                                               rtol=1e-4):
        raise ConfigError(f"{st.path}: the store is on a {' x '.join(f'{x:g}' for x in st.spacing)} mm grid, not "
                          f"{spacing} mm; leave --spacing out or prepare a store at that spacing "
                          "(`hfmi data prepare radiology SRC --spacing ...`)")
    return list(st.spacing)


def _check_classes(subjects: Sequence[rdata.Subject]) -> None:
    """The classes a study declares must be ones the segmenter predicts (:data:`.synth.LABELS`)."""
    for s in subjects:
        extra = sorted(set(s.classes or {}) - set(LABELS))
        if extra:
            names = ", ".join(f"{k} {v}" for k, v in LABELS.items())
            raise DataError(f"{s.classes_from}: 'labels' declares class(es) {extra} the segmenter does not predict; "
                            f"it predicts {names}")


def _check_dicom_outputs(cases: Sequence[rdata.Prepared]) -> None:
    """Read the DICOM series a prediction will be written for (as DICOM-SEG) before any training."""
    for c in cases:
        for series in c.dicom.values():
            load_volume(series)


class SegmentationPredictor(Predictor):
    """A segmenter (or the U-Net baseline) with its checkpoint's grid.

    :meth:`prepare` loads a subject's images onto the model grid (the checkpoint's modalities
    and voxel spacing; intensities normalised as in training); calling the predictor on the
    prepared case gives its label map on that grid: sliding windows of the model's crop with
    ``overlap``, combined as the checkpoint's ``processors.window_blend`` says (``gaussian``:
    nnU-Net's Gaussian-weighted average of the logits; ``argmax``: the most confident window per
    voxel, what checkpoints written before the choice existed were scored with); see
    :func:`.model.sliding_window_labels`.
    """

    def __init__(self, model: torch.nn.Module, config: dict[str, Any] | None = None, *, overlap: float = 0.5,
                 batch_size: int = 4, blend: str | None = None) -> None:
        super().__init__(model, model_fn=self._label_map, config=config)
        self.overlap, self.batch_size = overlap, batch_size
        self.blend = blend or str((self.config.get("processors") or {}).get("window_blend", "argmax"))

    def prepare(self, subject: rdata.Subject, *, with_label: bool = True) -> rdata.Prepared:
        """``subject`` on the model grid (its reference grids kept, to write predictions back)."""
        geom = self.config.get("geometry", {})
        if "modalities" not in geom or "spacing_mm" not in geom:
            raise ConfigError("this segmenter has no checkpoint geometry (modalities, spacing_mm) to prepare "
                              "subjects with")
        return rdata.prepare(subject, geom["modalities"], _spacing(geom["spacing_mm"]), with_label=with_label,
                             keep_ref=True)

    def _label_map(self, case: rdata.Prepared) -> np.ndarray:
        model: Any = self.model
        lab, _ = sliding_window_labels(model.logits, case.image, window=model.crop, background=case.background,
                                       overlap=self.overlap, batch_size=self.batch_size, device=self.device,
                                       blend=self.blend)
        return lab


def predictor(model: torch.nn.Module, config: dict[str, Any] | None = None) -> SegmentationPredictor:
    """The :class:`SegmentationPredictor` of a radiology segmenter (``config``: its checkpoint's)."""
    return SegmentationPredictor(model, config)


def predict_case(model: torch.nn.Module, case: rdata.Prepared, *, overlap: float = 0.5,
                 batch_size: int = 4, blend: str = "gaussian") -> np.ndarray:
    """Label map of one prepared case on its model grid (:class:`SegmentationPredictor`)."""
    return SegmentationPredictor(model, overlap=overlap, batch_size=batch_size, blend=blend)(case)


def score_cases(model: torch.nn.Module | SegmentationPredictor, cases: Sequence[rdata.Prepared], *,
                out_dir: Path | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Per-case metrics on the input grid (mean and std over cases); writes predictions when ``out_dir``.

    Each per-case row also localises the lesion: ``centroid_mm`` and ``bbox_mm`` (world RAS mm,
    largest connected component of the predicted tumour).
    """
    segment = model if isinstance(model, SegmentationPredictor) else SegmentationPredictor(model)
    rows = []
    for c in cases:
        if c.label_ref is None or c.ref is None:
            raise DataError(f"subject {c.id}: no label to score against")
        lab = segment(c)
        pred = to_input_grid(lab, c.affine, c.label_ref)
        rows.append({"id": c.id, **M.case_metrics(pred, c.label_ref.data, c.label_ref.affine),
                     **M.localise(pred, c.label_ref.affine)})
        if out_dir is not None:
            write_prediction(lab, c, out_dir)
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    summary: dict[str, float] = {}
    for k in keys:
        v = np.array([r[k] for r in rows], dtype=np.float64)
        summary[k] = float(v.mean())
        summary[f"{k}_std"] = float(v.std())
    return summary, rows


def write_prediction(lab: np.ndarray, case: rdata.Prepared, out_dir: Path) -> list[Path]:
    """The label map as NIfTI on the reference image's exact grid, and as DICOM-SEG per DICOM input."""
    assert case.ref is not None
    written = []
    pred = to_input_grid(lab, case.affine, case.ref)
    written.append(save_nifti(out_dir / f"{case.id}_pred.nii.gz", pred.astype(np.uint8), case.ref.affine,
                              description="hfmi tumour 1=oedema 2=core"))
    for mod, series in case.dicom.items():
        vol = load_volume(series)
        on_dcm = to_input_grid(lab, case.affine, vol)
        written.append(write_dicom_seg(on_dcm, vol.source_files, out_dir / f"{case.id}_{mod}_seg.dcm",
                                       segment_names=SEGMENT_NAMES))
    return written


@recorded("radiology", "finetune")
def finetune(*, ckpt: opt.Parent, data: opt.Data, out: opt.Out,
             task: Annotated[str, opt.Opt("segment: tumour sub-regions voxel by voxel")] = "segment",
             labels: opt.Labels = None, label_fraction: opt.LabelFraction = 1.0, steps: opt.Steps = 300,
             seed: opt.Seed = 0,
             mode: opt.Mode = "full", config: opt.ParentSize = None, batch_size: opt.BatchSize = 4,
             lr: opt.FinetuneRate = None,
             layer_decay: opt.LayerDecay = None, baselines: opt.Baselines = False,
             baseline_steps: Annotated[int | None, opt.Opt("steps of the U-Net baseline (None: --steps)",
                                                           low=1)] = None,
             spacing: Annotated[float | None, opt.Opt("voxel spacing in mm (None: the pretrained model's)",
                                                  above=0)] = None,
             precision: opt.Precision = "auto", device: opt.Device = "auto",
             progress: opt.Progress = True, workers: opt.Workers = 0,
             backbone: Annotated[str | None, opt.Opt("transformer or resenc (None: the pretrained model's; "
                                                     "from scratch: transformer)")] = None,
             window_blend: Annotated[str, opt.Opt("how overlapping windows combine at inference: gaussian "
                                                  "(nnU-Net's Gaussian-weighted average of the logits) or argmax "
                                                  "(the most confident window per voxel)",
                                                  choices=WINDOW_BLENDS)] = "gaussian") -> dict[str, float]:
    """Fine-tune tumour segmentation/localisation on ``labels`` cases (default all; or a fraction).

    ``ckpt=None`` trains the same architecture from scratch. With ``baselines`` (True, or a
    subset of ``("scratch", "unet_same", "unet")``) the same split also trains the model from
    scratch on the same cases, the nnU-Net-style U-Net on the same cases (the same-budget
    classical baseline) and that U-Net on every labelled training case (an upper reference),
    adding ``*_scratch``, ``*_unet_same`` and ``*_unet`` metrics. Test cases are fixed by
    :func:`.data.split_subjects`. Every model trains with AdamW at peak LR 2e-3 (warm-up +
    cosine) on the same crops; a pretrained backbone adds layer-wise LR decay 0.8. Writes
    ``out/model``, ``out/metrics.json``,
    ``out/cases.json`` and ``out/predictions/`` (NIfTI on each input's grid, DICOM-SEG for
    DICOM inputs). Every model and baseline is scored with the same ``window_blend``, which the
    checkpoint keeps for ``evaluate`` and ``predict``.
    """
    if task not in ("segment",):
        raise ConfigError(f"unknown radiology task {task!r}; expected 'segment'")
    ckpt = resolve_checkpoint(ckpt)  # a shipped checkpoint's name (radiology.tiny) -> its folder
    label_budget = LabelBudget.from_options(labels, label_fraction, pool="labelled training cases")
    root, out = Path(data), Path(out)
    st = rstore.RadiologyStore(root) if rstore.is_store(root) else None
    subjects: Any
    if st is not None:  # cases stay in the store: crops are read as training goes, test cases one at a time
        subjects = st.cases()
        _check_store_classes(st)
        pool_ids, test_ids = rstore.split(st)
        pool, test = [st.case(c) for c in pool_ids], [st.case(c) for c in test_ids]
    else:
        subjects = rdata.discover(root)
        _check_classes(subjects)
        pool, test = rdata.split_subjects(subjects)
    chosen = label_budget.pick(pool, seed)
    if ckpt is not None:
        pcfg = recipe.parent_config(ckpt, "radiology")
        pk = pcfg["model_kwargs"]
        parent_backbone = _backbone_of(str(pcfg.get("model_type", "")))
        if backbone is not None and backbone != parent_backbone:
            raise ConfigError(f"{ckpt} is a {parent_backbone} model; --backbone {backbone} cannot fine-tune it "
                              "(leave --backbone out, or pretrain that backbone)")
        backbone = parent_backbone
        size = config or recipe.size_of(pcfg)
        have = st.modalities if st is not None else rdata.modality_order(chosen + test)
        mods = [m for m in have if m in pk["modalities"]]
        if not mods:
            raise DataError(f"{root}: none of the pretrained modalities {pk['modalities']} is in every subject")
        # keep the pretrained modality ids: the segmenter's modality table is the pretrainer's
        all_mods = list(pk["modalities"])
        crop, patch = int(pk["crop"]), int(pk["patch"])
        sp: float | list[float] = _spacing(spacing or pk["spacing"]) if st is None else _store_spacing(st, spacing)
        if st is not None and not np.allclose(np.broadcast_to(np.asarray(pk["spacing"], float), (3,)), sp, rtol=1e-3):
            LOGGER.warning("%s was pretrained on a %s mm grid; the store is on %s mm", ckpt, pk["spacing"], sp)
    else:
        size = config or "tiny"
        mods = list(st.modalities) if st is not None else rdata.modality_order(chosen + test)
        all_mods = list(mods)
        crop, patch = 32, 4
        sp = _spacing(spacing or 3.0) if st is None else _store_spacing(st, spacing)
    if not mods:
        raise DataError(f"{root}: no modality is present in every subject")
    train_cases: Any
    if st is not None:
        train_cases = _StoreCases(root, [c.id for c in chosen], mods)
        test_cases: Any = rstore.LazyCases(st, [c.id for c in test], mods)
    else:
        LOGGER.info("preparing %d training and %d test cases (%s)", len(chosen), len(test), mods)
        train_cases = [rdata.prepare(s, mods, sp) for s in chosen]
        test_cases = [rdata.prepare(s, mods, sp, keep_ref=True) for s in test]
        _check_dicom_outputs(test_cases)  # read now, not after training: a bad series must not cost a run
    mk = {"modalities": all_mods, "input_modalities": mods, "crop": crop, "patch": patch, "spacing": sp,
          "classes": len(LABELS)}
    summary = (f"3-D tumour segmenter ({backbone or 'transformer'} backbone) fine-tuned ({mode}) from "
               f"{ckpt or 'scratch'} on {len(chosen)} labelled "
               f"case(s), modalities {mods}.")
    seg_family = _families(backbone or "transformer")[1]
    model, mc, metrics, rows = _fit_and_score("segmenter", ckpt, size, mk, train_cases, test_cases, out, root,
                                              subjects, summary=summary, steps=steps, seed=seed,
                                              batch_size=batch_size, lr=lr, layer_decay=layer_decay, mode=mode,
                                              precision=precision, device=device, progress=progress, save=True,
                                              workers=workers, family=seg_family, blend=window_blend)
    all_rows = {"model": rows}
    wanted = recipe.requested_baselines(baselines, ("scratch", "unet_same", "unet"))
    if ckpt is None:
        wanted = [b for b in wanted if b != "scratch"]  # the model itself is from scratch
    bsteps = baseline_steps or steps
    done: dict[str, dict[str, float]] = {}

    def baseline(name: str) -> dict[str, float]:
        cases = train_cases
        every = len(chosen) == len(pool)  # the budget is the whole pool: both U-Nets are one
        twin = {"unet": "unet_same", "unet_same": "unet"}.get(name)
        if every and twin in done:
            all_rows[name] = all_rows[twin]
            return done[twin]
        if name == "unet" and not every:  # the reference trains on every labelled training case
            cases = (_StoreCases(root, [c.id for c in pool], mods) if st is not None else
                     [rdata.prepare(s, mods, sp) for s in pool])
        *_, m_b, r_b = _fit_and_score(name, None, size, mk, cases, test_cases, out, root, subjects, summary="",
                                      steps=bsteps, seed=seed, batch_size=batch_size, lr=None, layer_decay=None,
                                      mode="full", precision=precision, device=device, progress=progress,
                                      save=False, unet=name in ("unet", "unet_same"), workers=workers,
                                      family=seg_family, blend=window_blend)  # scratch: the model's own architecture
        all_rows[name] = r_b
        done[name] = m_b
        return m_b

    metrics.update(recipe.run_baselines(wanted, {b: functools.partial(baseline, b) for b in wanted}))
    if "unet" in wanted:
        metrics["unet_cases"] = float(len(pool))
    if "unet_same" in wanted:
        metrics["unet_same_cases"] = float(len(chosen))
    metrics.update({"labelled_cases": float(len(chosen)), "test_cases": float(len(test)),
                    "pool_cases": float(len(pool))})
    atomic_write_json(out / "cases.json", {"train": [c.id for c in chosen], "test": [c.id for c in test],
                                           "per_case": all_rows})
    recipe.finish(model, out, mc, metrics)
    return metrics


@dataclasses.dataclass
class _StoreCases:
    """Training cases left in a store (their crops are read as training goes)."""

    store: Path
    ids: list[str]
    modalities: list[str]


def _spacing(value: float | Sequence[float]) -> float | list[float]:
    """A spacing as the model config keeps it: one number (isotropic) or three (R, A, S)."""
    if isinstance(value, int | float):
        return float(value)
    return [float(x) for x in value]


def _check_store_classes(st: rstore.RadiologyStore) -> None:
    extra = sorted(set(int(k) for k in st.info.get("classes", {})) - set(LABELS))
    if extra:
        names = ", ".join(f"{k} {v}" for k, v in LABELS.items())
        raise DataError(f"{st.path}: the store declares class(es) {extra} the segmenter does not predict; "
                        f"it predicts {names}")


def _fit_and_score(name: str, ckpt: str | Path | None, size: str, mk: dict[str, Any],
                   train_cases: Sequence[rdata.Prepared] | _StoreCases, test_cases: Sequence[rdata.Prepared],
                   out: Path, root: Path, subjects: Sequence[Any], *, summary: str, steps: int, seed: int,
                   batch_size: int, lr: float | None, layer_decay: float | None, mode: str, precision: str,
                   device: str, progress: bool, save: bool, unet: bool = False, workers: int = 0,
                   family: str = "radiology_segmenter", blend: str = "gaussian"
                   ) -> tuple[torch.nn.Module, ModelConfig, dict[str, float], list]:
    """Train one segmenter (the model of ``family``, or a baseline) on ``train_cases`` and score it
    on ``test_cases`` (writing the predictions when ``save``)."""
    family = "radiology_unet" if unet else family
    kw = dict(mk)
    if ckpt is None:  # from scratch: the modality table is just the inputs
        kw["modalities"] = list(mk["input_modalities"])
    model = recipe.build(f"{family}.{size}", kw, seed=seed, ckpt=ckpt)
    mc = ModelConfig(domain="radiology", task="segment", model_type=f"{family}.{size}", model_kwargs=kw,
                     geometry={"spacing_mm": mk["spacing"], "crop": mk["crop"], "modalities": mk["input_modalities"],
                               "labels": {str(k): v for k, v in LABELS.items()}},
                     processors={"window_blend": blend},
                     card=_card(root, subjects, summary or f"radiology {name} baseline"))
    tc = recipe.engine(ENGINE, steps=steps, pretrained=ckpt is not None, mode=mode, layer_decay=layer_decay,
                       batch_size=batch_size, lr=2e-3 if lr is None else lr, seed=seed, precision=precision,
                       device=device, progress=progress, weight_decay=0.01, num_workers=workers)
    ds: Any
    if isinstance(train_cases, _StoreCases):
        ds = rstore.StoreCrops(train_cases.store, train_cases.ids, crop=mk["crop"], task="segment",
                               modalities=train_cases.modalities, seed=seed)
        ids = list(train_cases.ids)
    else:
        ds = rdata.SegCrops(train_cases, crop=mk["crop"], seed=seed)
        ids = [c.id for c in train_cases]
    recipe.fit(model, ds, tc, out_dir=out / f"train_{name}", config=mc)
    mc.training = {**dataclasses.asdict(tc), "cases": ids,
                   "from": str(ckpt) if ckpt else "scratch"}
    metrics, rows = score_cases(predictor(model, mc.to_dict()), test_cases,
                                out_dir=out / "predictions" if save else None)
    return model, mc, metrics, rows


def _load_segmenter(ckpt: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    cfg = recipe.parent_config(ckpt, "radiology", task="segment", what="fine-tuned radiology segmenter")
    model = load_pretrained(ckpt)
    if not isinstance(model, RadiologySegmenter | UNetBaseline | ResEncSegmenter):
        raise ConfigError(f"{ckpt}: {cfg.get('model_type')} cannot segment")
    model.eval()
    return model, cfg


def load(data: str | Path, *, ckpt: str | Path, config: dict[str, Any]) -> Bundle:
    """The labelled subjects of ``data`` (a study folder or a prepared store) the checkpoint was
    not trained on: when ``data`` is the study it was fine-tuned on, its test split; on another
    study every labelled subject. Cases of a store are read one at a time as they are scored."""
    root = Path(data)
    st = rstore.RadiologyStore(root) if rstore.is_store(root) else None
    subjects: Any = st.cases() if st is not None else rdata.discover(root)
    labelled = [s for s in subjects if s.label]
    if not labelled:
        raise DataError(f"{root}: no labelled subjects to evaluate on")
    trained_on = set(config.get("training", {}).get("cases", []))
    cases = [s for s in labelled if s.id not in trained_on]
    if cases and st is not None:
        _store_spacing(st, config["geometry"]["spacing_mm"])
        cases = rstore.LazyCases(st, [c.id for c in cases], config["geometry"]["modalities"])
    return Bundle(root, cases, len(cases), unit="labelled subject", meta={"test_cases": len(cases)})


def score(pred: SegmentationPredictor, bundle: Bundle, *, out: Path | None = None,
          window_blend: str | None = None) -> Scored:
    """Dice, HD95 and the lesion's localisation per case on its input grid (mean and std over
    cases); with ``out``, each case's prediction is written under ``out/predictions`` as it is
    made (NIfTI, and DICOM-SEG for a DICOM input). The outputs are the per-case rows.
    ``window_blend`` overrides the checkpoint's (see :class:`SegmentationPredictor`)."""
    if not isinstance(pred.model, RadiologySegmenter | UNetBaseline | ResEncSegmenter):
        raise ConfigError(f"{pred.source}: {pred.config.get('model_type')} cannot segment")
    if window_blend:
        pred.blend = window_blend
    cases = bundle.items
    if not isinstance(cases, rstore.LazyCases):
        cases = [pred.prepare(s) for s in cases]
        _check_dicom_outputs(cases)
    metrics, rows = score_cases(pred, cases, out_dir=None if out is None else out / "predictions")
    return Scored(metrics, outputs=rows)


def write_outputs(scored: Scored, out: Path) -> list[Path]:
    """``cases.json``: the test case ids and the per-case metrics."""
    rows = scored.outputs
    atomic_write_json(out / "cases.json", {"test": [r["id"] for r in rows], "per_case": rows})
    return [out / "cases.json"]


@opt.typed
def evaluate(*, ckpt: opt.Checkpoint, data: opt.Data, out: opt.Out,
             window_blend: Annotated[str | None, opt.Opt("how overlapping windows combine: gaussian or argmax "
                                                         "(None: the checkpoint's)", choices=WINDOW_BLENDS)] = None
             ) -> dict[str, float]:
    """Score a fine-tuned segmenter on the labelled test subjects of ``data``; writes predictions too.

    When ``data`` is the study it was trained on, the test split is the same as in fine-tuning;
    on another study every labelled subject is scored. ``window_blend`` re-scores with the other
    way of combining windows than the checkpoint's.
    """
    return recipe.evaluate(get_domain("radiology"), ckpt=ckpt, data=data, out=out,
                           score_options={"window_blend": window_blend})


def predict(*, ckpt: str | Path, images: dict[str, str | Path], out: str | Path) -> list[Path]:
    """Segment one subject (modality -> NIfTI file or DICOM folder); write NIfTI (+ DICOM-SEG) into ``out``."""
    pred = predictor(*_load_segmenter(ckpt))
    mods = pred.config["geometry"]["modalities"]
    dicom = {m: str(p) for m, p in images.items() if Path(p).is_dir()}
    sub = rdata.Subject(id=Path(next(iter(images.values()))).name.split("_")[0].split(".")[0],
                        images={m: str(p) for m, p in images.items()}, dicom=dicom)
    case = pred.prepare(sub, with_label=False)
    case.dicom = {m: p for m, p in dicom.items() if m in mods}
    return write_prediction(pred(case), case, Path(out))
