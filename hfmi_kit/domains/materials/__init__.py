"""Photovoltaic materials (SOL-AI): a composition foundation model for band gaps and candidates."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

from hfmi_kit.domains.base import Domain
from hfmi_kit.domains.materials import model as _model  # noqa: F401  (registers the model families)
from hfmi_kit.domains.materials.chem import charge_balanced, magpie_features, parse_formula
from hfmi_kit.domains.materials.pv import module_technologies, sq_limit
from hfmi_kit.domains.materials.tables import bundled_path, ingest_records, load_property_csv
from hfmi_kit.domains.materials.tasks import cross_validate, evaluate, finetune, predict_table, pretrain


class MaterialsDomain(Domain):
    """CSV tables of (formula, value); task: band gaps from few measurements, with uncertainty."""

    name: ClassVar[str] = "materials"
    tasks_module: ClassVar[str] = "hfmi_kit.domains.materials.tasks"
    tasks: ClassVar[tuple[str, ...]] = ("band_gap",)
    data_formats: ClassVar[str] = ("a CSV with a 'formula' column and a value column ('target' or --target; eV), "
                                   "or a bundled set: mp_gap, expt_gap")
    headline_metrics: ClassVar[tuple[str, ...]] = (
        "mae_ev", "rmse_ev", "mae_ev_scratch", "mae_ev_rf", "mae_ev_dummy", "coverage_1sigma", "labels_per_fold",
        "rows", "rows_rejected")
    published_files: ClassVar[tuple[str, ...]] = ("cv_predictions.csv", "candidates.csv", "active_learning.json",
                                                  "predictions.csv")
    primary_metric: ClassVar[str] = "mae_ev"
    higher_is_better: ClassVar[bool] = False
    label_key: ClassVar[str] = "labels_per_fold"
    baselines: ClassVar[tuple[str, ...]] = ("scratch", "rf", "dummy")
    example_outputs: ClassVar[tuple[str, ...]] = ("cv_predictions.csv",)
    finetune_options: ClassVar[tuple[str, ...]] = ("labels", "baselines", "target")
    bundled_data: ClassVar[dict[str, str]] = {"pretrain": "mp_gap", "finetune": "expt_gap", "evaluate": "expt_gap"}

    def example_data(self, out_dir: str | Path, *, seed: int = 0, small: bool = True,
                     years: int | None = None) -> Path:
        """Copy the bundled experimental band gaps (real data, 4,604 rows) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(bundled_path("expt_gap"), out / "expt_gap.csv"))


DOMAIN = MaterialsDomain()

__all__ = ["DOMAIN", "MaterialsDomain", "charge_balanced", "cross_validate", "evaluate", "finetune",
           "ingest_records", "load_property_csv", "magpie_features", "module_technologies", "parse_formula",
           "predict_table", "pretrain", "sq_limit"]
