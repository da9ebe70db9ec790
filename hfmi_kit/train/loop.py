"""The engine: one plain-PyTorch loop for pretraining and fine-tuning.

A model given to :class:`Trainer` takes a batch (a dict of tensors) and returns a dict with a
scalar ``loss`` and optionally other scalars to log. The loop adds mixed precision, gradient
accumulation and clipping, warm-up + cosine LR, layer-wise LR decay, frozen / linear-probe /
full fine-tuning, evaluation hooks with early stopping, atomic checkpoints with exact resume,
``tqdm.auto`` progress and JSON-lines metrics. Under torchrun it wraps the model in DDP, or
shards it with FSDP2 (``strategy="fsdp"``; step checkpoints are then DCP shards, see
:mod:`hfmi_kit.train.sharded`). A pre-emption signal (SIGTERM / SIGUSR1 by default, what SLURM
sends before the time limit), or the file named by ``HFMI_PREEMPT_FILE`` appearing, makes it
finish the current step, write a checkpoint and raise :class:`~hfmi_kit.errors.PreemptedError`;
``HFMI_RESUME=1`` in the environment (set by the SLURM script on a requeue) makes every ``fit``
resume from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from hfmi_kit.config import atomic_write_text, to_dict
from hfmi_kit.errors import ConfigError, NonFiniteLossError, PreemptedError
from hfmi_kit.models.backbone import layer_id
from hfmi_kit.train.dist import DistInfo, init_distributed
from hfmi_kit.train.pretrained import (
    environment_differences,
    read_config,
    read_train_state,
    read_weights,
    save_pretrained,
)
from hfmi_kit.train.seed import get_rng_state, seed_everything, set_rng_state
from hfmi_kit.train.sharded import SHARDED, apply_fsdp, is_sharded, load_sharded, save_sharded

LOGGER = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings; notebook parameters and CLI flags map onto these fields."""

    steps: int = 200  # optimiser steps
    batch_size: int = 16  # samples per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.05  # final LR as a fraction of the peak (cosine)
    warmup_steps: int = 20  # linear warm-up steps
    weight_decay: float = 0.05  # AdamW weight decay (not on biases, norms, embeddings)
    layer_decay: float = 1.0  # layer-wise LR decay factor (1.0 = off)
    clip_grad: float = 1.0  # max gradient norm (0 = off)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast dtype
    mode: Literal["full", "frozen", "linear_probe"] = "full"  # what is trained
    eval_every: int = 0  # steps between evaluations (0 = only at the end)
    early_stopping_patience: int = 0  # evaluations without improvement before stopping (0 = off)
    checkpoint_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # step checkpoints kept on disk
    log_every: int = 10  # steps between metric lines
    seed: int = 0  # the one seed of the run
    num_workers: int = 0  # DataLoader workers
    progress: bool = True  # tqdm progress bar
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # under torchrun: DDP ("auto", "ddp") or FSDP2 sharding ("fsdp"); default from HFMI_STRATEGY, so an
    # unchanged notebook or task switches when the launcher sets it
    strategy: Literal["auto", "ddp", "fsdp"] = field(default_factory=lambda: os.environ.get("HFMI_STRATEGY", "auto"))
    preempt_signals: str = "SIGTERM,SIGUSR1"  # signals that checkpoint and stop ("" = none)


def _checked_collate(items: list[Any]) -> Any:
    """Samples that are dicts of tensors are stacked by :func:`hfmi_kit.train.infer.collate`
    (a sample whose keys or shapes differ gets one line naming them); others by torch's default."""
    from torch.utils.data import default_collate

    from hfmi_kit.train.infer import _tensors_only, collate

    if items and all(_tensors_only(it) for it in items):
        return collate(items, where="training batch")
    return default_collate(items)


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    step: int
    last_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    checkpoint: Path | None = None


class ResumableSampler(Sampler[int]):
    """Seeded shuffling that can restart mid-epoch; shards across ranks for DDP.

    With ``groups`` (a group id per sample: the storage chunk its data lies in), the shuffling
    is chunk-aware, as streaming from a chunked store wants: the groups are shuffled, then the
    samples within each group, and each rank takes a contiguous part of that order, so a chunk
    is read by one rank, a few times in a row, not by every rank at random moments.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 groups: Sequence[int] | None = None) -> None:
        if n < 1:
            raise ConfigError("the training set is empty")
        if groups is not None and len(groups) != n:
            raise ConfigError(f"{len(groups)} sample groups for {n} samples")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.groups = None if groups is None else [int(x) for x in groups]
        self.epoch = 0
        self.offset = 0  # samples of this epoch already consumed (this rank)

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        per = math.ceil(self.n / self.world_size)
        if self.groups is not None:
            members: dict[int, list[int]] = {}
            for i, k in enumerate(self.groups):
                members.setdefault(k, []).append(i)
            keys = sorted(members)
            if self.shuffle:
                keys = [keys[j] for j in torch.randperm(len(keys), generator=g).tolist()]
            idx = []
            for k in keys:
                m = members[k]
                idx += [m[j] for j in torch.randperm(len(m), generator=g).tolist()] if self.shuffle else m
            idx = (idx * self.world_size)[: per * self.world_size]
            return idx[self.rank * per : (self.rank + 1) * per]  # a contiguous run of chunks per rank
        idx = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        idx = (idx * self.world_size)[: per * self.world_size]  # pad so every rank gets `per`
        return idx[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.offset :])

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size) - self.offset


def _autocast(device: torch.device, precision: str) -> tuple[contextlib.AbstractContextManager, bool]:
    """Autocast context and whether a GradScaler is needed."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision='fp16' needs a CUDA device; use 'bf16' on the CPU")
    return torch.autocast(device_type=device.type, dtype=dtype), precision == "fp16"


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-d params and embeddings; LR scaled by ``layer_decay ** (L - id)``."""
    backbone = getattr(model, "backbone", None)
    depth = getattr(backbone, "depth", 0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or "embed" in name or "token" in name.rsplit(".", 1)[-1]
        lid = layer_id(name.removeprefix("backbone."), depth) if backbone is not None else 0
        scale = layer_decay ** ((depth + 1) - lid) if backbone is not None else 1.0
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr": lr * scale, "lr_scale": scale}
        groups[key]["params"].append(p)
    return list(groups.values())


def _apply_mode(model: nn.Module, mode: str) -> None:
    if mode == "full":
        return
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ConfigError(f"mode={mode!r} needs a model with a .backbone to freeze")
    for p in backbone.parameters():
        p.requires_grad_(False)


def read_log(metrics_jsonl: str | Path, *, max_bytes: int = 64 << 20) -> list[dict[str, Any]]:
    """The records the training loop logged to ``metrics.jsonl`` (one JSON object a line; empty
    when the file is missing); a line that is not one (the last line of a run still writing) is
    skipped.

    Raises:
        ValueError: a log larger than ``max_bytes`` (not read whole).
    """
    path = Path(metrics_jsonl)
    if not path.is_file():
        return []
    if path.stat().st_size > max_bytes:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, more than the {max_bytes} a reader takes")
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            rows.append(r)
    return rows


class Trainer:
    """Train ``model`` on ``train_data``; see the module docstring for what the loop does.

    Args:
        model: returns ``{"loss": tensor, ...}`` for a batch dict.
        train_data: a map-style dataset of sample dicts.
        config: :class:`TrainConfig`.
        out_dir: where ``metrics.jsonl`` and ``checkpoints/`` go (None: nothing written).
        evaluate: hook ``fn(model) -> {name: float}`` run every ``eval_every`` steps and at the end.
        monitor: metric of ``evaluate`` to minimise for early stopping and best-model selection.
        model_config: config written into step checkpoints (``model_type``, ``model_kwargs``,
            ``geometry``, ...) so they load with :func:`hfmi_kit.load_pretrained`.
        collate_fn: DataLoader collate function.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        *,
        config: TrainConfig | None = None,
        out_dir: str | Path | None = None,
        evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
        monitor: str = "val_loss",
        model_config: Mapping[str, Any] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.cfg = config or TrainConfig()
        if self.cfg.steps < 1 or self.cfg.batch_size < 1 or self.cfg.grad_accum < 1:
            raise ConfigError(
                f"steps, batch_size and grad_accum must be >= 1, got {self.cfg.steps}, "
                f"{self.cfg.batch_size}, {self.cfg.grad_accum}"
            )
        if not (math.isfinite(self.cfg.lr) and self.cfg.lr > 0):
            raise ConfigError(f"lr (--lr) must be a finite number > 0, got {self.cfg.lr}")
        self.dist: DistInfo = init_distributed(self.cfg.device)
        self.device = self.dist.device
        self.model = model.to(self.device)
        self.train_data = train_data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.evaluate = evaluate
        self.monitor = monitor
        self.model_config = dict(model_config or {})
        self.collate_fn = collate_fn or _checked_collate
        _apply_mode(self.model, self.cfg.mode)
        if self.cfg.strategy not in ("auto", "ddp", "fsdp"):
            raise ConfigError(f"strategy must be auto, ddp or fsdp, got {self.cfg.strategy!r}")
        self.sharded = self.dist.distributed and self.cfg.strategy == "fsdp"
        self.module: nn.Module = self.model
        if self.sharded:
            apply_fsdp(self.model)
        elif self.dist.distributed:
            ddp_kw = {"device_ids": [self.device]} if self.device.type == "cuda" else {}
            self.module = nn.parallel.DistributedDataParallel(self.model, **ddp_kw)
        self._signal: int | None = None
        groups = param_groups(self.model, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                              layer_decay=self.cfg.layer_decay)
        if not groups:
            raise ConfigError("no trainable parameters (is everything frozen?)")
        self.optimizer = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.autocast, need_scaler = _autocast(self.device, self.cfg.precision)
        self.scaler = torch.amp.GradScaler("cuda") if need_scaler else None
        self.sampler = ResumableSampler(len(train_data), seed=self.cfg.seed, rank=self.dist.rank,
                                        world_size=self.dist.world_size,
                                        groups=getattr(train_data, "sample_groups", None))
        self.step = 0
        self.batches_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, float] = {}
        self.bad_evals = 0
        self._best_state: dict[str, torch.Tensor] | None = None

    # -- schedule --------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    # -- checkpoints -----------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete step checkpoint, or None."""
        root = self.ckpt_root
        if root is None or not (root / "latest").is_file():
            return None
        p = root / (root / "latest").read_text().strip()
        return p if p.is_dir() else None

    def _train_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "epoch": self.sampler.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "scheduler": self.scheduler.state_dict(),
            "rng": get_rng_state(),
            "best": dict(self.best),
            "bad_evals": self.bad_evals,
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "world_size": self.dist.world_size,
        }
        if self.dist.distributed:  # every rank's RNG, so each resumes its own stream
            ranks: list[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(ranks, state["rng"])
            state["rng_ranks"] = ranks
        return state

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-N`` atomically, then point ``latest`` at it (collective under torchrun)."""
        root = self.ckpt_root
        if root is None:
            return None
        name = f"step-{self.step:08d}"
        state = self._train_state()
        cfg = dict(self.model_config)
        cfg["training"] = {**to_dict(self.cfg), **cfg.get("training", {})}
        if self.sharded:
            path = self._save_sharded(root, name, cfg, state)
        else:
            state["optimizer"] = self.optimizer.state_dict()
            if self._best_state is not None:  # the weights fit() will return unless a later eval beats them
                state["best_state"] = {k: v.detach().to("cpu") for k, v in self._best_state.items()}
            path = save_pretrained(self.model, root / name, config=cfg, train_state=state)  # process 0 writes
        if self.dist.is_main:
            atomic_write_text(root / "latest", name + "\n")
            done = sorted(p for p in root.glob("step-*") if p.is_dir())
            for old in done[: max(0, len(done) - self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        if self.dist.distributed:
            torch.distributed.barrier()
        return path

    def _save_sharded(self, root: Path, name: str, cfg: dict[str, Any], state: dict[str, Any]) -> Path:
        """DCP shards into ``.name.partial``; rank 0 adds config and train state, then renames it into place."""
        from hfmi_kit.train.pretrained import CARD, CONFIG, TRAIN_STATE, render_model_card

        partial = root / f".{name}.partial"
        if self.dist.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        torch.distributed.barrier()
        state["optim_param_groups"] = save_sharded(self.model, self.optimizer, partial / SHARDED,
                                                   best=self._best_state)
        state["has_best_state"] = self._best_state is not None
        torch.distributed.barrier()
        path = root / name
        if self.dist.is_main:
            cfg = {**cfg, "schema_version": 1, "checkpoint_format": "dcp-sharded",
                   "world_size": self.dist.world_size}
            (partial / CONFIG).write_text(json.dumps(cfg, indent=2, default=str) + "\n", encoding="utf-8")
            (partial / CARD).write_text(render_model_card(cfg), encoding="utf-8")
            torch.save(state, partial / TRAIN_STATE)
            for f in partial.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if path.exists():
                shutil.rmtree(path)
            os.replace(partial, path)
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore model, optimiser, scheduler, RNG and data position; False if nothing to resume."""
        ckpt = Path(path) if path is not None else self.latest_checkpoint()
        root = self.ckpt_root
        if root is not None and root.is_dir() and self.dist.is_main:  # leftovers of a killed write
            for stale in [*root.glob(".step-*.tmp-*"), *root.glob(".step-*.partial"), *root.glob(".step-*.old-*")]:
                LOGGER.warning("removing %s, an interrupted checkpoint write", stale)
                shutil.rmtree(stale, ignore_errors=True)
        if ckpt is None:
            return False
        cfg = read_config(ckpt)
        diff = environment_differences(cfg, self.device)
        if diff:
            LOGGER.warning("resuming %s in a different environment: %s", ckpt, diff)
        st = read_train_state(ckpt)
        self._best_state = None
        if is_sharded(ckpt):
            self._best_state = load_sharded(self.model, self.optimizer, ckpt / SHARDED, st.get("optim_param_groups"),
                                            best=bool(st.get("has_best_state")))
        elif self.sharded:
            raise ConfigError(f"{ckpt}: a single-file checkpoint; resume it with strategy='ddp' (or one process)")
        else:
            self.model.load_state_dict(read_weights(ckpt, self.device))
            self.optimizer.load_state_dict(st["optimizer"])
            if st.get("best_state") is not None:
                self._best_state = {k: v.to(self.device) for k, v in st["best_state"].items()}
        self.scheduler.load_state_dict(st["scheduler"])
        if is_sharded(ckpt) and "optim_param_groups" not in st:  # an older sharded checkpoint: LR from the schedule
            for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                g["lr"] = lr
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        ranks = st.get("rng_ranks")
        if ranks and len(ranks) == self.dist.world_size:
            set_rng_state(ranks[self.dist.rank])
        elif int(st.get("world_size", 1)) == self.dist.world_size:
            set_rng_state(st["rng"])
        else:  # another number of processes: the data position is kept, the random streams restart
            LOGGER.warning("%s was written by %s process(es), resuming on %d: RNG streams reseeded", ckpt,
                           st.get("world_size", 1), self.dist.world_size)
            seed_everything(self.cfg.seed + 7919 * self.dist.rank + int(st["step"]))
        self.step = int(st["step"])
        self.sampler.epoch = int(st["epoch"])
        self.batches_in_epoch = int(st["batches_in_epoch"])
        self.best = dict(st.get("best", {}))
        self.bad_evals = int(st.get("bad_evals", 0))
        LOGGER.info("resumed from %s at step %d", ckpt, self.step)
        return True

    # -- loop ------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        # drop the last partial batch when an epoch holds at least one full batch; decided on the
        # whole epoch, so that a run resumed at the end of an epoch drops the same batch
        self.sampler.offset = 0
        drop_last = len(self.sampler) >= self.cfg.batch_size
        self.sampler.offset = self.batches_in_epoch * self.cfg.batch_size
        if hasattr(self.train_data, "set_epoch"):  # per-sample randomness from (seed, epoch, index)
            self.train_data.set_epoch(self.sampler.epoch)
        g = torch.Generator().manual_seed(self.cfg.seed + self.sampler.epoch)
        return DataLoader(self.train_data, batch_size=self.cfg.batch_size, sampler=self.sampler,
                          drop_last=drop_last, num_workers=self.cfg.num_workers,
                          collate_fn=self.collate_fn, generator=g,
                          pin_memory=self.device.type == "cuda")

    def _batches(self) -> Iterator[Any]:
        while True:
            for batch in self._loader():
                self.batches_in_epoch += 1
                yield batch
            self.sampler.epoch += 1
            self.batches_in_epoch = 0

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, Mapping):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(v) for v in batch)
        return batch

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.out_dir is not None and self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def _run_eval(self) -> bool:
        """Run the evaluation hook; return True when early stopping says stop."""
        if self.evaluate is None:
            return False
        self.model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in self.evaluate(self.model).items()}
        self.model.train()
        self._log({"step": self.step, "split": "eval", **metrics})
        if self.monitor not in metrics:
            return False
        val = metrics[self.monitor]
        if not self.best or val < self.best[self.monitor]:
            self.best = dict(metrics)
            self.bad_evals = 0
            self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad_evals += 1
        pat = self.cfg.early_stopping_patience
        return bool(pat and self.bad_evals >= pat)

    def fit(self, *, resume: bool = False, until: int | None = None) -> TrainResult:
        """Train to ``config.steps`` (continuing from the latest checkpoint if ``resume``).

        ``until`` stops early at that step with a checkpoint, as a pre-empted job would; the LR
        schedule still spans ``config.steps``, so a later ``fit(resume=True)`` continues exactly.
        """
        c = self.cfg
        stop_at = min(c.steps, until) if until is not None else c.steps
        resume = resume or os.environ.get("HFMI_RESUME", "") == "1"
        if not (resume and self.resume()):
            seed_everything(c.seed + 7919 * self.dist.rank)
        self._signal = None
        restore = self._install_signal_handlers()
        try:
            return self._fit(stop_at)
        finally:
            for sig, old in restore.items():
                signal.signal(sig, old)

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Catch the pre-emption signals (main thread only); returns the handlers to restore."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        restore = {}
        for name in filter(None, (x.strip() for x in self.cfg.preempt_signals.split(","))):
            sig = getattr(signal, name, None)
            if not isinstance(sig, signal.Signals):
                raise ConfigError(f"preempt_signals: unknown signal {name!r}")

            def handler(signum: int, frame: Any) -> None:
                self._signal = signum

            restore[sig] = signal.signal(sig, handler)
        return restore

    def _preempted(self) -> bool:
        """A pre-emption signal arrived, or the file ``HFMI_PREEMPT_FILE`` names exists (how the SLURM
        script reaches processes it cannot signal: torchrun workers and papermill kernels on every node)."""
        req = os.environ.get("HFMI_PREEMPT_FILE")
        if req and self._signal is None and os.path.exists(req):
            self._signal = -1
        flag = torch.tensor([1.0 if self._signal is not None else 0.0], device=self.device)  # NCCL: on the GPU
        if self.dist.distributed:  # every rank stops at the same step
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _fit(self, stop_at: int) -> TrainResult:
        c = self.cfg
        self.model.train()
        from tqdm.auto import tqdm

        bar = tqdm(total=c.steps, initial=self.step, disable=not (c.progress and self.dist.is_main),
                   desc="train", dynamic_ncols=True, mininterval=1.0)
        batches = self._batches()
        last_loss = float("nan")
        stopped = False
        t0, n_samples = time.perf_counter(), 0
        while self.step < stop_at:
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum, extra = 0.0, {}
            for micro in range(c.grad_accum):
                batch = self._to_device(next(batches))
                sync = contextlib.nullcontext()
                if self.sharded:
                    self.model.set_requires_gradient_sync(micro == c.grad_accum - 1)  # type: ignore[operator]
                elif self.dist.distributed and micro < c.grad_accum - 1:
                    sync = self.module.no_sync()  # type: ignore[operator]
                with sync:
                    with self.autocast:
                        out = self.module(batch)
                    loss = out["loss"]
                    if not torch.isfinite(loss.detach()).all():
                        latest = self.latest_checkpoint()
                        raise NonFiniteLossError(
                            f"loss is {loss.item()} at step {self.step + 1} (micro-batch {micro}); "
                            "training stopped. Check the inputs for NaN/inf or lower the LR. "
                            f"Last good checkpoint: {latest or 'none written yet'}"
                        )
                    scaled = loss / c.grad_accum
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                loss_sum += loss.item() / c.grad_accum
                for k, v in out.items():
                    if k != "loss" and isinstance(v, torch.Tensor) and v.numel() == 1:
                        extra[k] = extra.get(k, 0.0) + v.item() / c.grad_accum
                n_samples += _batch_size(batch)
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            gnorm = 0.0
            if c.clip_grad > 0:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, c.clip_grad))
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            last_loss = loss_sum
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4g}", refresh=False)
            if self.step % c.log_every == 0 or self.step == c.steps:
                if self.dist.distributed:  # log the global loss, not rank 0's share of the batch
                    t = torch.tensor([loss_sum], dtype=torch.float64, device=self.device)
                    torch.distributed.all_reduce(t)
                    loss_sum = float(t.item()) / self.dist.world_size
                dt = time.perf_counter() - t0
                self._log({"step": self.step, "split": "train", "loss": loss_sum,
                           "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": gnorm,
                           "samples_per_s": n_samples / max(dt, 1e-9), **extra})
                t0, n_samples = time.perf_counter(), 0
            if c.eval_every and self.step % c.eval_every == 0 and self.step < stop_at:
                stopped = self._run_eval()
            if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < stop_at:
                self.save_checkpoint()
            if self.step < c.steps and self._preempted():
                bar.close()
                path = self.save_checkpoint()
                name = signal.Signals(self._signal).name if self._signal and self._signal > 0 else "pre-emption request"
                raise PreemptedError(f"{name} received: checkpoint at step {self.step} in {path}; the run resumes "
                                "from it (fit(resume=True), or HFMI_RESUME=1)", step=self.step, checkpoint=path)
            if stopped:
                LOGGER.info("early stopping at step %d (%s did not improve)", self.step, self.monitor)
                break
        bar.close()
        if self.step < c.steps and not stopped:  # interrupted on purpose: checkpoint and return
            return TrainResult(step=self.step, last_loss=last_loss, history=self.history, best=self.best,
                               checkpoint=self.save_checkpoint())
        if not stopped:
            self._run_eval()
        if self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        ckpt = self.save_checkpoint()
        return TrainResult(step=self.step, last_loss=last_loss, history=self.history,
                           best=self.best, stopped_early=stopped, checkpoint=ckpt)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for v in batch.values():
            n = _batch_size(v)
            if n:
                return n
    return 0
