"""Climate (HClimRep): coupled atmosphere-ocean-sea-ice foundation model, forecasts, what-ifs."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from hfmi_kit.domains.base import Domain
from hfmi_kit.domains.climate import model as _model  # noqa: F401  (registers the model families)
from hfmi_kit.domains.climate.data import ClimateData, ForecastWindows, load_climate, split_years
from hfmi_kit.domains.climate.generator import GeneratorConfig, generate, write_dataset
from hfmi_kit.domains.climate.tasks import evaluate, finetune, pretrain, whatif


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
    baselines: ClassVar[tuple[str, ...]] = ("persistence", "climatology", "damped_persistence")
    example_outputs: ClassVar[tuple[str, ...]] = ("forecast.nc",)

    def example_data(self, out_dir: str | Path, *, seed: int = 0, small: bool = True,
                     years: int | None = None) -> Path:
        cfg = GeneratorConfig(years=years or (20 if small else 60), seed=seed, spinup_years=10 if small else 20)
        return write_dataset(generate(cfg), Path(out_dir) / "climate.zarr")


DOMAIN = ClimateDomain()

__all__ = ["DOMAIN", "ClimateData", "ClimateDomain", "ForecastWindows", "GeneratorConfig", "evaluate",
           "finetune", "generate", "load_climate", "pretrain", "split_years", "whatif", "write_dataset"]
