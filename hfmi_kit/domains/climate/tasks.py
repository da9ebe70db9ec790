"""Climate pretraining, fine-tuning, evaluation and what-if experiments, end to end."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import xarray as xr

from hfmi_kit import options as opt
from hfmi_kit.checkpoints import resolve as resolve_checkpoint
from hfmi_kit.config import atomic_write_json
from hfmi_kit.data.cf import write_cf
from hfmi_kit.domains.base import Bundle, Scored, get_domain
from hfmi_kit.domains.climate import data as cdata
from hfmi_kit.domains.climate import metrics as M
from hfmi_kit.domains.climate import stream as stream_mod
from hfmi_kit.domains.climate.model import ClimateForecaster, SeaIceExtent
from hfmi_kit.domains.climate.prepare import inspect_store, prepare  # noqa: F401 (the domain's data commands)
from hfmi_kit.errors import CheckpointError, ConfigError, DataError
from hfmi_kit.models import get_size
from hfmi_kit.train import load_pretrained, read_config, recipe
from hfmi_kit.train.env import code_version
from hfmi_kit.train.infer import Predictor, batches, collate, model_device
from hfmi_kit.train.pretrained import ModelConfig
from hfmi_kit.train.provenance import recorded

LOGGER = logging.getLogger(__name__)
ENGINE = recipe.EngineDefaults(warmup_cap=20)
LICENCE = "CC0-1.0 (synthetic data from hfmi_kit's generator); other data: see the file's own licence"


def _card(data: cdata.ClimateData, summary: str, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    src = Path(data.source)
    return {
        "summary": summary,
        "data": [{"file": src.name, "path": str(src), "sha256": cdata.sha256(src),
                  "licence": str(data.global_attrs.get("license", "unknown")),
                  "description": str(data.global_attrs.get("title", ""))}, *(extra or [])],
        "licence": "Apache-2.0 (weights and code)",
    }


def _model_kwargs(data: cdata.ClimateData, *, context: int, patch: tuple[int, int],
                  layout: str = "groups", window: tuple[int, int] = (8, 8)) -> dict[str, Any]:
    mk = {"variables": data.state_vars, "field_forcings": list(data.forcing),
          "scalar_forcings": list(data.scalars), "grid": [int(data.lat.size), int(data.lon.size)],
          "patch": list(patch), "context": context, "lat": [float(x) for x in data.lat],
          "phases": data.step.phases, "periodic": _periodic(data.lon)}
    if layout != "groups":
        mk.update(layout=layout, window=list(window))
    return mk


def _periodic(lon: np.ndarray) -> bool:
    """Whether regularly spaced longitudes go round the globe (a regional grid does not)."""
    if lon.size < 2:
        return False
    step = float(np.median(np.diff(np.sort(lon % 360.0))))
    return abs(step * lon.size - 360.0) < 0.5 * step


def _longest_run(index: np.ndarray) -> int:
    """The length of the longest run of consecutive steps in ``index``."""
    idx = np.unique(np.asarray(index))
    if idx.size == 0:
        return 0
    breaks = np.flatnonzero(np.diff(idx) != 1)
    return int(np.diff(np.r_[-1, breaks, idx.size - 1]).max())


def _patch_for(grid: tuple[int, int], patch: tuple[int, int] | None) -> tuple[int, int]:
    """The patch given, else the largest of 4, 3, 2 that divides the grid, else 4 (the model pads
    the grid to a multiple: a 29 x 49 grid is 8 x 13 patches, not 1,421 one-cell tokens per field)."""
    if patch is not None:
        return patch
    for p in (4, 3, 2):
        if grid[0] % p == 0 and grid[1] % p == 0:
            return (p, p)
    return (min(4, grid[0]), min(4, grid[1]))


Context = Annotated[int, opt.Opt("time steps of history the model sees (months for monthly data)", low=1)]
Leads = Annotated[int, opt.Opt("lead times forecast and scored, in the data's steps", low=1)]
Layout = Annotated[str, opt.Opt("groups: a token per variable and patch, global attention; windowed: a token per "
                                "patch holding every variable, attention in shifted local windows periodic in "
                                "longitude (cost linear in the grid)", choices=("groups", "windowed"))]
Window = Annotated[tuple[int, int], opt.Opt("windowed layout: attention window in (lat, lon) patches")]
Levels = Annotated[Sequence[float] | None, opt.Opt("vertical levels to keep, e.g. 500,850 (hPa for pressure, m for "
                                                   "depth and height; None: every level of the data)")]


Stream = Annotated[bool | None, opt.Opt("read training windows from the Zarr store block by block instead of "
                                        "loading it (None: when the store holds more than 2 GiB of values)")]
CacheDir = Annotated[str | None, opt.Opt("streaming: copy the store to this node-local folder first "
                                         "(e.g. $TMPDIR) and read the copy")]
Workers = opt.Workers
STREAM_ABOVE = 2 * 2**30  # bytes of values above which a Zarr store is streamed by default


def _streams(data: str | Path, stream: bool | None) -> bool:
    """Whether to stream ``data``: as asked, else when it is a Zarr store of over 2 GiB of values."""
    if stream is not None:
        return bool(stream)
    from hfmi_kit.data.cf import is_zarr

    if not is_zarr(data):
        return False
    import warnings

    import zarr

    from hfmi_kit.data.safety import check_zarr

    check_zarr(data)  # what open_cf refuses (a pickle codec, an object dtype) is refused before zarr reads it

    try:  # a damaged store is not measured here: loading it names what is wrong
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            group = zarr.open_group(str(data), mode="r")
            size = sum(int(np.prod(group[k].shape)) * group[k].dtype.itemsize for k in group.array_keys())
    except Exception:  # zarr raises many types for a damaged store
        return False
    return size > STREAM_ABOVE


def _fork_eval(fn: Any) -> Any:
    """Run an evaluation without touching the training RNG (keeps resume exact)."""

    def wrapped(model: torch.nn.Module) -> dict[str, float]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            return fn(model)

    return wrapped


def _val_loss(ds: cdata.ForecastWindows, batch_size: int = 32) -> Any:
    def fn(model: torch.nn.Module) -> dict[str, float]:
        tot, n = 0.0, 0
        for batch in batches(ds, batch_size=batch_size, device=model_device(model)):
            k = len(batch["inputs"])
            tot += float(model(batch)["loss"]) * k
            n += k
        return {"val_loss": tot / max(n, 1)}

    return _fork_eval(fn)


@recorded("climate", "pretrain")
def pretrain(*, data: opt.Data, out: opt.Out, config: opt.Size = "tiny", steps: opt.Steps = 2000,
             seed: opt.Seed = 0,
             resume: opt.Resume = False, variables: opt.Variables = None, levels: Levels = None,
             layout: Layout = "groups", window: Window = (8, 8), batch_size: opt.BatchSize = 16,
             lr: opt.LearningRate = 1e-3, context: Context = 2,
             patch: Annotated[tuple[int, int] | None,
                              opt.Opt("patch size in (lat, lon) cells (None: from the grid)")] = None,
             precision: opt.Precision = "auto", device: opt.Device = "auto", progress: opt.Progress = True,
             checkpoint_every: opt.CheckpointEvery = 0,
             lim_modes: Annotated[int | None, opt.Opt("EOF modes of the skip path's linear inverse model (None: "
                                                  "chosen on the validation years; 0: per-cell regression)",
                                                  low=0)] = None,
             stream: Stream = None, cache_dir: CacheDir = None, workers: Workers = 0,
             activation_checkpointing: Annotated[bool, opt.Opt("recompute each block's activations in the "
                                                               "backward pass (less memory, about a third "
                                                               "more time)")] = False) -> Path:
    """Pretrain the climate backbone (masked reconstruction + next step); returns ``out/model``.
    The defaults are the recipe of the shipped ``climate.tiny`` (2000 steps).

    ``lim_modes``: EOF modes of the skip path's linear inverse model (None: chosen by 12-month
    rollouts on the validation years; 0: the per-cell forced regression instead).
    ``stream``: read the training windows from the Zarr store block by block (see
    :mod:`~hfmi_kit.domains.climate.stream`) instead of loading it; the skip path is then the
    per-cell forced regression, fitted in two streaming passes."""
    out = Path(out)
    streaming = _streams(data, stream)
    if streaming and lim_modes:
        raise ConfigError(f"--lim-modes {lim_modes}: the EOF linear inverse model needs the data in memory; "
                          "a streamed pretraining uses the per-cell regression (--lim-modes 0)")
    d = cdata.load_climate(data, variables=variables, levels=levels, lazy=streaming)
    split = cdata.split_years(d)
    mk = _model_kwargs(d, context=context, patch=_patch_for((d.lat.size, d.lon.size), patch), layout=layout,
                       window=window)
    if activation_checkpointing:
        mk["size_overrides"] = {"activation_checkpointing": True}
    if streaming:
        block = stream_mod.read_block(stream_mod.store_block(data))
        stats = stream_mod.field_statistics(d, split.train, block=block, cache_dir=cache_dir)
        norm = cdata.Normaliser(stats)
        reader = stream_mod.StoreReader(d, norm, cache_dir=cache_dir)
        train: Any = stream_mod.StoreWindows(d, reader, norm, split.train, context=context, block=block)
        val: Any = stream_mod.StoreWindows(d, reader, norm, split.val, context=context, block=block)
        fit = stream_mod.skip_statistics(d, reader, norm, split.train, block=block)
        LOGGER.info("streaming %s: %d training windows in blocks of %d steps", data, len(train), block)
        mk["residual_scale"] = fit["residual_scale"]
        mk["lim_modes"] = 0

        def skip(m: torch.nn.Module) -> None:
            m.set_climatology(fit["climatology"])
            m.set_damping(fit["damping"])
            m.set_forcing_response(fit["forcing_response"], fit["forcing_ref"])
    else:
        stats = cdata.compute_stats(data, d, time_index=split.train)
        norm = cdata.Normaliser(stats)
        tens = cdata.to_tensors(d, norm)
        train = cdata.ForecastWindows(tens, split.train, context=context)
        val = cdata.ForecastWindows(tens, split.val, context=context)
        mk["residual_scale"] = cdata.residual_scale(tens, split.train)
        clim = cdata.climatology(tens, split.train)
        lim = _fit_lim(tens, split, clim, lim_modes)
        mk["lim_modes"] = lim.modes if lim is not None else 0

        def skip(m: torch.nn.Module) -> None:
            _skip_path(m, tens, split, clim, lim)
    model = recipe.build(f"climate_pretrainer.{config}", mk, seed=seed, before_transfer=skip)
    if streaming:
        fit.clear()  # the model holds its own copy of the climatology and the regression
        stream_mod.release_memory()
    tc = recipe.engine(ENGINE, steps=steps, batch_size=batch_size, lr=lr, seed=seed, precision=precision,
                       device=device, progress=progress, eval_every=max(steps // 4, 1),
                       checkpoint_every=checkpoint_every or max(steps // 2, 1), num_workers=workers)
    geometry = d.geometry()
    geometry["split"] = {"train_years": split.train_years, "val_years": split.val_years,
                         "test_years": split.test_years}
    mc = ModelConfig(domain="climate", task="pretrain", model_type=f"climate_pretrainer.{config}",
                     model_kwargs=mk, geometry=geometry, processors={"normalisation": stats},
                     card=_card(d, "Climate foundation model pretrained by masked reconstruction across "
                                   "variables and space-time patches plus next-step prediction."))
    # a streamed validation set is scored in training-sized batches (32 windows of a 1-degree grid are GBs)
    res = recipe.fit(model, train, tc, out_dir=out, config=mc, resume=resume,
                     evaluate=_val_loss(val, batch_size=batch_size if streaming else 32))
    mc.training = {**dataclasses.asdict(tc), "seed": seed, "data": str(data)}
    path = recipe.finish(model, out, mc, {"train_loss": res.last_loss,
                                          **{f"best_{k}": v for k, v in res.best.items()}})
    LOGGER.info("pretrained model written to %s", path)
    return path


def _skip_path(model: torch.nn.Module, tens: cdata.Tensors, split: cdata.Split, clim: torch.Tensor,
               lim: cdata.LinearInverseModel | None) -> None:
    """Set the statistical skip path the network corrects: the monthly climatology of the
    training years plus the linear inverse model ``lim``, or the per-cell forced regression."""
    model.set_climatology(clim)
    if lim is not None:
        model.set_lim(lim)
        return
    a, b, ref = cdata.anomaly_regression(tens, split.train, clim)
    model.set_damping(a)
    model.set_forcing_response(b, ref)


def _fit_lim(tens: cdata.Tensors, split: cdata.Split, clim: torch.Tensor,
             modes: int | None) -> cdata.LinearInverseModel | None:
    """``modes`` None: chosen by 12-month rollouts on the validation years, the per-cell
    regression (None returned) included among the candidates; 0: the per-cell regression."""
    if modes == 0:
        return None
    if modes is not None:
        return cdata.fit_lim(tens, split.train, clim, modes)
    per_cell = cdata.per_cell_rollout_error(tens, split.train, split.val, clim)
    try:
        lim = cdata.choose_lim(tens, split.train, split.val, clim)
    except DataError:
        lim = None
    if lim is None or lim.val_error >= per_cell:
        LOGGER.info("skip path: per-cell forced regression (validation error %.4f; linear inverse model %s)",
                    per_cell, f"{lim.val_error:.4f}" if lim else "none fits")
        return None
    LOGGER.info("skip path: linear inverse model with %d EOF modes (validation error %.4f, per cell %.4f)",
                lim.modes, lim.val_error, per_cell)
    return lim


class ClimatePredictor(Predictor):
    """A climate model with the normalisation of its checkpoint: ``pre`` turns a
    :class:`~.data.ClimateData` (physical units) into the model's normalised tensors,
    ``normaliser.denorm(variable, x)`` brings a predicted field back to physical units."""

    def __init__(self, model: torch.nn.Module, config: dict[str, Any]) -> None:
        stats = (config.get("processors") or {}).get("normalisation")
        if not isinstance(stats, dict):
            raise CheckpointError("a climate model's config has no processors.normalisation (the statistics its "
                                  "inputs are normalised with)")
        self.normaliser = cdata.Normaliser(stats)
        super().__init__(model, pre=lambda d: cdata.to_tensors(d, self.normaliser), config=config)

    def denormalise(self, state: torch.Tensor, variables: list[str]) -> dict[str, np.ndarray]:
        """``state`` (..., V, H, W) in model units as ``{variable: (..., H, W)}`` in physical units."""
        return {v: np.asarray(self.normaliser.denorm(v, state[..., i, :, :].cpu().numpy()))
                for i, v in enumerate(variables)}


def predictor(model: torch.nn.Module, config: dict[str, Any] | None = None) -> ClimatePredictor:
    """The :class:`ClimatePredictor` of a climate checkpoint's model (``config``: its config)."""
    return ClimatePredictor(model, dict(config if config is not None else getattr(model, "hfmi_config", {})))


def load_with_geometry(ckpt: str | Path, data: str | Path) -> tuple[dict[str, Any], cdata.ClimateData]:
    """A climate checkpoint's config and ``data`` loaded on its geometry (variables, grid, land
    mask, normalisation), with a clear error when the data or the checkpoint does not match."""
    cfg = read_config(ckpt)
    if cfg.get("domain") != "climate":
        raise ConfigError(f"{ckpt}: a {cfg.get('domain')!r} checkpoint, not a climate one")
    _check_climate_config(cfg, ckpt)  # the entries the commands read, each named when missing
    geom = cfg["geometry"]
    d = cdata.load_climate(data, expect=geom)
    cdata.check_geometry(d, geom)
    return cfg, d


_GEOMETRY_KEYS = ("state_variables", "field_forcings", "scalar_forcings", "grid")


def _check_climate_config(cfg: dict[str, Any], ckpt: str | Path) -> None:
    """The entries of a climate checkpoint's ``config.json`` the commands read, with their types."""
    f = Path(ckpt) / "config.json"
    for key, typ in (("model_type", str), ("model_kwargs", dict), ("geometry", dict)):
        if key not in cfg:
            raise CheckpointError(f"{f}: no {key!r} entry; not a checkpoint written by hfmi climate pretrain or "
                                  "finetune")
        if not isinstance(cfg[key], typ):
            raise CheckpointError(f"{f}: {key!r} is a {type(cfg[key]).__name__}, expected a {typ.__name__}")
    if "." not in cfg["model_type"]:
        raise CheckpointError(f"{f}: model_type {cfg['model_type']!r} is not FAMILY.SIZE")
    geom = cfg["geometry"]
    missing = [k for k in _GEOMETRY_KEYS if k not in geom]
    if missing:
        raise CheckpointError(f"{f}: geometry lacks {missing}; the checkpoint is incomplete or was edited")
    grid = geom["grid"]
    if not (isinstance(grid, dict) and isinstance(grid.get("lat"), list) and isinstance(grid.get("lon"), list)):
        raise CheckpointError(f"{f}: geometry.grid must hold 'lat' and 'lon' lists")
    norm = (cfg.get("processors") or {}).get("normalisation")
    for v in [*geom["state_variables"], *geom["field_forcings"], *geom["scalar_forcings"]]:
        st = norm.get(v) if isinstance(norm, dict) else None
        if not (isinstance(st, dict) and all(isinstance(st.get(k), (int, float)) for k in ("mean", "std"))):
            raise CheckpointError(f"{f}: processors.normalisation has no numeric mean and std for {v!r}")
    if "context" not in cfg["model_kwargs"]:
        raise CheckpointError(f"{f}: model_kwargs lacks 'context'")


def _extent_series(d: cdata.ClimateData) -> np.ndarray:
    v = _seaice_var(d)
    return M.sea_ice_extent(d.state[v], d.lat, d.valid[v])


def _seaice_var(d: cdata.ClimateData) -> str:
    for v in d.state:
        if d.attrs[v].get("standard_name") == "sea_ice_area_fraction":
            return v
    raise DataError(f"{d.source}: the sea-ice task needs a variable with standard_name sea_ice_area_fraction")


class _ExtentWindows(torch.utils.data.Dataset):
    def __init__(self, base: cdata.ForecastWindows, extent_norm: np.ndarray) -> None:
        self.base, self.ext = base, torch.from_numpy(extent_norm.astype(np.float32))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.base[i])
        item["extent"] = self.ext[self.base.times[i] + 1]
        return item


@recorded("climate", "finetune")
def finetune(*, ckpt: opt.Parent, data: opt.Data, out: opt.Out,
             task: Annotated[str, opt.Opt("forecast (the state, month by month) or seaice (the Arctic "
                                      "extent)")] = "forecast",
             label_fraction: opt.LabelFraction = 1.0, steps: opt.Steps = 300, seed: opt.Seed = 0,
             mode: opt.Mode = "full",
             config: opt.ParentSize = None, batch_size: opt.BatchSize = 16, lr: opt.FinetuneRate = None,
             leads: Leads = 6, levels: Levels = None, layout: Layout = "groups", window: Window = (8, 8),
             rollout_train: Annotated[int | None, opt.Opt("lead times of the autoregressive rollout the loss "
                                                      "averages (None: 6, or as many as the validation and "
                                                      "labelled years hold)", low=1)] = None,
             layer_decay: opt.LayerDecay = None, precision: opt.Precision = "auto",
             device: opt.Device = "auto", progress: opt.Progress = True) -> dict[str, float]:
    """Fine-tune a forecaster (``task='forecast'``) or sea-ice extent model (``'seaice'``).

    With ``ckpt=None`` the same architecture is trained from scratch on the same split
    (``config`` gives the size; the data's statistics are computed here). Defaults follow
    common fine-tuning practice: a pretrained backbone gets LR 5e-4 with layer-wise decay 0.8,
    a model from scratch LR 1e-3 without decay. The forecast loss averages the first
    ``rollout_train`` lead times of an autoregressive rollout (default 6, the evaluated leads, or
    fewer when the validation or labelled years hold no run that long, as with annual steps:
    with 2 the rollout drifted above climatology from lead 4 on).
    Writes ``out/model`` (checkpoint), ``out/metrics.json`` and, for forecasts,
    ``out/forecast.nc`` (CF). Returns the metrics.
    """
    if task not in ("forecast", "seaice"):
        raise ConfigError(f"unknown climate task {task!r}; expected 'forecast' or 'seaice'")
    out = Path(out)
    ckpt = resolve_checkpoint(ckpt)  # a shipped checkpoint's name (climate.tiny) -> its folder
    if ckpt is not None and levels is not None:
        raise ConfigError("--levels chooses the levels of a model trained from scratch; one fine-tuned from "
                          f"{ckpt} reads the levels it was pretrained on")
    if ckpt is not None and (layout, tuple(window)) != ("groups", (8, 8)):
        raise ConfigError(f"--layout and --window choose the layout of a model trained from scratch; one "
                          f"fine-tuned from {ckpt} keeps the layout it was pretrained with")
    if ckpt is not None:
        pcfg, d = load_with_geometry(ckpt, data)
        geom, stats = pcfg["geometry"], pcfg["processors"]["normalisation"]
        size = config or pcfg["model_type"].split(".", 1)[1]
        mk = dict(pcfg["model_kwargs"])
        for k in ("mask_ratio", "mask_strategy", "next_step_weight", "head_hidden"):
            mk.pop(k, None)
    else:
        d = cdata.load_climate(data, levels=levels)
        size = config or "tiny"
    split = cdata.split_years(d)
    if ckpt is None:
        geom, stats = d.geometry(), cdata.compute_stats(data, d, time_index=split.train)
        geom["split"] = {"train_years": split.train_years, "val_years": split.val_years,
                         "test_years": split.test_years}
        mk = _model_kwargs(d, context=2, patch=_patch_for((d.lat.size, d.lon.size), None), layout=layout,
                           window=window)
    norm = cdata.Normaliser(stats)
    tens = cdata.to_tensors(d, norm)
    if "residual_scale" not in mk:
        mk["residual_scale"] = cdata.residual_scale(tens, split.train)
    clim = cdata.climatology(tens, split.train)
    # the pretrained model's skip path (same data, same fit) or, from scratch, one chosen here
    lim = _fit_lim(tens, split, clim, mk.get("lim_modes", 0) if ckpt is not None else None)
    mk["lim_modes"] = lim.modes if lim is not None else 0
    sub = cdata.label_subset(d, split, label_fraction, seed)
    ctx = int(mk["context"])
    dim = get_size(size).dim
    hidden = 0 if mode == "linear_probe" else dim
    family = "climate_forecaster" if task == "forecast" else "climate_seaice"
    model = recipe.build(f"{family}.{size}", {**mk, "head_hidden": hidden}, seed=seed, ckpt=ckpt,
                         before_transfer=lambda m: _skip_path(m, tens, split, clim, lim))
    report = getattr(model, "hfmi_load_report", None)
    if rollout_train is None:
        rollout_train = max(1, min(6, _longest_run(split.val) - ctx, _longest_run(sub) - ctx))
    horizon = rollout_train if task == "forecast" else 1
    train = cdata.ForecastWindows(tens, sub, context=ctx, horizon=horizon)
    val = cdata.ForecastWindows(tens, split.val, context=ctx, horizon=horizon)
    processors: dict[str, Any] = {"normalisation": stats}
    ext_stats = None
    if task == "seaice":
        ext = _extent_series(d)
        tr_ext = ext[split.train]
        ext_stats = {"mean": float(tr_ext.mean()), "std": float(max(tr_ext.std(), 1e-6))}
        processors["target_normalisation"] = ext_stats
        en = (ext - ext_stats["mean"]) / ext_stats["std"]
        train, val = _ExtentWindows(train, en), _ExtentWindows(val, en)
    if lr is None:
        lr = 5e-4 if ckpt is not None else 1e-3
    tc = recipe.engine(ENGINE, steps=steps, pretrained=ckpt is not None, mode=mode, layer_decay=layer_decay,
                       batch_size=min(batch_size, len(train)), lr=lr, seed=seed, precision=precision, device=device,
                       progress=progress, eval_every=max(steps // 5, 1), early_stopping_patience=0)
    geom = {**geom, "label_fraction": label_fraction, "label_years": sorted(set(d.years[sub].tolist()))}
    mc = ModelConfig(domain="climate", task=task, model_type=f"{family}.{size}",
                     model_kwargs={**mk, "head_hidden": hidden}, geometry=geom, processors=processors,
                     card=_card(d, f"Climate {task} model fine-tuned ({mode}) from "
                                   f"{ckpt or 'scratch'} on {label_fraction:.0%} of the training years."))
    recipe.fit(model, train, tc, out_dir=out, config=mc, evaluate=_val_loss(val))
    if task == "forecast":
        metrics, fc = evaluate_forecast(model, d, tens, norm, eval_idx=split.test, clim_idx=split.train,
                                        leads=leads, context=ctx)
        write_cf(fc, out / "forecast.nc")
    else:
        metrics = evaluate_seaice(model, d, tens, ext_stats, eval_idx=split.test, clim_idx=split.train,
                                  context=ctx)
    metrics["label_fraction"] = float(label_fraction)
    metrics["train_samples"] = float(len(train))
    if report is not None:
        metrics["transferred_tensors"] = float(len(report.loaded))
    mc.training = {**dataclasses.asdict(tc), "from": str(ckpt) if ckpt else "scratch",
                   "data": str(data), "rollout_train": rollout_train}
    recipe.finish(model, out, mc, metrics)
    return metrics


@torch.no_grad()
def evaluate_forecast(model: ClimateForecaster, d: cdata.ClimateData, tens: cdata.Tensors,
                      norm: cdata.Normaliser, *, eval_idx: np.ndarray, clim_idx: np.ndarray, leads: int = 6,
                      context: int = 2, batch_size: int = 32) -> tuple[dict[str, float], xr.Dataset]:
    """Roll out from every start time in ``eval_idx``; skill per variable and lead vs baselines.

    Baselines: persistence (the state at t for every lead), the monthly climatology of the
    years in ``clim_idx`` (the training years) and damped anomaly persistence (climatology plus
    the initial anomaly times the lag-1 coefficient of the training years to the power k), and
    the model's own statistical skip path rolled out without the network (``rmse_skip*``: the
    forced linear inverse model, a strong classical baseline; what the network adds is the
    difference). Metrics: latitude-weighted RMSE and ACC; the sea-ice extent error at lead 1 when
    sea ice is present.
    """
    win = cdata.ForecastWindows(tens, eval_idx, context=context, horizon=leads)
    preds, skips = [], []
    for b in batches(win, batch_size=batch_size, device=model_device(model)):
        args = (b["inputs"], b["forcing"], b["scalars"], b["mask"], b["phase"])
        preds.append(model.rollout(*args).cpu())
        skips.append(model.rollout(*args, network=False).cpu())
    pred_n = torch.cat(preds).numpy()  # (N, K, V, H, W) normalised
    skip_n = torch.cat(skips).numpy()
    # classical damped anomaly persistence: the plain lag-1 coefficient (invariant to normalisation)
    damping = cdata.anomaly_damping(tens, clim_idx, model.climatology.cpu()).numpy()
    t0 = np.asarray(win.times)
    ph, phase = d.phase, torch.from_numpy(d.phase)
    metrics: dict[str, float] = {}
    fields: dict[str, np.ndarray] = {}
    for vi, v in enumerate(d.state_vars):
        valid = d.valid[v]
        truth_all = d.state[v]
        clim = cdata.phase_means(torch.from_numpy(truth_all), phase, d.step, clim_idx).numpy()  # NaN on land
        pred_phys = norm.denorm(v, pred_n[:, :, vi]).astype(np.float32)
        pred_phys = np.where(valid, pred_phys, np.nan)
        if d.attrs[v].get("standard_name") == "sea_ice_area_fraction":
            pred_phys = np.clip(pred_phys, 0.0, 1.0)
        fields[v] = pred_phys
        skip_phys = np.where(valid, norm.denorm(v, skip_n[:, :, vi]), np.nan)
        a = damping[vi]
        anom0 = truth_all[t0] - clim[ph[t0]]
        for k in range(1, leads + 1):
            tgt = truth_all[t0 + k]
            cl = clim[ph[t0 + k]]
            p = pred_phys[:, k - 1]
            metrics[f"rmse_{v}_lead{k}"] = M.rmse(p, tgt, d.lat, valid)
            metrics[f"rmse_persistence_{v}_lead{k}"] = M.rmse(truth_all[t0], tgt, d.lat, valid)
            metrics[f"rmse_climatology_{v}_lead{k}"] = M.rmse(cl, tgt, d.lat, valid)
            metrics[f"rmse_damped_persistence_{v}_lead{k}"] = M.rmse(cl + a**k * anom0, tgt, d.lat, valid)
            metrics[f"rmse_skip_{v}_lead{k}"] = M.rmse(skip_phys[:, k - 1], tgt, d.lat, valid)
            metrics[f"acc_{v}_lead{k}"] = M.acc(p, tgt, cl, d.lat, valid)
            metrics[f"acc_persistence_{v}_lead{k}"] = M.acc(truth_all[t0], tgt, cl, d.lat, valid)
    main = cdata.main_variable(d)
    metrics["rmse"] = metrics[f"rmse_{main}_lead1"]
    metrics["rmse_persistence"] = metrics[f"rmse_persistence_{main}_lead1"]
    metrics["rmse_climatology"] = metrics[f"rmse_climatology_{main}_lead1"]
    metrics["rmse_damped_persistence"] = metrics[f"rmse_damped_persistence_{main}_lead1"]
    metrics["rmse_skip"] = metrics[f"rmse_skip_{main}_lead1"]
    metrics["acc"] = metrics[f"acc_{main}_lead1"]
    metrics["acc_persistence"] = metrics[f"acc_persistence_{main}_lead1"]
    try:
        si = _seaice_var(d)
    except DataError:
        si = None
    if si is not None:
        ext_true = M.sea_ice_extent(d.state[si][t0 + 1], d.lat, d.valid[si])
        ext_pred = M.sea_ice_extent(fields[si][:, 0], d.lat, d.valid[si])
        ext_pers = M.sea_ice_extent(d.state[si][t0], d.lat, d.valid[si])
        ce = cdata.phase_means(torch.from_numpy(M.sea_ice_extent(d.state[si], d.lat, d.valid[si])), phase, d.step,
                               clim_idx).numpy()
        metrics["seaice_extent_mae"] = float(np.abs(ext_pred - ext_true).mean())
        metrics["seaice_extent_mae_persistence"] = float(np.abs(ext_pers - ext_true).mean())
        metrics["seaice_extent_mae_climatology"] = float(np.abs(ce[ph[t0 + 1]] - ext_true).mean())
    metrics["eval_samples"] = float(len(t0))
    return metrics, forecast_dataset(d, fields, t0, leads)


def forecast_dataset(d: cdata.ClimateData, fields: dict[str, np.ndarray], t0: np.ndarray, leads: int) -> xr.Dataset:
    """CF-1.8 forecast Dataset: dims (init_time, lead, lat, lon) with a 2-d ``valid_time``."""
    init = d.time[t0]
    valid_time = np.stack([d.time[t0 + k] for k in range(1, leads + 1)], axis=1)
    data_vars = {}
    for v, arr in fields.items():
        a = d.attrs[v]
        attrs = {k: a[k] for k in ("standard_name", "long_name", "units") if k in a}
        attrs["coordinates"] = "valid_time"
        sea = "where sea" in a.get("cell_methods", "")
        attrs["cell_methods"] = "area: mean where sea time: mean" if sea else "time: mean"
        data_vars[v] = (("init_time", "lead", "lat", "lon"), arr.astype(np.float32), attrs)
    ds = xr.Dataset(
        data_vars,
        coords={
            "init_time": ("init_time", init, {"standard_name": "forecast_reference_time",
                                              "long_name": "forecast initialisation time"}),
            "lead": ("lead", np.arange(1, leads + 1, dtype=np.int32),
                     {"long_name": f"forecast lead in steps of {d.step.label}", "units": "1",
                      "step": d.step.label}),
            "valid_time": (("init_time", "lead"), valid_time, {"standard_name": "time",
                                                               "long_name": "validity time"}),
            "lat": ("lat", d.lat, {"standard_name": "latitude", "units": "degrees_north", "axis": "Y",
                                   "long_name": "latitude"}),
            "lon": ("lon", d.lon, {"standard_name": "longitude", "units": "degrees_east", "axis": "X",
                                   "long_name": "longitude"}),
        },
        attrs={"Conventions": "CF-1.8", "title": "hfmi_kit climate forecast",
               "institution": "hfmi_kit", "source": f"hfmi_kit {code_version()} climate_forecaster",
               "history": f"{np.datetime64('now')}: forecast from {Path(d.source).name}",
               "references": "WeatherBench 2 metric definitions", "hfmi_input": Path(d.source).name,
               "hfmi_input_title": str(d.global_attrs.get("title", ""))},
    )
    for v in fields:
        ds[v].encoding["_FillValue"] = np.float32(1e20)
    ds = cdata.gather_levels(ds, d.levels)
    for c in ("init_time", "valid_time"):
        ds[c].encoding.update({"units": "days since 1970-01-01", "calendar": d.step.calendar})
    return ds


@torch.no_grad()
def evaluate_seaice(model: SeaIceExtent, d: cdata.ClimateData, tens: cdata.Tensors,
                    ext_stats: dict[str, float] | None, *, eval_idx: np.ndarray, clim_idx: np.ndarray,
                    context: int = 2) -> dict[str, float]:
    """Sea-ice extent error at t+1 [10^6 km²] against persistence and monthly climatology."""
    if ext_stats is None:
        raise ConfigError("sea-ice evaluation needs the extent normalisation of the checkpoint")
    ext = _extent_series(d)
    win = cdata.ForecastWindows(tens, eval_idx, context=context)
    b = collate([win[j] for j in range(len(win))], keys=("inputs", "forcing", "scalars"), where="sea-ice evaluation")
    dev = model_device(model)
    pred = model.predict(b["inputs"].to(dev), b["forcing"][:, 0].to(dev), b["scalars"][:, 0].to(dev)).cpu().numpy()
    pred = pred * ext_stats["std"] + ext_stats["mean"]
    t0 = np.asarray(win.times)
    truth = ext[t0 + 1]
    ph = d.phase
    ce = cdata.phase_means(torch.from_numpy(np.asarray(ext, dtype=np.float64)), torch.from_numpy(ph), d.step,
                           clim_idx).numpy()
    return {
        "extent_mae": float(np.abs(pred - truth).mean()),
        "extent_mae_persistence": float(np.abs(ext[t0] - truth).mean()),
        "extent_mae_climatology": float(np.abs(ce[ph[t0 + 1]] - truth).mean()),
        "eval_samples": float(len(t0)),
    }


@dataclasses.dataclass
class Held:
    """The items of a climate evaluation: the data on the checkpoint's geometry, the start times
    to score (``eval_idx``) and the steps the climatology baselines are taken over (``clim_idx``)."""

    data: cdata.ClimateData
    eval_idx: np.ndarray
    clim_idx: np.ndarray


def load(data: str | Path, *, ckpt: str | Path, config: dict[str, Any]) -> Bundle:
    """``data`` on the checkpoint's geometry and the years it did not train on.

    When ``data`` is the file the checkpoint was trained on (same sha256 as in its model card),
    evaluation covers the years outside its train and validation years and the climatology
    baseline uses the training years. An independent file is evaluated on all its years, with
    the climatology of those years (in-sample, marked by ``climatology_in_sample`` = 1).
    """
    _check_climate_config(config, ckpt)  # the entries the commands read, each named when missing
    geom = config["geometry"]
    d = cdata.load_climate(data, expect=geom)
    cdata.check_geometry(d, geom)
    sp = geom.get("split", {})
    trained_on = {f.get("sha256") for f in config.get("card", {}).get("data", [])}
    if cdata.sha256(data) in trained_on:
        seen = set(sp.get("train_years", ())) | set(sp.get("val_years", ()))
        eval_idx = np.flatnonzero(~np.isin(d.years, list(seen)))
        clim_idx = np.flatnonzero(np.isin(d.years, list(sp.get("train_years", ()))))
        in_sample = False
    else:
        eval_idx = clim_idx = np.arange(d.time.size)
        in_sample = True
    return Bundle(Path(data), Held(d, eval_idx, clim_idx), int(eval_idx.size), unit="year of this file",
                  meta={"climatology_in_sample": float(in_sample)})


def score(pred: ClimatePredictor, bundle: Bundle, *, out: Path | None = None, leads: int = 6) -> Scored:
    """A forecaster: rolled out ``leads`` steps from every held-out start time and scored against
    persistence, climatology, damped persistence and its own skip path (:func:`evaluate_forecast`;
    the outputs are the forecast as a CF dataset). A sea-ice extent model: its error at t+1
    against persistence and climatology (:func:`evaluate_seaice`; no outputs)."""
    held: Held = bundle.items
    d, cfg = held.data, pred.config
    tens = pred.pre(d)
    ctx = int(cfg["model_kwargs"]["context"])
    if isinstance(pred.model, ClimateForecaster):
        metrics, fc = evaluate_forecast(pred.model, d, tens, pred.normaliser, eval_idx=held.eval_idx,
                                        clim_idx=held.clim_idx, leads=leads, context=ctx)
        return Scored(metrics, outputs=fc)
    if isinstance(pred.model, SeaIceExtent):
        return Scored(evaluate_seaice(pred.model, d, tens, cfg.get("processors", {}).get("target_normalisation"),
                                      eval_idx=held.eval_idx, clim_idx=held.clim_idx, context=ctx))
    raise ConfigError(f"{pred.source}: a {cfg.get('model_type')} checkpoint; evaluate needs a fine-tuned one")


def write_outputs(scored: Scored, out: Path) -> list[Path]:
    """``forecast.nc`` (CF-1.8) of a forecaster's evaluation; nothing for a sea-ice model."""
    if scored.outputs is None:
        return []
    write_cf(scored.outputs, out / "forecast.nc")
    return [out / "forecast.nc"]


@opt.typed
def evaluate(*, ckpt: opt.Checkpoint, data: opt.Data, out: opt.Out, leads: Leads = 6) -> dict[str, float]:
    """Metrics of a fine-tuned checkpoint on ``data``: the years it did not train on (see
    :func:`load`), written to ``out/metrics.json`` with the forecast (:func:`write_outputs`)."""
    return recipe.evaluate(get_domain("climate"), ckpt=ckpt, data=data, out=out, score_options={"leads": leads})


@opt.typed
@torch.no_grad()
def whatif(*, ckpt: opt.Checkpoint, data: opt.Data, out: opt.Out,
           co2_factor: Annotated[float, opt.Opt("CO2 of the what-if, as a multiple of the baseline's", above=0)] = 2.0,
           horizon: Annotated[int, opt.Opt("steps of the data rolled out (months for monthly data)", low=1)] = 24,
           members: Annotated[int, opt.Opt("ensemble members (perturbed initial states)", low=1)] = 8,
           average_from: Annotated[int, opt.Opt("first step of the averaged response", low=0)] = 12,
           perturbation: Annotated[float, opt.Opt("initial-state noise, in standard deviations", low=0)] = 0.05,
           truth: Annotated[bool, opt.Opt("re-run the built-in generator with the same change, when the data "
                                      "came from it, and score the response against it")] = True,
           base_ppm: Annotated[float | None, opt.Opt("baseline CO2 in ppm (None: its value at the start)",
                                                 above=0)] = None,
           seed: opt.Seed = 0) -> dict[str, float]:
    """Ensemble what-if: change CO2 by ``co2_factor`` and roll the forecaster out.

    Starts from the first test-year state; the baseline holds CO2 at ``base_ppm`` (default: its
    value at that time) and the what-if at ``base_ppm * co2_factor``; each member perturbs the normalised initial state
    with Gaussian noise (``perturbation`` standard deviations). Baseline and changed runs use
    the same perturbed states and the seasonal insolation of the data. The response is the
    mean (changed - baseline) over steps ``average_from``..``horizon`` (steps of the data: months
    for monthly data, years for annual means). When the data came from
    the built-in generator and ``truth`` is set, the generator is re-run from its saved state with
    the same change (``members`` weather realisations) and the pattern correlation and
    amplitude ratio of the response are reported. Writes ``out/whatif.nc`` and
    ``out/metrics.json``; the response by step has a ``step`` axis, whose ``step`` attribute
    names the data's step (``1 month``, ``1 year``).
    """
    if not average_from < horizon:
        raise ConfigError(f"--average-from must lie in [0, {horizon - 1}] (before --horizon {horizon}), "
                          f"got {average_from}")
    out = Path(out)
    cfg, d = load_with_geometry(ckpt, data)
    pred = predictor(load_pretrained(ckpt), cfg)
    model, norm = pred.model, pred.normaliser
    if not isinstance(model, ClimateForecaster):
        raise ConfigError(f"{ckpt}: what-if needs a fine-tuned forecaster, got {cfg.get('model_type')}")
    tens = pred.pre(d)
    split = cdata.split_years(d)
    ctx = int(cfg["model_kwargs"]["context"])
    t0 = int(split.test[ctx - 1])
    mo = d.phase
    # forcing for the rollout: seasonal insolation by climatological bin (month of year), CO2 held
    # at its t0 value
    f_by_month = cdata.phase_means(tens.forcing, tens.phase, d.step, np.arange(d.time.size))
    steps_mo = (mo[t0] + 1 + np.arange(horizon)) % d.step.phases
    forcing = f_by_month[torch.from_numpy(steps_mo)][None]  # (1, K, F, H, W)
    sc_names = list(d.scalars)
    if not sc_names:
        raise DataError(f"{data}: no CO2 forcing variable; a what-if needs one")
    if base_ppm is None:
        base_ppm = float(280.0 * np.exp(d.scalars[sc_names[0]][t0] / 5.35))
    new_ppm = base_ppm * co2_factor
    seen = 280.0 * np.exp(d.scalars[sc_names[0]][split.train] / 5.35)
    if not seen.min() * 0.999 <= new_ppm <= seen.max() * 1.001:
        LOGGER.warning("what-if CO2 %.0f ppm lies outside the training range %.0f-%.0f ppm: extrapolation",
                       new_ppm, seen.min(), seen.max())
    s = norm.stats[sc_names[0]]
    base_s = torch.full((1, horizon, 1), (float(cdata.co2_to_forcing(base_ppm)) - s["mean"]) / s["std"])
    new_s = torch.full((1, horizon, 1), (float(cdata.co2_to_forcing(new_ppm)) - s["mean"]) / s["std"])
    gen = torch.Generator().manual_seed(seed)
    x0 = tens.state[t0 - ctx + 1 : t0 + 1][None]  # (1, C, V, H, W)
    mask = tens.mask[None]
    x = (x0 + perturbation * torch.randn((members, *x0.shape[1:]), generator=gen)) * mask[:, None]
    month = torch.full((members,), int(steps_mo[0]))
    rb = model.rollout(x, forcing.expand(members, -1, -1, -1, -1), base_s.expand(members, -1, -1), mask, month)
    rc = model.rollout(x, forcing.expand(members, -1, -1, -1, -1), new_s.expand(members, -1, -1), mask, month)
    resp: dict[str, np.ndarray] = {}
    changed, held = pred.denormalise(rc, d.state_vars), pred.denormalise(rb, d.state_vars)  # (M, K, H, W) each
    for v in d.state_vars:
        resp[v] = np.where(d.valid[v], changed[v] - held[v], np.nan)
    metrics: dict[str, float] = {"co2_base_ppm": base_ppm, "co2_whatif_ppm": new_ppm,
                                 "members": float(members), "horizon_steps": float(horizon)}
    if d.step.label == "1 month":
        metrics["months"] = float(horizon)  # the key's old spelling, true only of monthly data
    data_vars: dict[str, Any] = {}
    true_resp: dict[str, np.ndarray] = {}
    gen_cfg = d.global_attrs.get("hfmi_generator_config")
    if truth and gen_cfg:
        true_resp = _generator_response(json.loads(gen_cfg), d, t0, horizon, base_ppm, new_ppm, members, seed,
                                        average_from)
    for v, r in resp.items():
        window = r[:, average_from:].mean(axis=1)  # (M, H, W)
        mean, spread = window.mean(0), window.std(0)
        valid = d.valid[v]
        a = d.attrs[v]
        w = M.lat_weights(d.lat) * valid
        metrics[f"{v}_response_global"] = float(np.nansum(mean * w) / w.sum())
        metrics[f"{v}_response_spread"] = float(np.nansum(spread * w) / w.sum())
        base = {"units": a.get("units", ""), "cell_methods": "time: mean"}
        data_vars[f"{v}_response"] = (("lat", "lon"), mean.astype(np.float32),
                                      {**base, "long_name": f"ensemble-mean response of {v} to CO2 x{co2_factor}"})
        data_vars[f"{v}_response_spread"] = (("lat", "lon"), spread.astype(np.float32),
                                             {**base, "long_name": f"ensemble spread of the {v} response"})
        data_vars[f"{v}_response_by_step"] = (("step", "lat", "lon"), r.mean(0).astype(np.float32),
                                              {"units": base["units"],
                                               "long_name": f"ensemble-mean {v} response by step after the change"})
        if v in true_resp:
            tr = true_resp[v]
            pm, pt = np.nan_to_num(mean), np.nan_to_num(tr)
            metrics[f"{v}_pattern_correlation"] = M.pattern_correlation(pm, pt, d.lat, valid)
            metrics[f"{v}_amplitude_ratio"] = M.amplitude_ratio(pm, pt, d.lat, valid)
            metrics[f"{v}_response_global_true"] = float(np.nansum(tr * w) / w.sum())
            data_vars[f"{v}_response_true"] = (("lat", "lon"), tr.astype(np.float32),
                                               {**base, "long_name": f"generator's true response of {v}"})
    if true_resp:
        main = cdata.main_variable(d)
        metrics["pattern_correlation"] = metrics[f"{main}_pattern_correlation"]
        metrics["amplitude_ratio"] = metrics[f"{main}_amplitude_ratio"]
    ds = xr.Dataset(
        data_vars,
        coords={"lat": ("lat", d.lat, {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"}),
                "lon": ("lon", d.lon, {"standard_name": "longitude", "units": "degrees_east", "axis": "X"}),
                "step": ("step", np.arange(1, horizon + 1, dtype=np.int32),
                         {"long_name": f"steps of {d.step.label} after the forcing change", "units": "1",
                          "step": d.step.label})},
        attrs={"Conventions": "CF-1.8", "title": "hfmi_kit what-if experiment",
               "institution": "hfmi_kit", "source": f"hfmi_kit {code_version()} climate_forecaster",
               "history": f"{np.datetime64('now')}: CO2 x{co2_factor} from {str(d.time[t0])[:10]}, "
                          f"{members} members, steps {average_from + 1}-{horizon} of {d.step.label} averaged",
               "references": "CO2 forcing 5.35 ln(C/C0), Myhre et al. 1998",
               "hfmi_input_title": str(d.global_attrs.get("title", ""))},
    )
    for v in ds.data_vars:
        ds[v].encoding["_FillValue"] = np.float32(1e20)
    write_cf(cdata.gather_levels(ds, d.levels), out / "whatif.nc")
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _generator_response(gcfg: dict[str, Any], d: cdata.ClimateData, t0: int, months: int, base_ppm: float,
                        new_ppm: float, members: int, seed: int, avg_from: int) -> dict[str, np.ndarray]:
    """True response from the generator: branch from the saved state after month t0."""
    from hfmi_kit.domains.climate import generator as G

    gcfg = dict(gcfg)
    gcfg["co2_levels"] = tuple(gcfg.get("co2_levels", ()))
    cfg = G.GeneratorConfig(**gcfg)
    co2 = 280.0 * np.exp(d.scalars[list(d.scalars)[0]].astype(np.float64) / 5.35)
    _, states = G.generate(cfg, co2_ppm=co2, return_states=True)
    start = states[t0 + 1]
    start_month = int(d.phase[t0 + 1])  # generator data are monthly: the bin is the month of year
    acc: dict[str, list[np.ndarray]] = {}
    for m in range(members):
        b = G.branch(cfg, start, np.full(months, base_ppm), start_month, seed=10_000 + seed * 100 + m)
        c = G.branch(cfg, start, np.full(months, new_ppm), start_month, seed=10_000 + seed * 100 + m)
        for v in ("tas", "tos", "siconc"):  # the generator's own variable names
            if v in d.state:
                acc.setdefault(v, []).append((c[v][avg_from:] - b[v][avg_from:]).mean(0))
    return {v: np.mean(a, axis=0) for v, a in acc.items()}
