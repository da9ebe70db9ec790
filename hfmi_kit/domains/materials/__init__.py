"""Photovoltaic materials (SOL-AI): a composition foundation model for band gaps and candidates."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

from hfmi_kit.domains.base import Domain
from hfmi_kit.domains.materials import model as _model  # noqa: F401  (registers the model families)
from hfmi_kit.domains.materials.chem import charge_balanced, magpie_features, parse_formula
from hfmi_kit.domains.materials.pv import module_technologies, sq_limit
from hfmi_kit.domains.materials.tables import bundled_path, ingest_records, load_property_csv
from hfmi_kit.domains.materials.tasks import cross_validate, evaluate, finetune, predict_table, pretrain
from hfmi_kit.scorecard import DomainPlan
from hfmi_kit.train.budget import LabelBudget


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
    metric_title: ClassVar[str] = "out-of-fold MAE [eV]"
    label_title: ClassVar[str] = "labelled compositions per fold"
    baselines: ClassVar[tuple[str, ...]] = ("scratch", "rf", "dummy")
    example_outputs: ClassVar[tuple[str, ...]] = ("cv_predictions.csv",)
    bundled_data: ClassVar[dict[str, str]] = {"pretrain": "mp_gap", "finetune": "expt_gap", "evaluate": "expt_gap"}

    def example_data(self, out_dir: str | Path, *, seed: int = 0, small: bool = True,
                     years: int | None = None) -> Path:
        """Copy the bundled experimental band gaps (real data, 4,604 rows) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(bundled_path("expt_gap"), out / "expt_gap.csv"))

    def example_extras(self, root: Path, seed: int = 0) -> list[Path]:
        """Ranked candidates and an active-learning simulation from the scorecard's models."""
        from hfmi_kit.domains.materials.discover import (
            active_learning,
            discovery_features,
            generate_candidates,
            rank_candidates,
        )

        mat = sorted((root / "runs" / "materials").glob(f"pretrained_n*_s{seed}"))
        if not mat:
            return []
        vis = root / "runs" / "materials" / "discovery"
        vis.mkdir(parents=True, exist_ok=True)
        table = load_property_csv(root / "data" / "expt.csv")
        ranked = rank_candidates(mat[-1] / "model", generate_candidates(), measured=table, seed=seed)
        tmp = vis / ".candidates.csv.tmp"
        ranked.to_csv(tmp, index=False)
        tmp.replace(vis / "candidates.csv")
        al = active_learning(discovery_features(root / "runs" / "materials" / "pretrain" / "model", table), table.y,
                             budget=40, repeats=1, trees=20, seed=seed)
        al.save(vis / "active_learning.json")
        return [vis]

    def scorecard_plan(self) -> DomainPlan:
        return DomainPlan(
            data=_scorecard_data, budgets={"small": LabelBudget.counts([50, 150]),
                                                 "full": LabelBudget.counts([50, 100, 200, 400, 800])},
            pretrain_kw={"small": {"steps": 40, "supervised_steps": 60}, "full": {"steps": 3000}},
            finetune_kw={"small": {"steps": 30, "folds": 2, "members": 1}, "full": {"steps": 1000}},
            baselines=("scratch", "rf", "dummy"))


def _scorecard_data(d: Path, budget: str) -> dict[str, Any]:
    """The scorecard's data of this domain for ``budget``, made once under ``d``."""
    import pandas as pd

    from hfmi_kit.domains.materials.tables import bundled_path

    if budget == "full":
        return {"data": "expt_gap", "pretrain_data": "mp_gap"}
    d.mkdir(parents=True, exist_ok=True)
    dft, expt = d / "dft.csv", d / "expt.csv"
    if not dft.exists():
        pd.read_csv(bundled_path("mp_gap")).sample(3000, random_state=0).to_csv(dft, index=False)
        pd.read_csv(bundled_path("expt_gap")).sample(400, random_state=0).to_csv(expt, index=False)
    return {"data": expt, "pretrain_data": dft, "exclude": expt}


DOMAIN = MaterialsDomain()

__all__ = ["DOMAIN", "MaterialsDomain", "charge_balanced", "cross_validate", "evaluate", "finetune",
           "ingest_records", "load_property_csv", "magpie_features", "module_technologies", "parse_formula",
           "predict_table", "pretrain", "sq_limit"]
