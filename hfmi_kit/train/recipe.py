"""The recipe layer: the path from a domain's data to a saved, scored checkpoint, written once.

A domain's ``tasks.py`` keeps its science (what the data are, what the model sees, how it is
scored); everything every domain does the same way lives here:

- :func:`parent_config`: the checkpoint a fine-tuning starts from, checked to be one of this
  domain's (and of the right task) before any data is read;
- :func:`build`: the model by ``family.size``, seeded, with the pretrained weights transferred
  (what loaded and what did not is logged and kept as ``model.hfmi_load_report``);
- :class:`EngineDefaults` and :func:`engine`: the engine settings a domain does not choose per
  run (warm-up, layer-wise LR decay for a pretrained backbone, weight decay), giving a
  type-checked :class:`~hfmi_kit.train.TrainConfig`;
- :func:`fit`: the :class:`~hfmi_kit.train.Trainer` with the model's config in its step
  checkpoints;
- :func:`run_baselines`: the requested baselines, checked against what the domain offers, each
  scored on the same split into ``<metric>_<baseline>``;
- :func:`finish`: ``out/model`` (weights, ``config.json`` and the model card, written once, the
  reproduction record included) and ``out/metrics.json``;
- :func:`evaluate`: a fine-tuned checkpoint scored on what of ``--data`` it did not train on,
  through the domain's ``load``, ``predictor``, ``score`` and ``write_outputs``;
- :func:`explain`: which inputs drive that checkpoint on the same held-out items (the domain's
  ``explain``), with the model-randomisation and deletion checks.

The model's config is one :class:`~hfmi_kit.train.pretrained.ModelConfig`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfmi_kit.config import atomic_write_json, from_dict
from hfmi_kit.errors import CheckpointError, ConfigError, DataError
from hfmi_kit.train.loop import TrainConfig, Trainer, TrainResult
from hfmi_kit.train.pretrained import ModelConfig, load_pretrained, read_config, save_pretrained

LOGGER = logging.getLogger(__name__)


def parent_config(ckpt: str | Path, domain: str, *, task: str | Iterable[str] | None = None,
                  what: str = "") -> dict[str, Any]:
    """The config of checkpoint ``ckpt``, which must be one of ``domain``'s (and, with ``task``,
    of that task: ``what`` names it in the message, e.g. "fine-tuned segmenter").

    Raises:
        ConfigError: a checkpoint of another domain or task.
        CheckpointError: ``model_type`` is not ``FAMILY.SIZE``.
    """
    cfg = read_config(ckpt)
    got = cfg.get("domain")
    if task is None and got != domain:
        raise ConfigError(f"{ckpt}: a {got!r} checkpoint, not a {domain} one")
    if task is not None:
        tasks = {task} if isinstance(task, str) else set(task)
        if got != domain or cfg.get("task") not in tasks:
            raise ConfigError(f"{ckpt}: not a {what or f'fine-tuned {domain} model'} (domain {got!r}, "
                              f"task {cfg.get('task')!r})")
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or "." not in mt:
        raise CheckpointError(f"{Path(ckpt) / 'config.json'}: model_type {mt!r} is not FAMILY.SIZE")
    return cfg


def size_of(cfg: Mapping[str, Any]) -> str:
    """The encoder size of a checkpoint config (``tiny`` of ``climate_forecaster.tiny``)."""
    return str(cfg["model_type"]).split(".", 1)[1]


def transfer(model: nn.Module, ckpt: str | Path) -> Any:
    """Load every tensor of ``ckpt`` whose name and shape match into ``model``; log and return
    the :class:`~hfmi_kit.train.LoadReport` (also ``model.hfmi_load_report``)."""
    load_pretrained(ckpt, mode="transfer", model=model)
    report = model.hfmi_load_report  # type: ignore[attr-defined]
    LOGGER.info("transfer from %s: %s", ckpt, report.summary())
    return report


def build(model_type: str, kwargs: Mapping[str, Any], *, seed: int, ckpt: str | Path | None = None,
          before_transfer: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """The model ``model_type`` (``family.size``) with ``kwargs``, initialised under ``seed``;
    with ``ckpt``, the pretrained weights transferred (after ``before_transfer(model)``, e.g. a
    statistical skip path fitted on the data)."""
    from hfmi_kit.models import create_model

    torch.manual_seed(seed)
    model = create_model(model_type, **kwargs)
    if before_transfer is not None:
        before_transfer(model)
    if ckpt is not None:
        transfer(model, ckpt)
    return model


@dataclass(frozen=True)
class EngineDefaults:
    """The engine settings a domain fixes once (not per run)."""

    warmup_cap: int = 20  # linear warm-up of min(warmup_cap, steps // 10 + 1) steps
    layer_decay: float = 0.8  # layer-wise LR decay of a pretrained backbone trained in full
    weight_decay: float | None = None  # AdamW weight decay (None: the engine's 0.05)


def engine(defaults: EngineDefaults = EngineDefaults(), *, steps: int, pretrained: bool = False,
           mode: str = "full", layer_decay: float | None = None, **fields: Any) -> TrainConfig:
    """The :class:`~hfmi_kit.train.TrainConfig` of one run: warm-up from ``steps``, layer decay
    ``defaults.layer_decay`` when a pretrained backbone is trained in full (1.0 otherwise, or
    the ``layer_decay`` asked for), and ``fields`` (None values left to the engine's default).

    Raises:
        ConfigError: an unknown field or a value of the wrong type, naming it.
    """
    if layer_decay is None:
        layer_decay = defaults.layer_decay if pretrained and mode == "full" else 1.0
    kw: dict[str, Any] = {"steps": steps, "mode": mode, "layer_decay": float(layer_decay),
                          "warmup_steps": min(defaults.warmup_cap, steps // 10 + 1)}
    if defaults.weight_decay is not None:
        kw["weight_decay"] = defaults.weight_decay
    kw.update({k: v for k, v in fields.items() if v is not None})
    return from_dict(TrainConfig, kw)


def fit(model: nn.Module, dataset: Any, tc: TrainConfig, *, out_dir: str | Path | None,
        config: ModelConfig | None = None, evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        resume: bool = False) -> TrainResult:
    """Train ``model`` on ``dataset``; step checkpoints under ``out_dir`` carry ``config``. The
    model is left in eval mode."""
    trainer = Trainer(model, dataset, config=tc, out_dir=out_dir, evaluate=evaluate,
                      model_config=config.to_dict() if config is not None else None)
    res = trainer.fit(resume=resume)
    model.eval()
    return res


def requested_baselines(baselines: bool | Iterable[str] | None, offered: Iterable[str]) -> list[str]:
    """The baselines a run asked for (True: every one ``offered``), in the offered order.

    Raises:
        ConfigError: a name the domain does not offer.
    """
    offered = list(offered)
    wanted = set(offered) if baselines is True else set(baselines or ())
    unknown = sorted(wanted - set(offered))
    if unknown:
        raise ConfigError(f"unknown baselines {unknown}; expected {', '.join(offered)}")
    return [b for b in offered if b in wanted]


def run_baselines(names: Iterable[str], runs: Mapping[str, Callable[[], Mapping[str, float]]]
                  ) -> dict[str, float]:
    """Run each baseline of ``names`` (``runs[name]()`` trains or fits it on the run's split and
    returns its metrics) and return every metric as ``<metric>_<name>``."""
    out: dict[str, float] = {}
    for name in names:
        LOGGER.info("baseline %s", name)
        out.update({f"{k}_{name}": float(v) for k, v in runs[name]().items()})
    return out


def finish(model: nn.Module | None, out: str | Path, config: ModelConfig | None,
           metrics: Mapping[str, float]) -> Path | None:
    """Write ``out/model`` (with ``metrics`` in its config and card; skipped when ``model`` is
    None) and then ``out/metrics.json``. Returns the checkpoint path."""
    out = Path(out)
    path = None
    if model is not None and config is not None:
        config.metrics = dict(metrics)
        path = save_pretrained(model, out / "model", config=config)
    atomic_write_json(out / "metrics.json", dict(metrics))
    return path


def _held_out(domain: Any, ckpt: str | Path, data: str | Path, load_options: Mapping[str, Any] | None,
              command: str) -> tuple[Any, Any]:
    """The predictor of the fine-tuned checkpoint ``ckpt`` of ``domain`` and the
    :class:`~hfmi_kit.domains.Bundle` of what of ``data`` it did not train on: the checkpoint is
    checked whole (its config: this domain, one of its fine-tuning tasks; then its weights,
    safetensors only) before any data is read."""
    cfg = parent_config(ckpt, domain.name)
    if cfg.get("task") not in domain.tasks:
        raise ConfigError(f"{ckpt}: not a fine-tuned {domain.name} model (task {cfg.get('task')!r}, "
                          f"{cfg.get('model_type')}); {command} needs a fine-tuned one (tasks {list(domain.tasks)})")
    model = load_pretrained(ckpt).eval()
    pred = domain.predictor(model, cfg)
    pred.source = Path(ckpt)
    bundle = domain.load(data, ckpt=ckpt, config=cfg, **dict(load_options or {}))
    if bundle.size == 0:
        raise DataError(f"{data}: every {bundle.unit} was used to train {ckpt}; nothing left to {command}")
    return pred, bundle


def evaluate(domain: Any, *, ckpt: str | Path, data: str | Path, out: str | Path,
             load_options: Mapping[str, Any] | None = None,
             score_options: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Score the fine-tuned checkpoint ``ckpt`` of ``domain`` (a
    :class:`~hfmi_kit.domains.Domain`) on what of ``data`` it was not trained on; write the
    domain's outputs and ``out/metrics.json``; return the metrics.

    The steps, the same for every domain: the checkpoint is checked before any data is read (its
    config: this domain, one of its fine-tuning tasks; then its weights, safetensors only, which
    ``domain.predictor`` wraps); ``domain.load(data, ckpt=, config=, **load_options)`` gives the
    :class:`~hfmi_kit.domains.Bundle`; ``domain.score(predictor, bundle,
    out=out, **score_options)``, without gradients, gives the metrics (the bundle's ``meta`` counts are added; a
    domain whose predictions are too large to hold writes each under ``out`` as it is made) and
    ``domain.write_outputs`` publishes the rest.

    Raises:
        ConfigError: a checkpoint of another domain, or not a fine-tuned one.
        DataError: nothing of ``data`` is left once the training items are left out.
    """
    pred, bundle = _held_out(domain, ckpt, data, load_options, "evaluate")
    out = Path(out)
    with torch.no_grad():
        scored = domain.score(pred, bundle, out=out, **dict(score_options or {}))
    metrics = {**scored.metrics, **{k: float(v) for k, v in bundle.meta.items()}}
    domain.write_outputs(scored, out)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def explain(domain: Any, *, ckpt: str | Path, data: str | Path, out: str | Path, examples: int | None = None,
            seed: int = 0, load_options: Mapping[str, Any] | None = None,
            explain_options: Mapping[str, Any] | None = None) -> Any:
    """Which inputs drive the fine-tuned checkpoint ``ckpt`` of ``domain`` on (up to
    ``examples`` of) the items of ``data`` it was not trained on, held to the randomisation and
    deletion checks; writes ``out/explanation.json`` and ``out/importance.csv``; returns the
    :class:`~hfmi_kit.domains.Explanation`.

    The checkpoint and the held-out items are those an evaluation uses (:func:`evaluate`: the
    checkpoint checked whole before the data is read, the training items left out), then
    ``domain.explain(predictor, bundle, examples=, seed=, **explain_options)``.

    Raises:
        ConfigError: a checkpoint of another domain, not a fine-tuned one, or a domain without
            an explanation method.
        DataError: nothing of ``data`` is left once the training items are left out.
    """
    import csv
    import io

    from hfmi_kit.config import atomic_write_text

    if examples is not None and examples < 1:
        raise ConfigError(f"examples must be at least 1, got {examples}")
    pred, bundle = _held_out(domain, ckpt, data, load_options, "explain")
    ex = domain.explain(pred, bundle, examples=examples, seed=seed, **dict(explain_options or {}))
    out = Path(out)
    rec = {"domain": domain.name, "checkpoint": str(ckpt), "data": str(bundle.data), "seed": seed,
           "held_out": int(bundle.size), "held_out_unit": bundle.unit, **ex.to_json()}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["input", "share"])
    for name, share in sorted(ex.importance.items(), key=lambda kv: -kv[1]):
        w.writerow([name, f"{share:.6g}"])
    atomic_write_text(out / "importance.csv", buf.getvalue())
    atomic_write_json(out / "explanation.json", rec)
    return ex
