"""The small contract every science module fills, and the registry of domains by name.

Domains are found through the ``hfmi_kit.domains`` entry-point group: a package declares

    [project.entry-points."hfmi_kit.domains"]
    timeseries = "hfmi_timeseries:DOMAIN"

and, once installed, its domain appears in ``hfmi --help``, the CLI commands, the scorecard, the
dashboard and the example runs, with no file of hfmi_kit changed. The core never imports a
domain until one is asked for by name. :func:`register_domain` adds one at run time (tests,
notebooks).
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, ClassVar

from hfmi_kit.errors import ConfigError

ENTRY_POINT_GROUP = "hfmi_kit.domains"
# hfmi_kit's own domains (also declared as entry points; listed here for a source tree without metadata)
_BUILTIN = {"climate": "hfmi_kit.domains.climate:DOMAIN", "radiology": "hfmi_kit.domains.radiology:DOMAIN",
            "materials": "hfmi_kit.domains.materials:DOMAIN", "carbon": "hfmi_kit.domains.carbon:DOMAIN"}
_REGISTERED: dict[str, str] = {}  # register_domain(): name -> "module:attribute"


@dataclass
class Bundle:
    """What :meth:`Domain.load` read from ``--data`` to score a checkpoint on.

    Attributes:
        data: the path it was read from.
        items: the items to score, of the domain's own type (a table of compositions, a list of
            cases, a prepared region, fields with the indices of the held-out years).
        size: how many of them there are; 0 when every one was used to train the checkpoint.
        unit: what one of them is called in messages ("composition", "labelled subject").
        meta: counts that go into ``metrics.json`` as they are (rows seen in training).
    """

    data: Path
    items: Any
    size: int
    unit: str = "item"
    meta: dict[str, float] = field(default_factory=dict)


@dataclass
class Scored:
    """What :meth:`Domain.score` returns: the metrics of ``metrics.json`` and whatever
    :meth:`Domain.write_outputs` publishes from them (predictions, maps, a forecast)."""

    metrics: dict[str, float]
    outputs: Any = None


@dataclass
class Explanation:
    """What :meth:`Domain.explain` found: which inputs drive the model's prediction on held-out
    examples, and whether the attribution method passed the checks every explanation is held to
    (:mod:`hfmi_kit.explain`: model randomisation, deletion).

    Attributes:
        question: what is explained, in the field's words ("which sources drive the biomass
            estimate of a tile").
        method: how ("leave-one-band-out ablation", "integrated gradients (captum)").
        importance: input name -> share of the attribution magnitude (the shares sum to 1).
        checks: the :class:`~hfmi_kit.explain.CheckResult` of each check, with its figure.
        examples: how many held-out examples were explained.
        unit: what one example is ("tile", "composition").
        detail: further figures of the field, as they are (attribution in Mg/ha per source,
            share of the attribution inside the tumour).
    """

    question: str
    method: str
    importance: dict[str, float]
    checks: list[Any]
    examples: int
    unit: str = "example"
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether every check passed (an explanation that fails one shows the input or
        chance, not the model)."""
        return all(c.passed for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        """The explanation as ``explanation.json`` holds it."""
        return {"question": self.question, "method": self.method, "examples": self.examples, "unit": self.unit,
                "passed": self.passed, "importance": {k: float(v) for k, v in self.importance.items()},
                "checks": [{"name": c.name, "passed": bool(c.passed), "value": float(c.value), "detail": c.detail}
                           for c in self.checks],
                "detail": {k: float(v) for k, v in self.detail.items()}}


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
        bundled_data: command -> data it uses when ``--data`` is not given (a domain that ships
            real data sets); otherwise the CLI generates example data or reads the checkpoint's.
        primary_metric: the field's headline score in ``metrics.json`` (the label-efficiency axis).
        higher_is_better: whether a larger ``primary_metric`` is better.
        label_key: the ``metrics.json`` key that holds how many labels (or what fraction) a run used.
        metric_title: ``primary_metric`` as an axis title, with its unit (``MAE [eV]``).
        label_title: ``label_key`` as an axis title (``labelled cases``).
        baselines: names a run's metrics carry as ``{primary_metric}_{baseline}`` (``dice_unet``).
        tasks_module: the module whose ``pretrain``, ``finetune``, ``evaluate`` (and optional
            ``whatif``, ``prepare`` and ``inspect_store``) functions the commands call, with the
            keyword arguments shown below, and whose ``load``, ``score`` and ``write_outputs``
            make up an evaluation (:func:`hfmi_kit.train.recipe.evaluate`).

    An evaluation is the same for every domain (:func:`hfmi_kit.train.recipe.evaluate`): the
    checkpoint is checked to be a fine-tuned one of this domain, :meth:`load` reads what of
    ``--data`` it did not train on, :meth:`predictor` wraps the model, :meth:`score` scores the
    predictor on the bundle, :meth:`write_outputs` publishes what was predicted, and the recipe
    writes ``metrics.json``. An explanation (:func:`hfmi_kit.train.recipe.explain`) reads the
    same held-out bundle and asks :meth:`explain` which inputs drive the predictions, with the
    sanity checks.
    """

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]
    data_formats: ClassVar[str]
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    example_outputs: ClassVar[tuple[str, ...]] = ()
    published_files: ClassVar[tuple[str, ...]] = ()
    bundled_data: ClassVar[dict[str, str]] = {}
    primary_metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = False
    label_key: ClassVar[str] = ""
    metric_title: ClassVar[str] = ""
    label_title: ClassVar[str] = ""
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

    def options(self, command: str) -> dict[str, Any]:
        """The typed options of ``command`` (``pretrain``, ``finetune``, ``evaluate``,
        ``whatif``): name -> :class:`hfmi_kit.config.TaskOption` (type and default), read from
        the task function's keyword signature, the one place a domain declares them. The CLI
        passes a domain-specific flag only when it is one of them; an empty dict when the
        domain has no such command."""
        from hfmi_kit.config import task_options

        fn = getattr(importlib.import_module(self.tasks_module), command, None)
        return task_options(fn) if fn is not None else {}

    def pretrain(self, *, data: str | Path, out: str | Path, **kw: Any) -> Path:
        """Pretrain on unlabelled data; return the checkpoint directory."""
        return self._task("pretrain", "pretraining runs")(data=data, out=out, **kw)

    def finetune(self, *, ckpt: str | Path | None, data: str | Path, out: str | Path, **kw: Any) -> dict[str, float]:
        """Fine-tune for a task; write ``out/metrics.json``; return the metrics."""
        from hfmi_kit.checkpoints import resolve

        return self._task("finetune", "fine-tuning runs")(ckpt=resolve(ckpt), data=data, out=out, **kw)

    def evaluate(self, *, ckpt: str | Path, data: str | Path, out: str | Path, **kw: Any) -> dict[str, float]:
        """Evaluate a fine-tuned checkpoint on ``data``; write ``out/metrics.json``."""
        return self._task("evaluate", "evaluations")(ckpt=ckpt, data=data, out=out, **kw)

    def whatif(self, *, ckpt: str | Path, data: str | Path, out: str | Path, **kw: Any) -> dict[str, float]:
        """Counterfactual experiment (change an input, roll the model out); optional per domain."""
        return self._task("whatif", "what-if experiments")(ckpt=ckpt, data=data, out=out, **kw)

    def prepare(self, *, sources: Sequence[str | Path], out: str | Path, **kw: Any) -> Path:
        """``hfmi data prepare``: join raw files of the field into one training store at ``out``
        (checked, regridded or resampled, chunked, with statistics and provenance); optional per
        domain (``prepare`` of the tasks module)."""
        return self._task("prepare", "data stores")(sources=sources, out=out, **kw)

    def inspect_store(self, store: str | Path) -> list[str]:
        """``hfmi data inspect``: what a store of :meth:`prepare` holds, one line each."""
        return self._task("inspect_store", "data stores")(store)

    def load(self, data: str | Path, *, ckpt: str | Path, config: dict[str, Any], **options: Any) -> Bundle:
        """What of ``data`` to score the checkpoint ``ckpt`` (with ``config``) on: the items it
        was not trained on (``load`` of the tasks module; ``options``: the evaluation's options
        that concern reading, e.g. materials' ``target``).

        Raises:
            DataError: the data cannot be read or does not match the checkpoint, naming the file.
        """
        return self._task("load", "evaluations")(data, ckpt=ckpt, config=config, **options)

    def score(self, predictor: Any, bundle: Bundle, *, out: str | Path | None = None, **options: Any) -> Scored:
        """The metrics of ``predictor`` on ``bundle`` and the outputs to publish (``score`` of the
        tasks module; ``options``: those of the scoring, e.g. climate's ``leads``). Predictions
        too large to hold for every item (a whole-scan segmentation) are written under ``out``
        as each is made; with ``out`` None nothing is written."""
        return self._task("score", "evaluations")(predictor, bundle, out=None if out is None else Path(out),
                                                  **options)

    def write_outputs(self, scored: Scored, out: str | Path) -> list[Path]:
        """Publish what :meth:`score` predicted into ``out`` (each file written whole or not at
        all); the files written. ``write_outputs`` of the tasks module; nothing when it has none."""
        fn = getattr(importlib.import_module(self.tasks_module), "write_outputs", None)
        return list(fn(scored, Path(out)) or []) if fn is not None else []

    def explain(self, predictor: Any, bundle: Bundle, *, examples: int | None = None, seed: int = 0,
                **options: Any) -> Explanation:
        """Which inputs drive ``predictor``'s prediction on (up to ``examples`` of) the held-out
        items of ``bundle`` (what :meth:`load` gave), with the randomisation and deletion checks
        (:func:`hfmi_kit.train.recipe.explain` runs it). By default, the ``explain`` function of
        the ``explain`` module beside the domain's own module (``hfmi_kit.domains.carbon.explain``).

        Raises:
            ConfigError: the domain has no explanation method.
        """
        fn = getattr(self._sibling("explain"), "explain", None)
        if fn is None:
            raise ConfigError(f"the {self.name} domain has no explanation method "
                              f"({type(self).__module__}.explain.explain)")
        takes = inspect.signature(fn).parameters
        for name in options:
            if name not in takes:
                raise ConfigError(f"{name} is not an option of the {self.name} explanation")
        return fn(predictor, bundle, examples=examples, seed=seed, **options)

    def predictor(self, model: Any, config: dict[str, Any]) -> Any:
        """The :class:`hfmi_kit.train.infer.Predictor` for a model of this domain loaded from a
        checkpoint with ``config``: what it predicts with and what of the config's
        ``processors`` (calibration, normalisation) it applies: ``predictor(model, config)`` of
        the tasks module when it defines one, else the model as it is."""
        from hfmi_kit.train.infer import Predictor

        fn = getattr(importlib.import_module(self.tasks_module), "predictor", None)
        return fn(model, config) if fn is not None else Predictor(model, config=config)

    def scorecard_plan(self) -> Any:
        """How ``hfmi scorecard`` scores this domain: a :class:`hfmi_kit.scorecard.DomainPlan`
        (data, label budgets, steps, baselines); None leaves the domain out of the scorecard and
        the example runs. (Typed ``Any`` so that the contract imports none of its users.)"""
        return None

    def dashboard_section(self, run: Any) -> list[Any]:
        """Panel components showing the published files of ``run`` (a
        :class:`hfmi_kit.viz.results.Run`) on its dashboard page; files are read through
        ``run.file``, which refuses anything outside the results folder. By default, the
        ``section(run)`` function of the ``dashboard`` module beside the domain's own module
        (``hfmi_kit.domains.climate.dashboard``), or nothing when there is none."""
        module = self._sibling("dashboard")
        return [] if module is None else module.section(run)

    def _sibling(self, name: str) -> Any:
        """The module ``name`` beside the domain's own (``hfmi_kit.domains.carbon.dashboard``), or
        None when there is none (a missing import inside it is an error)."""
        package = type(self).__module__
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.{name}":
                raise
            return None

    def example_extras(self, root: Path, seed: int = 0) -> list[Path]:
        """Besides the scorecard's runs under ``root/runs/<name>``, what the domain's
        ``03_visualize`` notebook writes (for ``hfmi dashboard --example``); the folders made."""
        return []


def register_domain(name: str, target: str) -> None:
    """Make the domain object ``target`` (``"package.module:DOMAIN"``; a bare module means its
    ``DOMAIN``) available as ``name``, beside those of the entry-point group."""
    _REGISTERED[name] = target if ":" in target else f"{target}:DOMAIN"
    get_domain.cache_clear()


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {**_BUILTIN, **{ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}}


def _targets() -> dict[str, str]:
    return {**_entry_points(), **_REGISTERED}


def list_domains() -> list[str]:
    """The names of every registered domain (entry points and :func:`register_domain`)."""
    return sorted(_targets())


@cache
def get_domain(name: str) -> Domain:
    """Import and return the domain registered as ``name``."""
    targets = _targets()
    if name not in targets:
        raise ConfigError(f"unknown domain {name!r}; available: {sorted(targets)}")
    module, _, attr = targets[name].partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"domain {name!r} needs extra packages ({e}); "
                          f"install them with `pip install hfmi_kit[{name}]`") from e
    dom = getattr(mod, attr or "DOMAIN", None)
    if not isinstance(dom, Domain):
        raise ConfigError(f"domain {name!r}: {targets[name]} is not a hfmi_kit Domain (found {type(dom).__name__})")
    if dom.name != name:
        raise ConfigError(f"domain {name!r}: {targets[name]} calls itself {dom.name!r}")
    return dom
