"""Materials pretraining, few-label fine-tuning under k-fold cross-validation with baselines,
evaluation and prediction tables."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hfmi_kit import options as opt
from hfmi_kit.checkpoints import resolve as resolve_checkpoint
from hfmi_kit.domains.base import Bundle, Scored, get_domain
from hfmi_kit.domains.materials import chem
from hfmi_kit.domains.materials.model import IGNORE, MaterialsEnsemble, MaterialsNet
from hfmi_kit.domains.materials.pv import sq_limit
from hfmi_kit.domains.materials.tables import BUNDLED, PropertyTable, load_property_csv
from hfmi_kit.errors import ConfigError, DataError
from hfmi_kit.models import create_model
from hfmi_kit.train import TrainConfig, load_pretrained, recipe
from hfmi_kit.train.budget import LabelBudget
from hfmi_kit.train.infer import Predictor, collate
from hfmi_kit.train.loop import read_log
from hfmi_kit.train.pretrained import ModelConfig, read_weights, transfer_weights
from hfmi_kit.train.progress import Status
from hfmi_kit.train.provenance import recorded

LOGGER = logging.getLogger(__name__)
Target = Annotated[str | None, opt.Opt("the table's column holding the values in eV (None: the column 'target')")]
ENGINE = recipe.EngineDefaults(warmup_cap=50, weight_decay=0.05)
LICENCE = "Apache-2.0 (weights and code); data: see the provenance table"


class CompositionSet(Dataset):
    """Rows of encoded compositions with their ``target`` (when ``y`` is given) and, with ``mlm``,
    a masked copy: ``mlm_elements`` hides a random ~``mask_prob`` of the elements (at least one,
    never all) behind the [MASK] id and ``mlm_target`` holds what was hidden. The mask of a row
    depends only on (seed, epoch, row), so a resumed run draws the same masks (the trainer calls
    :meth:`set_epoch`)."""

    def __init__(self, arrays: dict[str, np.ndarray], idx: Sequence[int], y: np.ndarray | None = None, *,
                 mlm: bool = False, mask_prob: float = 0.3, mask_id: int = chem.MAX_Z, seed: int = 0) -> None:
        self.a = {k: torch.from_numpy(v[np.asarray(idx)]) for k, v in arrays.items()}
        self.y = None if y is None else torch.as_tensor(np.asarray(y)[np.asarray(idx)], dtype=torch.float32)
        self.mlm, self.mask_prob, self.mask_id = mlm, mask_prob, mask_id
        self.seed, self.epoch = seed, 0
        if not mlm and self.y is None:
            raise ConfigError("CompositionSet needs targets unless mlm=True")

    def __len__(self) -> int:
        return len(self.a["elements"])

    def set_epoch(self, epoch: int) -> None:
        """Draw the masks of ``epoch`` (called by the trainer at the start of each epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        inputs = {k: v[i] for k, v in self.a.items()}
        item: dict[str, Any] = {"inputs": inputs}
        if self.y is not None:
            item["target"] = self.y[i]
        if self.mlm:
            n = int((~inputs["padding"]).sum())
            tgt = torch.full_like(inputs["elements"], IGNORE)
            el = inputs["elements"].clone()
            if n >= 2:
                k = max(1, min(n - 1, int(round(self.mask_prob * n))))
                gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 100_000_007 + i) % 2**63)
                pick = torch.randperm(n, generator=gen)[:k]
                tgt[pick] = el[pick]
                el[pick] = self.mask_id
            item["mlm_elements"], item["mlm_target"] = el, tgt
        return item


def _encode(table: PropertyTable, max_elements: int | None = None) -> dict[str, np.ndarray]:
    return chem.encode(table.parsed, max_elements)


def _data_entry(table: PropertyTable, role: str) -> dict[str, Any]:
    desc = next((d for f, d in BUNDLED.values() if f == table.name), "user-supplied CSV")
    licence = "MIT (Matbench via CrabNet); see data/SOURCES.md" if table.name in {f for f, _ in BUNDLED.values()} \
        else "as given by the data owner"
    return {"file": table.name, "sha256": table.sha256, "licence": licence, "description": f"{desc} ({role})",
            "rows": len(table), "rejected_rows": len(table.rejected)}


def _train_net(model: MaterialsNet, ds: Dataset, *, steps: int, batch_size: int, lr: float, seed: int,
               layer_decay: float = 1.0, mode: str = "full", precision: str = "auto", device: str = "auto",
               progress: bool = False, out_dir: Path | None = None, model_config: ModelConfig | None = None,
               weight_decay: float = 0.05, checkpoint_every: int = 0,
               resume: bool = False) -> tuple[TrainConfig, dict[str, float]]:
    """Train one net; returns its config and the last logged training record (loss, l1, ...)."""
    tc = recipe.engine(ENGINE, steps=steps, layer_decay=layer_decay, mode=mode, batch_size=min(batch_size, len(ds)),
                       lr=lr, seed=seed, precision=precision, device=device, progress=progress,
                       weight_decay=weight_decay, log_every=max(10, steps // 20), checkpoint_every=checkpoint_every)
    res = recipe.fit(model, ds, tc, out_dir=out_dir, config=model_config, resume=resume)
    history = res.history
    if resume and out_dir is not None and not any(r.get("split") == "train" for r in history):
        history = read_log(out_dir / "metrics.jsonl")  # a finished stage resumed: its own log
    last = next((r for r in reversed(history) if r.get("split") == "train"), {})
    if math.isnan(res.last_loss) and "loss" in last:
        res.last_loss = float(last["loss"])
    return tc, {"loss": res.last_loss, **{k: float(v) for k, v in last.items() if k in ("l1", "mlm_accuracy")}}


@recorded("materials", "pretrain")
def pretrain(*, data: opt.Data = "mp_gap", out: opt.Out, config: opt.Size = "tiny", steps: opt.Steps = 3000,
             supervised_steps: Annotated[int | None, opt.Opt("steps of the supervised second stage (None: --steps; "
                                                         "0 skips it)", low=0)] = None,
             target: Target = None,
             exclude: Annotated[str | Path | None, opt.Opt("a table whose compositions are removed first (None "
                                                       "keeps all)")] = "expt_gap",
             seed: opt.Seed = 0, resume: opt.Resume = False, batch_size: opt.BatchSize = 256,
             lr: opt.LearningRate = 1e-3,
             mask_prob: Annotated[float, opt.Opt("share of the elements masked", above=0, high=1)] = 0.3,
             precision: opt.Precision = "auto", device: opt.Device = "auto", progress: opt.Progress = True,
             variables: opt.Variables = None,
             checkpoint_every: opt.CheckpointEvery = 0) -> Path:
    """Two-stage pretraining on a large computed set (default: the bundled 106k DFT band gaps).

    The defaults are the recipe of the shipped ``materials.tiny`` checkpoint (3000 + 3000 steps).

    Stage 1, ``steps`` of masked-element prediction on every composition; stage 2,
    ``supervised_steps`` (default ``steps``; 0 skips it) of regression on the set's values with
    the masked-element loss kept on (so the backbone does not forget it).
    Every composition of ``exclude`` (default: the bundled experimental gaps; None keeps all) is
    removed first, so no fine-tuning test composition is ever seen in pretraining. Each stage
    checkpoints every ``checkpoint_every`` steps (0: half-way) under ``out/stage1_mlm`` and
    ``out/stage2_supervised``; ``resume`` continues each stage from its latest checkpoint (a
    finished stage is not re-run). Returns ``out/model``.
    """
    out = Path(out)
    table = load_property_csv(data, target=target, duplicates="keep")
    n_all = len(table)
    excluded = 0
    if exclude is not None:
        ex = load_property_csv(exclude, duplicates="mean")
        table = table.without(ex.reduced)
        excluded = n_all - len(table)
    if not len(table):
        raise DataError(f"{data}: no compositions left after excluding those of {exclude}")
    arrays = _encode(table)
    model = recipe.build(f"materials_net.{config}", {}, seed=seed)
    mconf = ModelConfig(
        domain="materials", task="pretrain", model_type=f"materials_net.{config}",
        geometry={"elements": list(chem.element_symbols()), "max_elements": int(arrays["elements"].shape[1]),
                  "property": "band_gap", "unit": "eV"},
        card={"summary": (f"Composition foundation model: masked-element pretraining on {len(table)} compositions"
                          f", then supervised pretraining on their {table.name} values."),
              "data": [_data_entry(table, "pretraining")], "licence": LICENCE,
              "intended_use": "research on composition-property models for photovoltaic absorbers",
              "limitations": "composition only: polymorphs and structure are not seen"})
    uniq = sorted({r: i for i, r in enumerate(table.reduced)}.values())
    LOGGER.info("stage 1: masked elements on %d unique compositions (%d excluded)", len(uniq), excluded)
    ds = CompositionSet(arrays, uniq, mlm=True, mask_prob=mask_prob, seed=seed)
    tc1, rec1 = _train_net(model, ds, steps=steps, batch_size=batch_size, lr=lr, seed=seed, precision=precision,
                            device=device, progress=progress, out_dir=out / "stage1_mlm", model_config=mconf,
                            checkpoint_every=checkpoint_every or max(steps // 2, 1), resume=resume)
    metrics = {"mlm_loss": rec1["loss"], "mlm_accuracy": _mlm_accuracy(model, arrays, uniq, mask_prob, seed),
               "compositions": float(len(uniq)), "excluded_compositions": float(excluded)}
    s2 = steps if supervised_steps is None else supervised_steps
    if s2 > 0:
        LOGGER.info("stage 2: supervised %s on %d rows", table.name, len(table))
        model.train()
        ds2 = CompositionSet(arrays, range(len(table)), table.y, mlm=True, mask_prob=mask_prob, seed=seed + 1)
        _, rec2 = _train_net(model, ds2, steps=s2, batch_size=batch_size, lr=lr, seed=seed, precision=precision,
                              device=device, progress=progress, out_dir=out / "stage2_supervised",
                              model_config=mconf, checkpoint_every=checkpoint_every or max(s2 // 2, 1),
                              resume=resume)
        metrics["supervised_loss"] = rec2["loss"]
        metrics["supervised_l1_ev"] = rec2.get("l1", float("nan"))  # last logged batch
        metrics["mlm_accuracy_after_supervised"] = _mlm_accuracy(model, arrays, uniq, mask_prob, seed)
    mconf.training = {**dataclasses.asdict(tc1), "supervised_steps": s2, "mask_prob": mask_prob,
                      "data": str(data), "exclude": str(exclude), "seed": seed}
    return recipe.finish(model, out, mconf, metrics)


@torch.no_grad()
def _mlm_accuracy(model: MaterialsNet, arrays: dict[str, np.ndarray], idx: Sequence[int], mask_prob: float,
                  seed: int, n: int = 4096) -> float:
    """Masked-element top-1 accuracy on up to ``n`` compositions (fresh masks)."""
    model.eval()
    ds = CompositionSet(arrays, list(idx)[:n], mlm=True, mask_prob=mask_prob, seed=seed + 2)
    dev = next(model.parameters()).device
    b = collate([ds[i] for i in range(len(ds))], device=dev, where="masked-element accuracy")
    return float(model(b)["mlm_accuracy"])


INPUTS = ("elements", "fractions", "padding")  # the model's inputs, as encoded by :func:`_encode`


def predictor(model: MaterialsEnsemble | MaterialsNet, config: dict[str, Any] | None = None, *,
              calibrated: bool = True) -> Predictor:
    """The model's predictor: ``(K, B)`` member locations and Laplace scales (float64; K = 1 for a
    single net) of a batch of encoded compositions; ``calibrated`` applies the checkpoint's
    recalibration (``processors.calibration.uncertainty_scale``, fitted on the out-of-fold errors
    of cross-validation so that mean +- 1.645 std holds 90 % of them): the spread around the
    ensemble mean and every scale are multiplied by it, which multiplies the total std by it."""
    cfg = config if config is not None else getattr(model, "hfmi_config", {})
    s = float((cfg or {}).get("processors", {}).get("calibration", {}).get("uncertainty_scale", 1.0))

    def fn(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        args = (b["elements"], b["fractions"], b["padding"])
        mu, sc = model.predict_all(*args) if isinstance(model, MaterialsEnsemble) else model.predict(*args)
        return mu.reshape(-1, mu.shape[-1]), sc.reshape(-1, sc.shape[-1])

    def post(out: tuple[torch.Tensor, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        mu, sc = (t.cpu().numpy().astype(np.float64) for t in out)
        if not calibrated or s == 1.0:
            return mu, sc
        mean = mu.mean(0, keepdims=True)
        return mean + s * (mu - mean), s * sc

    return Predictor(model, model_fn=fn, post=post, config=cfg)


def _predict(pred: Predictor, arrays: dict[str, np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    outs = pred.over_arrays(arrays, batch_size=batch_size, keys=INPUTS)
    return np.concatenate([o[0] for o in outs], axis=1), np.concatenate([o[1] for o in outs], axis=1)


def predict_arrays(model: MaterialsEnsemble | MaterialsNet, arrays: dict[str, np.ndarray],
                   batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) member locations and (K, N) Laplace scales (K = 1 for a single net), uncalibrated."""
    return _predict(predictor(model, {}, calibrated=False), arrays, batch_size)


def predict_calibrated(model: MaterialsEnsemble, cfg: dict[str, Any],
                       arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Member locations and scales with the checkpoint's recalibration applied (see :func:`predictor`)."""
    return _predict(predictor(model, cfg), arrays, 2048)


def ensemble_moments(mu: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and total standard deviation of a mixture of Laplace members: the members' spread
    (epistemic) plus their mean variance ``2 b^2`` (aleatoric)."""
    return mu.mean(0), np.sqrt(mu.var(0) + (2 * scale**2).mean(0))


@torch.no_grad()
def embed_arrays(model: MaterialsEnsemble | MaterialsNet, arrays: dict[str, np.ndarray],
                 batch_size: int = 2048) -> np.ndarray:
    """(N, D) pooled composition embeddings."""
    model.eval()
    dev = next(model.parameters()).device
    outs = []
    for s in range(0, len(arrays["elements"]), batch_size):
        b = [torch.from_numpy(arrays[k][s:s + batch_size]).to(dev) for k in ("elements", "fractions", "padding")]
        outs.append(model.embed(*b))
    return torch.cat(outs).cpu().numpy()


def fit_ensemble(ckpt: str | Path | None, arrays: dict[str, np.ndarray], y: np.ndarray, idx: Sequence[int], *,
                 size: str = "tiny", members: int = 3, steps: int = 1000, epochs: float = 60.0,
                 batch_size: int = 64, lr: float | None = None, layer_decay: float | None = None,
                 mode: str = "full", seed: int = 0, precision: str = "auto", device: str = "auto",
                 progress: bool = False, status: Status | None = None, label: str = "ensemble"
                 ) -> tuple[MaterialsEnsemble, dict[str, Any]]:
    """Train a deep ensemble on rows ``idx``: each member from the pretrained weights of ``ckpt``
    (or from scratch when None) with its own seed (data order, head init).

    Steps follow the label count: ``min(steps, max(150, epochs * N / batch))``, so a 50-label run
    does not grind thousands of epochs. Each member is a part of ``status`` (named ``label``,
    member k/n). Returns the ensemble and its training settings.
    """
    n = len(idx)
    bs = min(batch_size, n)
    eff = int(min(steps, max(150, math.ceil(epochs * n / bs))))
    weights = read_weights(ckpt) if ckpt is not None else None
    lr = lr if lr is not None else 1e-3
    if layer_decay is None:
        layer_decay = ENGINE.layer_decay if ckpt is not None and mode == "full" else 1.0
    nets = []
    status = status or Status("", members, enabled=False)
    for k in range(members):
        with status.part(f"{label}, member {k + 1}/{members} ({eff} steps on {n} rows)"):
            torch.manual_seed(seed * 1000 + k)
            member = create_model(f"materials_net.{size}")
            if weights is not None:
                transfer_weights(member, weights)
            _train_net(member, CompositionSet(arrays, idx, y), steps=eff, batch_size=bs, lr=lr,
                       seed=seed * 1000 + k, layer_decay=layer_decay, mode=mode, precision=precision,
                       device=device, progress=progress)
            nets.append(member)
    ens = create_model(f"materials_ensemble.{size}", members=0)  # an empty shell for the trained members
    ens.members.extend(nets)
    ens.eval()
    return ens, {"steps": eff, "batch_size": bs, "lr": lr, "layer_decay": layer_decay, "mode": mode,
                 "members": members, "from": str(ckpt) if ckpt else "scratch", "labels": n}


def _metrics(y: np.ndarray, pred: np.ndarray, suffix: str = "") -> dict[str, float]:
    err = pred - y
    return {f"mae_ev{suffix}": float(np.abs(err).mean()), f"rmse_ev{suffix}": float(np.sqrt((err**2).mean()))}


def _uncertainty_metrics(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> dict[str, float]:
    from scipy.stats import spearmanr

    err = np.abs(mean - y)
    return {"coverage_1sigma": float((err <= std).mean()), "coverage_2sigma": float((err <= 2 * std).mean()),
            "coverage_90": float((err <= 1.645 * std).mean()),
            "mean_uncertainty_ev": float(std.mean()),
            "spearman_error_uncertainty": float(spearmanr(err, std).statistic) if std.std() > 0 else 0.0}


def random_forest(X_train: np.ndarray, y_train: np.ndarray, *, seed: int = 0, trees: int = 300) -> Any:
    """The classical baseline: a random forest on Magpie composition features (Matbench's RF-Magpie)."""
    from sklearn.ensemble import RandomForestRegressor

    rf = RandomForestRegressor(n_estimators=trees, min_samples_leaf=1, max_features=1 / 3, n_jobs=-1,
                               random_state=seed)
    return rf.fit(X_train, y_train)


def choose_labels(pool: np.ndarray, labels: int | None, seed: int) -> np.ndarray:
    """``labels`` rows of ``pool`` (all when None), picked by :class:`LabelBudget` (nested: a
    smaller budget is a prefix of a larger one)."""
    budget = LabelBudget(count=labels, pool="training rows of a fold")
    return np.asarray(budget.pick(np.sort(pool), seed), dtype=np.asarray(pool).dtype)


def cross_validate(ckpt: str | Path | None, table: PropertyTable, *, labels: int | None = None, folds: int = 5,
                   members: int = 3, steps: int = 1000, batch_size: int = 64, lr: float | None = None,
                   layer_decay: float | None = None, mode: str = "full", size: str = "tiny",
                   baselines: Sequence[str] = (), seed: int = 0, precision: str = "auto", device: str = "auto",
                   progress: bool = False, max_elements: int | None = None, status: Status | None = None
                   ) -> tuple[dict[str, float], Any]:
    """k-fold CV: in each fold the model (and ``baselines``: ``scratch``, ``rf``, ``dummy``) trains on
    ``labels`` rows of the other folds and predicts the held-out fold. Every network trained is a
    part of ``status``. Returns pooled metrics over all out-of-fold predictions and the per-row
    prediction frame."""
    import pandas as pd
    from sklearn.model_selection import KFold

    if folds < 2 or folds > len(table):
        raise ConfigError(f"folds must lie in [2, {len(table)}], got {folds}")
    arrays = _encode(table, max_elements)
    y = table.y
    X = chem.magpie_features(table.parsed) if "rf" in baselines else None
    n = len(table)
    cols: dict[str, np.ndarray] = {"prediction": np.zeros(n), "uncertainty": np.zeros(n), "fold": np.zeros(n, int)}
    for b in baselines:
        cols[f"pred_{b}"] = np.zeros(n)
    fold_mae = []
    settings: dict[str, Any] = {}
    for k, (tr, te) in enumerate(KFold(folds, shuffle=True, random_state=seed).split(np.arange(n))):
        chosen = choose_labels(tr, labels, seed + k)
        LOGGER.info("fold %d/%d: %d labelled, %d test", k + 1, folds, len(chosen), len(te))
        kw = {"members": members, "steps": steps, "batch_size": batch_size, "mode": mode, "size": size,
              "seed": seed + k, "precision": precision, "device": device, "progress": progress}
        ens, settings = fit_ensemble(ckpt, arrays, y, chosen, lr=lr, layer_decay=layer_decay, status=status,
                                     label=f"fold {k + 1}/{folds}", **kw)
        mean, std = ensemble_moments(*predict_arrays(ens, {a: v[te] for a, v in arrays.items()}))
        cols["prediction"][te], cols["uncertainty"][te], cols["fold"][te] = mean, std, k
        fold_mae.append(float(np.abs(mean - y[te]).mean()))
        if "scratch" in baselines:
            kw["mode"] = "full"
            ens_s, _ = fit_ensemble(None, arrays, y, chosen, status=status, label=f"fold {k + 1}/{folds}, scratch",
                                    **kw)
            cols["pred_scratch"][te] = predict_arrays(ens_s, {a: v[te] for a, v in arrays.items()})[0].mean(0)
        if "rf" in baselines:
            assert X is not None
            cols["pred_rf"][te] = random_forest(X[chosen], y[chosen], seed=seed + k).predict(X[te])
        if "dummy" in baselines:
            cols["pred_dummy"][te] = y[chosen].mean()
    metrics = {**_metrics(y, cols["prediction"]), "mae_ev_fold_std": float(np.std(fold_mae)),
               **_uncertainty_metrics(y, cols["prediction"], cols["uncertainty"])}
    for b in baselines:
        metrics.update(_metrics(y, cols[f"pred_{b}"], f"_{b}"))
    metrics.update({"folds": float(folds), "labels_per_fold": float(len(chosen)), "rows": float(n),
                    "ensemble_members": float(members), "train_steps": float(settings["steps"])})
    frame = pd.DataFrame({"formula": table.formula, "reduced_formula": table.reduced, "target_ev": y,
                          "prediction_ev": cols["prediction"], "uncertainty_ev": cols["uncertainty"],
                          "fold": cols["fold"], **{f"prediction_{b}_ev": cols[f"pred_{b}"] for b in baselines},
                          "chemistry": [chem.chemistry_class(p) for p in table.parsed], "source": table.source})
    frame["sq_limit_pct"] = 100 * sq_limit(frame["prediction_ev"].to_numpy())
    return metrics, frame


def _write_table(frame: Any, path: Path) -> Path:
    """Write a prediction table atomically as CSV (or Parquet when ``path`` ends in .parquet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        frame.to_parquet(tmp, index=False)
    else:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(path)
    return path


def _write_rejections(table: PropertyTable, out: Path) -> None:
    if table.rejected:
        import pandas as pd

        _write_table(pd.DataFrame(table.rejected), out / "rejected_rows.csv")
        LOGGER.warning("%s: %d row(s) rejected (%s); see %s", table.name, len(table.rejected),
                       table.rejection_summary(), out / "rejected_rows.csv")


def check_rows_for_cv(table: PropertyTable, folds: int, data: str | Path) -> int:
    """The training rows of the smallest cross-validation fold, after checking that ``table`` has
    enough rows for ``folds`` folds with at least 2 training rows each.

    Raises:
        DataError: naming the file, its usable (and rejected) rows and how many are needed.
    """
    n = len(table)

    def smallest_train(rows: int) -> int:
        return rows - math.ceil(rows / folds)

    need = folds
    while smallest_train(need) < 2:
        need += 1
    if n < need:
        rejected = f" ({len(table.rejected)} more rejected)" if table.rejected else ""
        raise DataError(f"{data}: too few rows for {folds}-fold cross-validation: {n} usable row(s){rejected}, "
                        f"at least {need} needed")
    return smallest_train(n)


def _check_rows_to_train(table: PropertyTable, data: str | Path) -> int:
    """The rows a run without cross-validation trains on (at least 2)."""
    if len(table) < 2:
        raise DataError(f"{data}: {len(table)} usable row(s); at least 2 are needed to train")
    return len(table)


def _materials_checkpoint_config(ckpt: str | Path) -> dict[str, Any]:
    """The config of a materials checkpoint to fine-tune from, checked before any data is read."""
    return recipe.parent_config(ckpt, "materials")


@recorded("materials", "finetune")
def finetune(*, ckpt: opt.Parent, data: opt.Data = "expt_gap", out: opt.Out,
             task: Annotated[str, opt.Opt("band_gap: the band gap in eV, with an uncertainty")] = "band_gap",
             target: Target = None,
             labels: Annotated[int | None, opt.Opt("labelled rows per fold (None: every training row of the fold, "
                                               "or --label-fraction of them)", low=2)] = None,
             label_fraction: opt.LabelFraction = 1.0,
             folds: Annotated[int, opt.Opt("cross-validation folds (0: none, only the final ensemble on every "
                                           "row, to score with hfmi evaluate on a test file of your own)",
                                           low=0)] = 5,
             members: Annotated[int, opt.Opt("ensemble members (seeds)", low=1)] = 3,
             steps: opt.Steps = 1000, batch_size: opt.BatchSize = 64, lr: opt.FinetuneRate = None,
             layer_decay: opt.LayerDecay = None, mode: opt.Mode = "full", config: opt.ParentSize = None,
             baselines: opt.Baselines = False,
             final: Annotated[bool, opt.Opt("also train an ensemble on the whole set, saved to out/model")] = True,
             seed: opt.Seed = 0, precision: opt.Precision = "auto",
             device: opt.Device = "auto", progress: opt.Progress = True) -> dict[str, float]:
    """Fine-tune on measured values (default: the 4,604 experimental band gaps) with ``labels`` per fold.

    Scores are k-fold cross-validated (``folds``; every row is predicted once by a model that
    never saw it). With ``baselines`` (True, or a subset of ``scratch``, ``rf``, ``dummy``) the
    same folds and labels also train the model from scratch, a random forest on Magpie features
    and a mean predictor: ``mae_ev_scratch``, ``mae_ev_rf``, ``mae_ev_dummy``. With ``final`` an
    ensemble trained on ``labels`` rows of the whole set is saved to ``out/model``.
    ``folds=0`` skips the cross-validation (for a user who brings their own split): only the
    final ensemble is trained, its uncertainty left uncalibrated (``uncertainty_scale`` 1).
    Writes ``metrics.json``, ``cv_predictions.csv`` and ``rejected_rows.csv`` (when rows were
    rejected).
    """
    if task != "band_gap":
        raise ConfigError(f"unknown materials task {task!r}; expected 'band_gap'")
    if folds == 1:
        raise ConfigError("--folds must be 0 (no cross-validation) or an integer >= 2, got 1")
    if folds == 0 and (baselines or not final):
        raise ConfigError("--folds 0 skips the cross-validation: " + (
            "--baselines are scored on its folds (give --folds 2 or more)" if baselines
            else "with --final false nothing would be trained"))
    out = Path(out)
    ckpt = resolve_checkpoint(ckpt)  # a shipped checkpoint's name (materials.tiny) -> its folder
    pcfg = _materials_checkpoint_config(ckpt) if ckpt is not None else None
    table = load_property_csv(data, target=target)
    min_train = check_rows_for_cv(table, folds, data) if folds else _check_rows_to_train(table, data)
    if labels is not None and labels > min_train:
        raise ConfigError(f"--labels {labels} is more than the {min_train} training rows of the smallest fold "
                          f"({folds}-fold cross-validation of the {len(table)} usable rows of {data})")
    label_budget = LabelBudget.from_options(labels, label_fraction, pool="training rows of a fold", minimum=2)
    if label_budget.fraction is not None:  # a share of a fold's training rows, the same count in every fold
        labels = min(min_train, label_budget.size(len(table) * (folds - 1) / folds if folds else len(table)))
    wanted = ("scratch", "rf", "dummy") if baselines is True else tuple(baselines or ())
    unknown = set(wanted) - {"scratch", "rf", "dummy"}
    if unknown:
        raise ConfigError(f"unknown baselines {sorted(unknown)}; expected scratch, rf, dummy")
    if ckpt is None:
        wanted = tuple(b for b in wanted if b != "scratch")
    size, max_el = config or "tiny", None
    if pcfg is not None:
        size = recipe.size_of(pcfg)
    nets = members * (folds * (1 + ("scratch" in wanted)) + final)  # every network this run trains
    with Status("materials finetune", nets, enabled=progress) as status:
        if folds:
            metrics, frame = cross_validate(ckpt, table, labels=labels, folds=folds, members=members, steps=steps,
                                            batch_size=batch_size, lr=lr, layer_decay=layer_decay, mode=mode,
                                            size=size, baselines=wanted, seed=seed, precision=precision,
                                            device=device, progress=False, max_elements=max_el, status=status)
            # recalibration for the saved model: the factor that makes the central 90 % interval
            # (mean +- 1.645 std) hold 90 % of the out-of-fold errors (the CV coverage above stays raw)
            z = np.abs(frame["prediction_ev"] - frame["target_ev"]) / frame["uncertainty_ev"].clip(lower=1e-6)
            metrics["uncertainty_scale"] = float(np.quantile(z, 0.90) / 1.645)
        else:
            LOGGER.warning("--folds 0: no cross-validation; the ensemble's uncertainty is its raw spread (not "
                           "recalibrated) and there is no score: run hfmi evaluate on a test file")
            metrics, frame = {"folds": 0.0, "uncertainty_scale": 1.0}, None
        metrics["rows_rejected"] = float(len(table.rejected))
        _write_rejections(table, out)  # outputs only once every check passed: a failed run leaves --out as it was
        if frame is not None:
            _write_table(frame, out / "cv_predictions.csv")
        ens, mconf = None, None
        if final:
            arrays = _encode(table)
            chosen = choose_labels(np.arange(len(table)), labels, seed)
            if not folds:
                metrics["labels"] = float(len(chosen))
            ens, settings = fit_ensemble(ckpt, arrays, table.y, chosen, size=size, members=members, steps=steps,
                                         batch_size=batch_size, lr=lr, layer_decay=layer_decay, mode=mode,
                                         seed=seed, precision=precision, device=device, status=status,
                                         label="final ensemble")
            mconf = ModelConfig(
                domain="materials", task="band_gap", model_type=f"materials_ensemble.{size}",
                model_kwargs={"members": members},
                geometry={"elements": list(chem.element_symbols()), "property": "band_gap", "unit": "eV"},
                processors={"calibration": {"uncertainty_scale": metrics["uncertainty_scale"]}},
                card={"summary": (f"Deep ensemble ({members} members) of composition models fine-tuned "
                                  f"({mode}) from {ckpt or 'scratch'} on {len(chosen)} measured band gaps; "
                                  + (f"{folds}-fold CV MAE {metrics['mae_ev']:.3f} eV." if folds
                                     else "not cross-validated (uncertainty not recalibrated).")),
                      "data": [_data_entry(table, "fine-tuning")], "licence": LICENCE,
                      "intended_use": "screening band gaps of inorganic compositions for photovoltaics",
                      "limitations": "composition only; uncertainty is the ensemble spread (see coverage)"},
                training={**settings, "data": str(data), "target": target, "seed": seed,
                          "formulas": [table.reduced[i] for i in chosen]})
    recipe.finish(ens, out, mconf, metrics)
    return metrics


def load_ensemble(ckpt: str | Path) -> tuple[MaterialsEnsemble, dict[str, Any]]:
    """A fine-tuned materials ensemble and its config (weights only: safetensors)."""
    cfg = recipe.parent_config(ckpt, "materials", task="band_gap")
    model = load_pretrained(ckpt)
    if not isinstance(model, MaterialsEnsemble):
        raise ConfigError(f"{ckpt}: {cfg.get('model_type')} is not an ensemble")
    model.eval()
    return model, cfg


def predict_table(ckpt: str | Path, formulas: Sequence[str] | PropertyTable, *,
                  provenance: Sequence[str] | None = None) -> Any:
    """Predictions for formulas: formula, prediction, uncertainty (total std of the ensemble, see
    :func:`ensemble_moments`, recalibrated by :func:`predict_calibrated`), SQ limit (%) at the
    predicted gap and its spread over members, and provenance (model, input source)."""
    model, cfg = load_ensemble(ckpt)
    return _prediction_frame(model, cfg, ckpt, formulas, provenance)


def _prediction_frame(model: MaterialsEnsemble, cfg: dict[str, Any], ckpt: str | Path,
                      formulas: Sequence[str] | PropertyTable, provenance: Sequence[str] | None) -> Any:
    import pandas as pd

    if isinstance(formulas, PropertyTable):
        parsed, src = formulas.parsed, formulas.source
    else:
        parsed = [chem.parse_formula(f) for f in formulas]
        src = list(provenance) if provenance is not None else ["input"] * len(parsed)
    mu, scale = predict_calibrated(model, cfg, chem.encode(parsed))
    mean, std = ensemble_moments(mu, scale)
    sq = 100 * sq_limit(mu.reshape(-1)).reshape(mu.shape)
    return pd.DataFrame({"formula": [q.formula for q in parsed], "reduced_formula": [q.reduced for q in parsed],
                         "prediction_ev": mean, "uncertainty_ev": std,
                         "sq_limit_pct": 100 * sq_limit(mean), "sq_limit_member_std_pct": sq.std(0),
                         "source": list(src), "model": str(ckpt),
                         "model_code_version": cfg.get("code_version", "")})


def load(data: str | Path, *, ckpt: str | Path, config: dict[str, Any], target: str | None = None) -> Bundle:
    """The compositions of the CSV ``data`` the checkpoint was not trained on (its card's
    training formulas left out, and counted); rejected rows are kept for ``rejected_rows.csv``."""
    table = load_property_csv(data, target=target)
    test = table.without(set(config.get("training", {}).get("formulas", [])))
    return Bundle(Path(data), (table, test), len(test), unit="composition",
                  meta={"rows": len(test), "rows_seen_in_training": len(table) - len(test),
                        "rows_rejected": len(table.rejected)})


def score(pred: Predictor, bundle: Bundle, *, out: Path | None = None) -> Scored:
    """MAE, RMSE, R2 and the calibration of the uncertainty of the ensemble on the held-out
    compositions; the outputs are the prediction table (with the measured values) and the table
    whose rejected rows are written beside it (both by :func:`write_outputs`; ``out`` is unused)."""
    table, test = bundle.items
    if not isinstance(pred.model, MaterialsEnsemble):
        raise ConfigError(f"{pred.source}: {pred.config.get('model_type')} is not an ensemble")
    frame = _prediction_frame(pred.model, pred.config, pred.source or "", test, None)
    frame.insert(2, "target_ev", test.y)
    y, mu, sd = test.y, frame["prediction_ev"].to_numpy(), frame["uncertainty_ev"].to_numpy()
    return Scored({**_metrics(y, mu), **_uncertainty_metrics(y, mu, sd)}, outputs=(table, frame))


def write_outputs(scored: Scored, out: Path) -> list[Path]:
    """``predictions.csv`` and, when rows were rejected, ``rejected_rows.csv``."""
    table, frame = scored.outputs
    _write_rejections(table, out)
    return [_write_table(frame, out / "predictions.csv")]


@opt.typed
def evaluate(*, ckpt: opt.Checkpoint, data: opt.Data, out: opt.Out, target: Target = None) -> dict[str, float]:
    """Score a fine-tuned ensemble on a CSV of measured values; compositions it was trained on are
    left out (and counted). Writes ``metrics.json`` and ``predictions.csv``."""
    return recipe.evaluate(get_domain("materials"), ckpt=ckpt, data=data, out=out, load_options={"target": target})


def curve_rows(metrics: dict[str, float], *, pretrained: bool = True) -> list[dict[str, Any]]:
    """Label-efficiency rows (``method``, ``labels``, ``mae_ev``, ``rmse_ev``) from one CV's metrics."""
    n = int(metrics["labels_per_fold"])
    rows = [{"method": "pretrained" if pretrained else "model", "labels": n, "mae_ev": metrics["mae_ev"],
             "rmse_ev": metrics["rmse_ev"]}]
    for name in ("scratch", "rf", "dummy"):
        if f"mae_ev_{name}" in metrics:
            rows.append({"method": name, "labels": n, "mae_ev": metrics[f"mae_ev_{name}"],
                         "rmse_ev": metrics[f"rmse_ev_{name}"]})
    return rows


@torch.no_grad()
def guess_masked_element(model: MaterialsNet, formula: str, hide: str, k: int = 5) -> list[tuple[str, float]]:
    """Hide element ``hide`` of ``formula`` (its amount stays) and return the model's top-``k``
    guesses with probabilities: what the masked-element pretraining learned."""
    p = chem.parse_formula(formula)
    if hide not in p.elements:
        raise DataError(f"{hide!r} is not an element of {formula!r} ({list(p.elements)})")
    a = {key: torch.from_numpy(v) for key, v in chem.encode([p]).items()}
    pos = p.elements.index(hide)
    a["elements"][0, pos] = model.num_elements  # [MASK]
    model.eval()
    z, tb = model.encode(a["elements"], a["fractions"], a["padding"])
    prob = torch.softmax(model.mlm_head(z, tb)[0, pos].float(), -1)
    top = torch.topk(prob, k)
    syms = chem.element_symbols()
    return [(syms[int(i)], float(v)) for v, i in zip(top.values, top.indices)]
