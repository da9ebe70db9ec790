"""Radiology (Human Radiome): 3-D CT/MRI foundation model for few-label tumour segmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from hfmi_kit.domains.base import Domain
from hfmi_kit.domains.radiology import model as _model  # noqa: F401  (registers the model families)
from hfmi_kit.domains.radiology import resenc as _resenc  # noqa: F401  (the residual-encoder families)
from hfmi_kit.domains.radiology.data import Subject, discover, prepare, split_subjects
from hfmi_kit.domains.radiology.io import Volume, load_dicom_series, load_nifti, load_volume, save_nifti
from hfmi_kit.domains.radiology.synth import StudyConfig, generate_study
from hfmi_kit.domains.radiology.tasks import evaluate, finetune, predict, pretrain
from hfmi_kit.scorecard import DomainPlan
from hfmi_kit.train.budget import LabelBudget


class RadiologyDomain(Domain):
    """NIfTI files or DICOM series of CT/MR; task: tumour segmentation and localisation."""

    name: ClassVar[str] = "radiology"
    tasks_module: ClassVar[str] = "hfmi_kit.domains.radiology.tasks"
    tasks: ClassVar[tuple[str, ...]] = ("segment",)
    data_formats: ClassVar[str] = ("a folder of NIfTI files (<subject>_<modality>.nii.gz, labels <subject>_seg) "
                                   "and/or DICOM series, or a study with dataset.json")
    headline_metrics: ClassVar[tuple[str, ...]] = (
        "dice", "dice_std", "hd95_mm", "centroid_error_mm", "dice_core", "dice_scratch", "hd95_mm_scratch",
        "dice_unet_same", "dice_unet", "hd95_mm_unet", "labelled_cases", "test_cases")
    published_files: ClassVar[tuple[str, ...]] = ("cases.json", "predictions")
    primary_metric: ClassVar[str] = "dice"
    higher_is_better: ClassVar[bool] = True
    label_key: ClassVar[str] = "labelled_cases"
    metric_title: ClassVar[str] = "whole-tumour Dice [0-1]"
    label_title: ClassVar[str] = "labelled cases"
    baselines: ClassVar[tuple[str, ...]] = ("scratch", "unet_same", "unet")
    example_outputs: ClassVar[tuple[str, ...]] = ("predictions/", "cases.json")

    def example_data(self, out_dir: str | Path, *, seed: int = 0, small: bool = True,
                     years: int | None = None) -> Path:
        cfg = (StudyConfig(unlabelled=6, labelled=8, spacing_scale=1.4, seed=seed) if small
               else StudyConfig(seed=seed))
        return generate_study(Path(out_dir) / "radiology_study", cfg)

    def scorecard_plan(self) -> DomainPlan:
        return DomainPlan(
            data=_scorecard_data, budgets={"small": LabelBudget.counts([1, 3]),
                                           "full": LabelBudget.counts([1, 2, 4, 8, 16])},
            pretrain_kw={"small": {"steps": 6, "batch_size": 2, "spacing": 4.5}, "full": {"steps": 3000}},
            finetune_kw={"small": {"steps": 6, "batch_size": 2, "spacing": 4.5}, "full": {"steps": 600}},
            baselines=("scratch", "unet_same", "unet"),
            method_names={"unet": "unet_all_cases", "unet_same": "unet_same_cases"}, budget_independent=("unet",),
            note="`unet_same_cases`: the nnU-Net-style U-Net trained on the same labelled cases as the model (the "
                 "same-budget classical baseline); `unet_all_cases`: that U-Net on every labelled training case, "
                 "whatever the budget (an upper reference; trained once per seed).")


def _scorecard_data(d: Path, budget: str) -> dict[str, Any]:
    """The scorecard's data of this domain for ``budget``, made once under ``d``."""
    from hfmi_kit.domains.radiology import StudyConfig, generate_study

    p = d / "radiology_study"
    if not p.exists():
        cfg = StudyConfig(unlabelled=2, labelled=6, spacing_scale=1.6, seed=3) if budget == "small" else StudyConfig()
        generate_study(p, cfg)
    return {"data": p}


DOMAIN = RadiologyDomain()

__all__ = ["DOMAIN", "RadiologyDomain", "StudyConfig", "Subject", "Volume", "discover", "evaluate", "finetune",
           "generate_study", "load_dicom_series", "load_nifti", "load_volume", "predict", "prepare", "pretrain",
           "save_nifti", "split_subjects"]
