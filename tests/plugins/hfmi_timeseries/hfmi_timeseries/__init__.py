"""Time series: the domain object hfmi_kit finds through its ``hfmi_kit.domains`` entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from hfmi_kit.domains import Domain
from hfmi_timeseries import model as _model  # noqa: F401  (registers the model families)
from hfmi_timeseries.tasks import evaluate, finetune, generate, pretrain


class TimeSeriesDomain(Domain):
    """A CSV of series (``id, x0 .. x{L-1}`` and, where labelled, ``target``); task: regression."""

    name: ClassVar[str] = "timeseries"
    tasks_module: ClassVar[str] = "hfmi_timeseries.tasks"
    tasks: ClassVar[tuple[str, ...]] = ("frequency",)
    data_formats: ClassVar[str] = "a CSV with columns id, x0..x63 and target (cycles per series) where labelled"
    headline_metrics: ClassVar[tuple[str, ...]] = ("mae", "mae_scratch", "mae_ridge", "labels", "test_series")
    published_files: ClassVar[tuple[str, ...]] = ("predictions.csv",)
    example_outputs: ClassVar[tuple[str, ...]] = ("predictions.csv",)
    primary_metric: ClassVar[str] = "mae"
    higher_is_better: ClassVar[bool] = False
    label_key: ClassVar[str] = "labels"
    baselines: ClassVar[tuple[str, ...]] = ("scratch", "ridge")

    def example_data(self, out_dir: str | Path, *, seed: int = 0, small: bool = True,
                     years: int | None = None) -> Path:
        return generate(Path(out_dir) / "series.csv", n=400 if small else 4000, seed=seed)

    def scorecard_plan(self) -> Any:
        from hfmi_kit.scorecard import DomainPlan
        from hfmi_kit.train.budget import LabelBudget

        return DomainPlan(data=_scorecard_data,
                          budgets={"small": LabelBudget.counts([10, 40]), "full": LabelBudget.counts([10, 40, 160])},
                          pretrain_kw={"small": {"steps": 10}, "full": {"steps": 2000}},
                          finetune_kw={"small": {"steps": 10}, "full": {"steps": 500}},
                          baselines=("scratch", "ridge"))

    def dashboard_section(self, run: Any) -> list[Any]:
        from hfmi_timeseries.dashboard import section

        return section(run)


def _scorecard_data(d: Path, budget: str) -> dict[str, Any]:
    p = d / "series.csv"
    if not p.exists():
        generate(p, n=300 if budget == "small" else 4000, seed=0)
    return {"data": p}


DOMAIN = TimeSeriesDomain()

__all__ = ["DOMAIN", "TimeSeriesDomain", "evaluate", "finetune", "generate", "pretrain"]
