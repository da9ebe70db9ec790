"""Generate, pretrain, fine-tune and evaluate: the science of the time-series domain, on the
engine, checkpoints and provenance of hfmi_kit."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from torch.utils.data import Dataset

from hfmi_kit import options as opt
from hfmi_kit.config import atomic_write_text
from hfmi_kit.domains import Bundle, Scored, get_domain
from hfmi_kit.errors import DataError
from hfmi_kit.train import recipe
from hfmi_kit.train.budget import LabelBudget
from hfmi_kit.train.infer import Predictor
from hfmi_kit.train.pretrained import ModelConfig
from hfmi_kit.train.provenance import recorded

LENGTH = 64


def generate(path: str | Path, *, n: int = 400, seed: int = 0, labelled: float = 0.5) -> Path:
    """``n`` noisy damped oscillations of 1-8 cycles per series; the first ``labelled`` share
    carries its frequency as ``target``. Returns the CSV."""
    rng = np.random.default_rng(seed)
    t = np.arange(LENGTH) / LENGTH
    f = rng.uniform(1.0, 8.0, n)
    x = (np.sin(2 * np.pi * (f[:, None] * t + rng.uniform(0, 1, (n, 1)))) * np.exp(-rng.uniform(0, 2, (n, 1)) * t)
         + 0.3 * rng.standard_normal((n, LENGTH)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["id," + ",".join(f"x{i}" for i in range(LENGTH)) + ",target"]
    for i in range(n):
        tgt = f"{f[i]:.4f}" if i < labelled * n else ""
        rows.append(f"s{i:05d}," + ",".join(f"{v:.5f}" for v in x[i]) + f",{tgt}")
    atomic_write_text(path, "\n".join(rows) + "\n")
    return path


def read_series(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, series (N, L), targets (N,), NaN where unlabelled), every value checked."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such CSV file")
    with open(p, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0][:1] != ["id"] or rows[0][-1] != "target" or len(rows[0]) != LENGTH + 2:
        raise DataError(f"{p}: expected the header id,x0..x{LENGTH - 1},target")
    ids, xs, ys = [], [], []
    for k, r in enumerate(rows[1:], start=2):
        try:
            xs.append([float(v) for v in r[1:-1]])
            ys.append(float(r[-1]) if r[-1] else np.nan)
        except ValueError as e:
            raise DataError(f"{p}: row {k}: {e}") from None
        if len(xs[-1]) != LENGTH or not np.isfinite(xs[-1]).all():
            raise DataError(f"{p}: row {k}: expected {LENGTH} finite values")
        ids.append(r[0])
    if not ids:
        raise DataError(f"{p}: no series")
    return ids, np.asarray(xs, np.float32), np.asarray(ys, np.float32)


class Series(Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        self.x = torch.from_numpy(x)
        self.y = None if y is None else torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"inputs": self.x[i]}
        if self.y is not None:
            item["target"] = self.y[i]
        return item


def _split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labelled rows: the last 30 % are the test set (fixed), the rest the labelled pool."""
    lab = np.flatnonzero(np.isfinite(y))
    n_test = max(1, int(round(0.3 * len(lab))))
    return lab[:-n_test], lab[-n_test:]


ENGINE = recipe.EngineDefaults(warmup_cap=10)


@recorded("timeseries", "pretrain")
def pretrain(*, data: opt.Data, out: opt.Out, config: opt.Size = "tiny", steps: opt.Steps = 100, seed: opt.Seed = 0,
             batch_size: opt.BatchSize = 32, lr: opt.LearningRate = 1e-3, resume: opt.Resume = False,
             precision: opt.Precision = "auto", device: opt.Device = "auto", progress: opt.Progress = True,
             checkpoint_every: opt.CheckpointEvery = 0) -> Path:
    """Masked reconstruction on every series (labels never read); returns ``out/model``."""
    out = Path(out)
    _, x, _ = read_series(data)
    mc = ModelConfig(domain="timeseries", task="pretrain", model_type=f"timeseries_mae.{config}",
                     model_kwargs={"length": LENGTH}, geometry={"length": LENGTH})
    model = recipe.build(mc.model_type, mc.model_kwargs, seed=seed)
    tc = recipe.engine(ENGINE, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                       precision=precision, device=device, checkpoint_every=checkpoint_every or max(steps // 2, 1))
    res = recipe.fit(model, Series(x), tc, out_dir=out, config=mc, resume=resume)
    mc.training = {"data": str(data), "steps": steps, "seed": seed}
    return recipe.finish(model, out, mc, {"train_loss": res.last_loss})


def _ridge(x: np.ndarray, y: np.ndarray, xt: np.ndarray, lam: float = 1.0) -> np.ndarray:
    """Ridge regression on the series' amplitude spectrum (the classical baseline)."""
    def feats(a: np.ndarray) -> np.ndarray:
        return np.c_[np.abs(np.fft.rfft(a, axis=1)), np.ones(len(a))]

    f, ft = feats(x), feats(xt)
    w = np.linalg.solve(f.T @ f + lam * np.eye(f.shape[1]), f.T @ y)
    return ft @ w


@recorded("timeseries", "finetune")
def finetune(*, ckpt: opt.Parent, data: opt.Data, out: opt.Out,
             labels: Annotated[int | None, opt.Opt("labelled series to train on (a count of the pool)", low=2)] = None,
             label_fraction: opt.LabelFraction = 1.0, steps: opt.Steps = 100, seed: opt.Seed = 0,
             lr: opt.FinetuneRate = None,
             batch_size: opt.BatchSize = 16, baselines: opt.Baselines = False, config: opt.ParentSize = None,
             mode: opt.Mode = "full", precision: opt.Precision = "auto", device: opt.Device = "auto",
             progress: opt.Progress = True) -> dict:
    """Regress each series' frequency from ``labels`` labelled series of the pool (seeded pick);
    scored on the fixed test series; with ``baselines`` also scratch and ridge."""
    out = Path(out)
    budget = LabelBudget.from_options(labels, label_fraction, pool="labelled series", minimum=2)
    pcfg = recipe.parent_config(ckpt, "timeseries") if ckpt is not None else None
    wanted = recipe.requested_baselines(baselines, ("scratch", "ridge"))
    ids, x, y = read_series(data)
    pool, test = _split(y)
    chosen = np.asarray(budget.pick(pool, seed))
    size = config or (recipe.size_of(pcfg) if pcfg else "tiny")
    mc = ModelConfig(domain="timeseries", task="frequency", model_type=f"timeseries_regressor.{size}",
                     model_kwargs={"length": LENGTH}, geometry={"length": LENGTH})

    def fit(from_ckpt: str | Path | None) -> torch.nn.Module:
        model = recipe.build(mc.model_type, mc.model_kwargs, seed=seed, ckpt=from_ckpt)
        tc = recipe.engine(ENGINE, steps=steps, pretrained=from_ckpt is not None, mode=mode,
                           batch_size=min(batch_size, len(chosen)), lr=lr or 1e-3, seed=seed, progress=progress,
                           precision=precision, device=device)
        recipe.fit(model, Series(x[chosen], y[chosen]), tc, out_dir=None)
        return model

    def mae(model: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"mae": float(np.abs(model.predict(torch.from_numpy(x[test])).numpy() - y[test]).mean())}

    model = fit(ckpt)
    with torch.no_grad():
        pred = model.predict(torch.from_numpy(x[test])).numpy()
    m = {**mae(model), "labels": float(len(chosen)), "test_series": float(len(test))}
    m.update(recipe.run_baselines([b for b in wanted if ckpt is not None or b != "scratch"], {
        "scratch": lambda: mae(fit(None)),
        "ridge": lambda: {"mae": float(np.abs(_ridge(x[chosen], y[chosen], x[test]) - y[test]).mean())}}))
    mc.training = {"from": str(ckpt) if ckpt else "scratch", "data": str(data), "labels": len(chosen), "seed": seed}
    _write_predictions(out / "predictions.csv", [ids[i] for i in test], y[test], pred)
    recipe.finish(model, out, mc, m)
    return m


def _write_predictions(path: Path, ids: list[str], truth: np.ndarray, pred: np.ndarray) -> None:
    atomic_write_text(path, "id,target,prediction\n" + "".join(f"{i},{t:.4f},{p:.4f}\n"
                                                              for i, t, p in zip(ids, truth, pred)))


def load(data: str | Path, *, ckpt: str | Path, config: dict) -> Bundle:
    """The fixed test series of ``data``."""
    ids, x, y = read_series(data)
    _, test = _split(y)
    return Bundle(Path(data), ([ids[i] for i in test], x[test], y[test]), len(test), unit="test series",
                  meta={"test_series": len(test)})


def score(pred: Predictor, bundle: Bundle, *, out: Path | None = None) -> Scored:
    """The mean absolute error of the predicted frequencies."""
    ids, x, y = bundle.items
    p = pred.model.predict(torch.from_numpy(x)).numpy()
    return Scored({"mae": float(np.abs(p - y).mean())}, outputs=(ids, y, p))


def write_outputs(scored: Scored, out: Path) -> list[Path]:
    _write_predictions(out / "predictions.csv", *scored.outputs)
    return [out / "predictions.csv"]


@opt.typed
def evaluate(*, ckpt: opt.Checkpoint, data: opt.Data, out: opt.Out) -> dict:
    """Score a fine-tuned checkpoint on the test series of ``data``."""
    return recipe.evaluate(get_domain("timeseries"), ckpt=ckpt, data=data, out=out)
