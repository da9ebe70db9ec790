"""Climate (HClimRep): coupled atmosphere-ocean-sea-ice foundation model, forecasts, what-ifs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from hfmi_kit.domains.base import Domain
from hfmi_kit.domains.climate import model as _model  # noqa: F401  (registers the model families)
from hfmi_kit.domains.climate.data import ClimateData, ForecastWindows, load_climate, split_years
from hfmi_kit.domains.climate.generator import GeneratorConfig, generate, write_dataset
from hfmi_kit.domains.climate.tasks import evaluate, finetune, pretrain, whatif
from hfmi_kit.scorecard import DomainPlan
from hfmi_kit.train.budget import LabelBudget


class ClimateDomain(Domain):
    """CF NetCDF/Zarr on lat-lon grids; tasks: multi-step forecast and sea-ice extent."""

    name: ClassVar[str] = "climate"
    tasks_module: ClassVar[str] = "hfmi_kit.domains.climate.tasks"
    tasks: ClassVar[tuple[str, ...]] = ("forecast", "seaice")
    data_formats: ClassVar[str] = "CF-convention NetCDF (.nc) or Zarr (.zarr) with time, lat, lon"
    headline_metrics: ClassVar[tuple[str, ...]] = (
        "rmse", "rmse_persistence", "rmse_climatology", "acc", "acc_persistence", "seaice_extent_mae",
        "extent_mae", "extent_mae_persistence", "extent_mae_climatology")
    published_files: ClassVar[tuple[str, ...]] = ("forecast.nc", "whatif.nc")
    primary_metric: ClassVar[str] = "rmse"
    higher_is_better: ClassVar[bool] = False
    label_key: ClassVar[str] = "label_fraction"
    metric_title: ClassVar[str] = "lead-1 latitude-weighted RMSE [units of the variable]"
    label_title: ClassVar[str] = "fraction of the training years labelled"
    baselines: ClassVar[tuple[str, ...]] = ("persistence", "climatology", "damped_persistence")
    example_outputs: ClassVar[tuple[str, ...]] = ("forecast.nc",)

    def example_data(self, out_dir: str | Path, *, seed: int = 0, small: bool = True,
                     years: int | None = None) -> Path:
        cfg = GeneratorConfig(years=years or (20 if small else 60), seed=seed, spinup_years=10 if small else 20)
        return write_dataset(generate(cfg), Path(out_dir) / "climate.zarr")

    def example_extras(self, root: Path, seed: int = 0) -> list[Path]:
        """A what-if experiment (doubled CO2, 6 months, 2 members) of the scorecard's fine-tuned model."""
        clim = root / "runs" / "climate" / f"pretrained_n1_s{seed}" / "model"
        if not clim.is_dir():
            return []
        out = root / "runs" / "climate" / "whatif"
        whatif(ckpt=clim, data=root / "data" / "climate.zarr", out=out, horizon=6, members=2, average_from=2, seed=seed)
        return [out]

    def scorecard_plan(self) -> DomainPlan:
        return DomainPlan(
            data=_scorecard_data, budgets={"small": LabelBudget.fractions([0.25, 1.0]),
                     "full": LabelBudget.fractions([0.05, 0.1, 0.25, 0.5, 1.0])},
            pretrain_kw={"small": {"steps": 20, "batch_size": 4}, "full": {"steps": 3000, "config": "small"}},
            finetune_kw={"small": {"steps": 10, "rollout_train": 2, "leads": 2, "batch_size": 4},
                         "full": {"steps": 1500}},
            scratch_separately=True, extra_methods=("damped_persistence", "persistence", "climatology"))


def _scorecard_data(d: Path, budget: str) -> dict[str, Any]:
    """The scorecard's data of this domain for ``budget``, made once under ``d``."""
    from hfmi_kit.domains.climate import GeneratorConfig, generate, write_dataset

    years = 10 if budget == "small" else 40
    p = d / "climate.zarr"
    if not p.exists():
        write_dataset(generate(GeneratorConfig(years=years, spinup_years=8, seed=0)), p)
    return {"data": p}


DOMAIN = ClimateDomain()

__all__ = ["DOMAIN", "ClimateData", "ClimateDomain", "ForecastWindows", "GeneratorConfig", "evaluate",
           "finetune", "generate", "load_climate", "pretrain", "split_years", "whatif", "write_dataset"]
