"""Vegetation and soil carbon (3D-ABC): multi-source biomass maps and a regional carbon budget."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

# GDAL's block cache defaults to 5 % of the machine's memory (1.2 GiB on 24 GiB, 25 GiB on a 512 GiB
# node), filled by the windows read and by the COGs written block by block: 256 MiB serves the map
# pass's windows as well (benchmarks/carbon_scale.py). Set GDAL_CACHEMAX to choose another.
os.environ.setdefault("GDAL_CACHEMAX", "256")

from hfmi_kit.domains.base import Domain
from hfmi_kit.domains.carbon import model as _model  # noqa: F401  (registers the model family)
from hfmi_kit.domains.carbon.sources import DEFAULT_SOURCES, SourceSpec, open_region, target_grid
from hfmi_kit.domains.carbon.synth import LandscapeConfig, chave_agb_kg, generate_region
from hfmi_kit.domains.carbon.tasks import budget, evaluate, finetune, map_region, predict_map, prepare, pretrain
from hfmi_kit.scorecard import DomainPlan
from hfmi_kit.train.budget import LabelBudget


class CarbonDomain(Domain):
    """A region folder (region.json + GeoTIFF / LAS per epoch + plot CSVs); task: biomass and carbon."""

    name: ClassVar[str] = "carbon"
    tasks_module: ClassVar[str] = "hfmi_kit.domains.carbon.tasks"
    tasks: ClassVar[tuple[str, ...]] = ("biomass",)
    data_formats: ClassVar[str] = ("a region folder: region.json, epoch<k>/ GeoTIFF rasters and LAS/LAZ lidar, "
                                   "plots.csv + trees.csv, optional station_co2.csv")
    headline_metrics: ClassVar[tuple[str, ...]] = (
        "rmse_mg_ha", "bias_mg_ha", "r2", "rmse_mg_ha_map", "coverage_90", "rmse_mg_ha_scratch", "rmse_mg_ha_rf",
        "budget_error_pct", "budget_in_interval", "labelled_plots", "test_plots")
    published_files: ClassVar[tuple[str, ...]] = ("budget.csv", "maps")
    primary_metric: ClassVar[str] = "rmse_mg_ha"
    higher_is_better: ClassVar[bool] = False
    label_key: ClassVar[str] = "labelled_plots"
    metric_title: ClassVar[str] = "held-out plot RMSE [Mg/ha]"
    label_title: ClassVar[str] = "labelled field plots"
    baselines: ClassVar[tuple[str, ...]] = ("scratch", "rf")
    example_outputs: ClassVar[tuple[str, ...]] = ("maps/", "budget.csv")

    def example_data(self, out_dir: str | Path, *, seed: int = 0, small: bool = True,
                     years: int | None = None) -> Path:
        return generate_region(Path(out_dir) / "carbon_region", LandscapeConfig(seed=seed, size=128 if small else 256))

    def scorecard_plan(self) -> DomainPlan:
        return DomainPlan(
            data=_scorecard_data, budgets={"small": LabelBudget.counts([10, 30]),
                                           "full": LabelBudget.counts([20, 50, 100, 150])},
            pretrain_kw={"small": {"steps": 20, "batch_size": 8}, "full": {"steps": 2000}},
            finetune_kw={"small": {"steps": 30, "calibration_folds": 2}, "full": {"steps": 400}},
            baselines=("scratch", "rf"))


def _scorecard_data(d: Path, budget: str) -> dict[str, Any]:
    """The scorecard's data of this domain for ``budget``, made once under ``d``."""
    from hfmi_kit.domains.carbon import LandscapeConfig, generate_region

    p = d / "carbon_region"
    if not p.exists():
        cfg = LandscapeConfig(size=64, plots=60, seed=2) if budget == "small" else LandscapeConfig(size=256, plots=300)
        generate_region(p, cfg)
    return {"data": p}


DOMAIN = CarbonDomain()

__all__ = ["DEFAULT_SOURCES", "DOMAIN", "CarbonDomain", "LandscapeConfig", "SourceSpec", "budget", "chave_agb_kg",
           "evaluate", "finetune", "generate_region", "map_region", "open_region", "predict_map", "prepare", "pretrain",
           "target_grid"]
