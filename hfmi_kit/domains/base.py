"""The small contract every science module fills, and the registry of domains by name."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from hfmi_kit.errors import ConfigError

# name -> module that defines DOMAIN; the core never imports a domain until it is asked for.
_DOMAIN_MODULES: dict[str, str] = {
    "climate": "hfmi_kit.domains.climate",
    "radiology": "hfmi_kit.domains.radiology",
    "materials": "hfmi_kit.domains.materials",
    "carbon": "hfmi_kit.domains.carbon",
}


class Domain(ABC):
    """What a science module provides to the CLI, the notebooks and the dashboards.

    Attributes:
        name: registry name (``climate``).
        tasks: downstream tasks ``finetune`` accepts; the first is the default.
        data_formats: what ``--data`` may point to.
        headline_metrics: the metrics (with their baselines) the CLI prints after a run.
        example_outputs: files a fine-tuning run writes besides the checkpoint, for the demo.
        published_files: every file or folder a run of this domain publishes for others to read
            (the dashboard recognises runs by them; default: ``example_outputs``).
        finetune_options: extra keyword options of ``finetune`` the CLI may pass (``labels``:
            a number of labelled examples; ``baselines``: also train the baselines; ``target``:
            the value column of a table, also passed to ``pretrain`` and ``evaluate``).
        bundled_data: command -> data it uses when ``--data`` is not given (a domain that ships
            real data sets); otherwise the CLI generates example data or reads the checkpoint's.
        primary_metric: the field's headline score in ``metrics.json`` (the label-efficiency axis).
        higher_is_better: whether a larger ``primary_metric`` is better.
        label_key: the ``metrics.json`` key that holds how many labels (or what fraction) a run used.
        baselines: names a run's metrics carry as ``{primary_metric}_{baseline}`` (``dice_unet``).
        tasks_module: the module whose ``pretrain``, ``finetune``, ``evaluate`` (and optional
            ``whatif``) functions the commands call, with the keyword arguments shown below.
    """

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]
    data_formats: ClassVar[str]
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    example_outputs: ClassVar[tuple[str, ...]] = ()
    published_files: ClassVar[tuple[str, ...]] = ()
    finetune_options: ClassVar[tuple[str, ...]] = ()
    bundled_data: ClassVar[dict[str, str]] = {}
    primary_metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = False
    label_key: ClassVar[str] = ""
    baselines: ClassVar[tuple[str, ...]] = ()
    tasks_module: ClassVar[str]

    @abstractmethod
    def example_data(self, out_dir: str | Path, *, seed: int = 0, small: bool = True,
                     years: int | None = None) -> Path:
        """Generate (or copy shipped) example data into ``out_dir``; return the data path."""

    def _task(self, name: str, what: str) -> Any:
        fn = getattr(importlib.import_module(self.tasks_module), name, None)
        if fn is None:
            raise ConfigError(f"{what} are not defined for the {self.name!r} domain")
        return fn

    def pretrain(self, *, data: str | Path, out: str | Path, **kw: Any) -> Path:
        """Pretrain on unlabelled data; return the checkpoint directory."""
        return self._task("pretrain", "pretraining runs")(data=data, out=out, **kw)

    def finetune(self, *, ckpt: str | Path | None, data: str | Path, out: str | Path, **kw: Any) -> dict[str, float]:
        """Fine-tune for a task; write ``out/metrics.json``; return the metrics."""
        return self._task("finetune", "fine-tuning runs")(ckpt=ckpt, data=data, out=out, **kw)

    def evaluate(self, *, ckpt: str | Path, data: str | Path, out: str | Path, **kw: Any) -> dict[str, float]:
        """Evaluate a fine-tuned checkpoint on ``data``; write ``out/metrics.json``."""
        return self._task("evaluate", "evaluations")(ckpt=ckpt, data=data, out=out, **kw)

    def whatif(self, *, ckpt: str | Path, data: str | Path, out: str | Path, **kw: Any) -> dict[str, float]:
        """Counterfactual experiment (change an input, roll the model out); optional per domain."""
        return self._task("whatif", "what-if experiments")(ckpt=ckpt, data=data, out=out, **kw)


def register_domain(name: str, module: str) -> None:
    """Make ``module`` (which defines ``DOMAIN``) available as ``name``."""
    _DOMAIN_MODULES[name] = module


def list_domains() -> list[str]:
    return sorted(_DOMAIN_MODULES)


def get_domain(name: str) -> Domain:
    """Import and return the domain registered as ``name``."""
    if name not in _DOMAIN_MODULES:
        raise ConfigError(f"unknown domain {name!r}; available: {list_domains()}")
    try:
        mod = importlib.import_module(_DOMAIN_MODULES[name])
    except ImportError as e:
        raise ImportError(f"domain {name!r} needs extra packages ({e}); "
                          f"install them with `pip install hfmi_kit[{name}]`") from e
    return mod.DOMAIN
