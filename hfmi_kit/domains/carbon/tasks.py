"""Carbon: prepare a region, pretrain on unlabelled tiles, fine-tune biomass quantiles on field
plots with baselines, map biomass / carbon / uncertainty, and sum a regional budget."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hfmi_kit import options as opt
from hfmi_kit.data.windows import blend_windows
from hfmi_kit.domains.base import Bundle, Scored, get_domain
from hfmi_kit.domains.carbon import sources as S
from hfmi_kit.domains.carbon.model import CarbonEnsemble, CarbonNet
from hfmi_kit.domains.carbon.synth import CARBON_FRACTION, write_geotiff
from hfmi_kit.errors import ConfigError, DataError
from hfmi_kit.models import get_size
from hfmi_kit.train import load_pretrained, recipe
from hfmi_kit.train.budget import LabelBudget
from hfmi_kit.train.infer import Predictor
from hfmi_kit.train.pretrained import ModelConfig
from hfmi_kit.train.provenance import recorded

LOGGER = logging.getLogger(__name__)
Tile = Annotated[int, opt.Opt("edge of the square training tiles, in grid cells", low=1)]
ENGINE = recipe.EngineDefaults(warmup_cap=30, weight_decay=0.05)
Z90 = 1.6449  # two-sided 90 % normal interval


@dataclass
class Prepared:
    """A region on its target grid: per epoch the normalised fields (group -> (H, W), NaN where
    absent, padded with NaN to whole tiles), the plots and, when known, the true biomass."""

    root: Path
    grid: S.Grid
    epochs: list[int]
    specs: list[S.SourceSpec]
    fields: list[dict[str, np.ndarray]]
    plots: list[S.Plots]
    truth: list[np.ndarray] | None
    shape: tuple[int, int]  # unpadded map shape

    @property
    def groups(self) -> list[str]:
        return [g for s in self.specs for g in s.groups()]


def prepare(data: str | Path, *, tile: int = 32, crs: str | None = None, resolution: float | None = None,
            groups: Sequence[str] | None = None) -> Prepared:
    """Read every source and plot of ``data`` onto the target grid (see :func:`.sources.target_grid`)."""
    region = S.open_region(data)
    grid = S.target_grid(region, crs=crs, resolution=resolution)
    H, W = grid.shape
    Hp, Wp = -(-H // tile) * tile, -(-W // tile) * tile
    fields, plots = [], []
    for e, year in enumerate(region.epochs):
        raw = S.read_sources(region, e, grid)
        f: dict[str, np.ndarray] = {}
        for spec in region.sources:
            if spec.name not in raw:
                continue
            for b, band in enumerate(spec.bands):
                arr = np.full((Hp, Wp), np.nan, dtype=np.float32)
                arr[:H, :W] = (raw[spec.name][b] - spec.offset[b]) / spec.scale[b]
                f[f"{spec.name}:{band}"] = arr
        if groups is not None:
            f = {g: v for g, v in f.items() if g in groups}
        fields.append(f)
        plots.append(S.read_plots(region, year, grid))
    truth = None
    tfiles = region.meta.get("truth", {}).get("agb")
    if tfiles:
        spec = S.SourceSpec("truth", "", "raster", ("agb",), "Mg ha-1", (0.0,), (1.0,))
        truth = [S.read_raster(region.root / t, spec, grid)[0] for t in tfiles]
    return Prepared(root=region.root, grid=grid, epochs=region.epochs, specs=region.sources, fields=fields,
                    plots=plots, truth=truth, shape=(H, W))


def _crop(f: dict[str, np.ndarray], r: int, c: int, tile: int) -> dict[str, torch.Tensor]:
    return {g: torch.from_numpy(np.ascontiguousarray(v[r:r + tile, c:c + tile])) for g, v in f.items()}


class TileCrops(Dataset):
    """Random tiles of every epoch (unlabelled; pretraining), with random flips and rotations:
    ``{"inputs": {source group: (tile, tile)}}``."""

    def __init__(self, prep: Prepared, *, tile: int, length: int = 100_000, seed: int = 0) -> None:
        self.prep, self.tile, self.length, self.seed = prep, tile, length, seed

    def __len__(self) -> int:
        return self.length

    def _augment(self, item: dict[str, torch.Tensor], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        out = {}
        for g, v in item.items():
            v = torch.rot90(v, k, (0, 1))
            out[g] = torch.flip(v, (1,)) if flip else v
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, i))
        e = int(rng.integers(len(self.prep.fields)))
        H, W = self.prep.shape
        r, c = int(rng.integers(0, max(1, H - self.tile + 1))), int(rng.integers(0, max(1, W - self.tile + 1)))
        return {"inputs": self._augment(_crop(self.prep.fields[e], r, c, self.tile), rng)}


class PlotCrops(TileCrops):
    """Tiles around the training plots, ``{"inputs": {...}, "target": (tile, tile), "plot_index":
    (tile, tile)}``: ``target`` holds the biomass of the cells the plots cover
    (per cell for stem-mapped plots, else the plot's biomass), NaN elsewhere. Each plot and epoch
    is drawn equally often, the tile placed at random but covering the plot's centre."""

    def __init__(self, prep: Prepared, plot_ids: Sequence[str], *, tile: int, length: int = 100_000,
                 seed: int = 0) -> None:
        super().__init__(prep, tile=tile, length=length, seed=seed)
        keep = set(plot_ids)
        self.labels = []  # per epoch (H, W) NaN except training plots
        self.index = []  # per epoch (H, W) the plot each labelled cell belongs to, -1 elsewhere
        self.where = []  # (epoch, row, col) of each training plot's centre
        for e, p in enumerate(prep.plots):
            shape = prep.fields[e][next(iter(prep.fields[e]))].shape
            lab = np.full(shape, np.nan, dtype=np.float32)
            idx = np.full(shape, -1, dtype=np.int64)
            cells = p.cells(keep)
            lab[p.pix_rows[cells], p.pix_cols[cells]] = p.pix_agb[cells]
            idx[p.pix_rows[cells], p.pix_cols[cells]] = p.pix_plot[cells]
            self.where += [(e, int(r), int(c)) for pid, r, c in zip(p.ids, p.rows, p.cols) if pid in keep]
            self.labels.append(lab)
            self.index.append(idx)
        if not self.where:
            raise DataError("no training plots selected")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, i))
        e, r, c = self.where[int(rng.integers(len(self.where)))]
        H, W = self.prep.shape
        r0 = int(rng.integers(max(0, r - self.tile + 1), min(r, H - self.tile) + 1))
        c0 = int(rng.integers(max(0, c - self.tile + 1), min(c, W - self.tile) + 1))
        item = _crop(self.prep.fields[e], r0, c0, self.tile)
        item["target"] = torch.from_numpy(np.ascontiguousarray(self.labels[e][r0:r0 + self.tile, c0:c0 + self.tile]))
        item["plot_index"] = torch.from_numpy(np.ascontiguousarray(self.index[e][r0:r0 + self.tile, c0:c0 + self.tile]))
        item = self._augment(item, rng)  # sources, target and plot index turned alike
        target, plot_index = item.pop("target"), item.pop("plot_index")
        return {"inputs": item, "target": target, "plot_index": plot_index}


def split_plots(prep: Prepared) -> tuple[list[str], list[str]]:
    """(pool, test) plot ids: a fixed 30 % of the plots (by a hash of the id) are held out."""
    ids = sorted({pid for p in prep.plots for pid in p.ids})
    test = [i for i in ids if int(hashlib.sha256(i.encode()).hexdigest(), 16) % 10 < 3]
    return [i for i in ids if i not in set(test)], test


def _card(prep: Prepared, summary: str) -> dict[str, Any]:
    meta = S.open_region(prep.root).meta
    return {"summary": summary, "licence": "Apache-2.0 (weights and code)",
            "data": [{"file": prep.root.name, "path": str(prep.root), "licence": meta.get("licence", "unknown"),
                      "description": meta.get("description", ""),
                      "sha256": hashlib.sha256((prep.root / "region.json").read_bytes()).hexdigest()}],
            "intended_use": "research on multi-source biomass mapping and carbon budgets",
            "limitations": "trained on one region; sources must be described as in region.json"}


@recorded("carbon", "pretrain")
def pretrain(*, data: opt.Data, out: opt.Out, config: opt.Size = "tiny", steps: opt.Steps = 300, seed: opt.Seed = 0,
             resume: opt.Resume = False, batch_size: opt.BatchSize = 16, lr: opt.LearningRate = 1e-3, tile: Tile = 32,
             patch: Annotated[int, opt.Opt("edge of the square patches (tokens), in pixels", low=1)] = 8,
             mask_ratio: opt.MaskRatio = 0.5, precision: opt.Precision = "auto", device: opt.Device = "auto",
             progress: opt.Progress = True, variables: opt.Variables = None,
             crs: Annotated[str | None, opt.Opt("CRS of the common grid, e.g. EPSG:32633 (None: the region's)")] = None,
             resolution: Annotated[float | None, opt.Opt("cell size of the common grid in CRS units (None: the "
                                                     "region's)", above=0)] = None,
             checkpoint_every: opt.CheckpointEvery = 0) -> Path:
    """Masked multi-source reconstruction on unlabelled tiles of every epoch: whole sources are
    hidden and predicted from the others. Plots are never read as labels. Step checkpoints every
    ``checkpoint_every`` steps (0: half-way). Returns ``out/model``."""
    out = Path(out)
    prep = prepare(data, tile=tile, crs=crs, resolution=resolution)
    groups = [g for g in prep.groups if variables is None or g.split(":", 1)[0] in variables]
    if not groups:
        raise DataError(f"{data}: no sources left (variables={list(variables or [])})")
    mk = {"groups": groups, "tile": tile, "patch": patch, "mask_ratio": mask_ratio}
    model = recipe.build(f"carbon_net.{config}", mk, seed=seed)
    tc = recipe.engine(ENGINE, steps=steps, batch_size=batch_size, lr=lr, seed=seed, precision=precision,
                       device=device, progress=progress, checkpoint_every=checkpoint_every or max(steps // 2, 1))
    mc = ModelConfig(domain="carbon", task="pretrain", model_type=f"carbon_net.{config}", model_kwargs=mk,
                     geometry={"grid": prep.grid.describe(), "sources": S.sources_json(prep.specs), "tile": tile},
                     card=_card(prep, "Multi-source foundation model (optical, radar, lidar CHM) pretrained by "
                                      "masked source reconstruction on unlabelled tiles."))
    res = recipe.fit(model, TileCrops(prep, tile=tile, seed=seed), tc, out_dir=out, config=mc, resume=resume)
    mc.training = {**dataclasses.asdict(tc), "data": str(data)}
    return recipe.finish(model, out, mc, {"train_loss": res.last_loss})


def _tiled(model: CarbonNet, fields: dict[str, np.ndarray], shape: tuple[int, int], fn: Any, channels: int,
           batch_size: int) -> np.ndarray:
    """``fn(batch) -> (B, channels, tile, tile)`` over tiles at half-tile stride, overlaps averaged
    (:func:`hfmi_kit.data.windows.blend_windows`)."""
    model.eval()
    t = model.tile
    grid = next(iter(fields.values())).shape
    out = blend_windows(fn, lambda c: _crop(fields, c[0], c[1], t), grid, t, channels=channels, overlap=0.5,
                        batch_size=batch_size, device=next(model.parameters()).device)
    H, W = shape
    return out[:, :H, :W]


def embed_map(model: CarbonNet, fields: dict[str, np.ndarray], shape: tuple[int, int], *,
              batch_size: int = 8) -> np.ndarray:
    """The per-pixel embedding (F, H, W) of :meth:`.CarbonNet.embedding`, tiles averaged."""
    F_ = model.trunk[1].out_features + len(model.groups)
    return _tiled(model, fields, shape, lambda b: model.embedding(b).permute(0, 3, 1, 2), F_, batch_size)


@torch.no_grad()
def predict_map(model: CarbonNet, fields: dict[str, np.ndarray], shape: tuple[int, int], *,
                batch_size: int = 8) -> np.ndarray:
    """Biomass maps (Q + 1, H, W) [Mg/ha], the quantiles then the mean: tiles at half-tile
    stride, overlaps averaged. A forest head maps the averaged embedding (the features it was
    fitted on, see :func:`embed_map`)."""
    Q = len(model.quantiles) + 1
    if isinstance(model, CarbonEnsemble):  # each head as it maps alone, then averaged
        net = _tiled(model, fields, shape, model.network_predict, Q, batch_size).clip(min=0)
        return 0.5 * (net + predict_map(model.forest_net, fields, shape, batch_size=batch_size))
    if model.has_forest:
        emb = embed_map(model, fields, shape, batch_size=batch_size)
        F_, H, W = emb.shape
        x = torch.from_numpy(emb.reshape(F_, -1).T.copy())
        out = torch.cat([model._forest_quantiles(x[i:i + 8192]) for i in range(0, x.shape[0], 8192)], 1)
        return out.numpy().reshape(Q, H, W).clip(min=0)
    return _tiled(model, fields, shape, model.predict, Q, batch_size).clip(min=0)


def pixel_features(prep: Prepared, e: int) -> np.ndarray:
    """(H*W, bands) per-pixel source values (NaN where absent) for the random-forest baseline."""
    H, W = prep.shape
    return np.stack([v[:H, :W].ravel() for v in prep.fields[e].values()], axis=1)


def random_forest(prep: Prepared, train_ids: set[str], seed: int) -> Any:
    """The classical baseline: a random forest on the per-pixel source values of the cells the
    training plots cover (every epoch; the same labels the network learns from), to be applied
    to :func:`pixel_features`."""
    W = prep.shape[1]
    X, y = [], []
    for e, p in enumerate(prep.plots):
        cells = p.cells(train_ids)
        X.append(pixel_features(prep, e)[p.pix_rows[cells] * W + p.pix_cols[cells]])
        y.append(p.pix_agb[cells])
    return _forest(seed).fit(np.concatenate(X), np.concatenate(y))


def _forest(seed: int) -> Any:
    """The random forest of the baseline and of the forest head (same settings for both)."""
    from sklearn.ensemble import RandomForestRegressor

    return RandomForestRegressor(n_estimators=300, min_samples_leaf=2, max_features=1 / 3, n_jobs=-1,
                                 random_state=seed)


def _fit_forest_head(base: CarbonNet, emb: list[np.ndarray], prep: Prepared, ids: set[str], seed: int) -> CarbonNet:
    """A copy of the pretrained ``base`` whose biomass head is a forest on its per-pixel
    embedding ``emb`` (per epoch, see :func:`embed_map`) at the cells of the plots in ``ids``."""
    import copy

    X, y = [], []
    for e, p in enumerate(prep.plots):
        cells = p.cells(ids)
        X.append(emb[e][:, p.pix_rows[cells], p.pix_cols[cells]].T)
        y.append(p.pix_agb[cells])
    model = copy.deepcopy(base)
    model.set_forest(_forest(seed).fit(np.concatenate(X), np.concatenate(y)))
    return model.eval()


def _random_forest(prep: Prepared, train_ids: set[str], seed: int) -> list[np.ndarray]:
    """The random-forest baseline's biomass map per epoch."""
    rf = random_forest(prep, train_ids, seed)
    return [rf.predict(pixel_features(prep, e)).reshape(prep.shape) for e in range(len(prep.plots))]


def _plot_values(prep: Prepared, maps: list[np.ndarray], ids: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """(observed, predicted) biomass of the plots in ``ids`` over every epoch: the plot's own
    biomass against the map's mean over the cells the plot covers."""
    obs, pred = [], []
    for e, p in enumerate(prep.plots):
        sel, mean = _plot_means(p, maps[e], ids)
        obs.append(p.agb[sel])
        pred.append(mean)
    return np.concatenate(obs), np.concatenate(pred)


def _plot_means(p: S.Plots, m: np.ndarray, ids: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the plots in ``ids`` and the mean of the map ``m`` over each one's cells."""
    cells = p.cells(ids)
    k = p.pix_plot[cells]
    n = np.bincount(k, minlength=len(p.ids))
    sums = np.bincount(k, weights=m[p.pix_rows[cells], p.pix_cols[cells]], minlength=len(p.ids))
    sel = np.flatnonzero(n > 0)
    return sel, sums[sel] / n[sel]


def _cell_values(prep: Prepared, maps: list[np.ndarray], ids: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """(observed, predicted) biomass of every cell the plots in ``ids`` cover, over every epoch."""
    obs, pred = [], []
    for e, p in enumerate(prep.plots):
        cells = p.cells(ids)
        obs.append(p.pix_agb[cells])
        pred.append(maps[e][p.pix_rows[cells], p.pix_cols[cells]])
    return np.concatenate(obs), np.concatenate(pred)


def _gross_residuals(prep: Prepared, maps: list[np.ndarray], ids: set[str]) -> dict[str, np.ndarray] | None:
    """Per plot in ``ids``, the mean over its cells measured at the first and last epoch of the
    true minus the mapped cell loss (``min(0, change)``) and gain (``max(0, change)``); None
    unless both epochs are stem-mapped (only then is a cell's own change known)."""
    p0, p1 = prep.plots[0], prep.plots[-1]
    if not (p0.stem_mapped and p1.stem_mapped):
        return None
    first = {}
    for c in p0.cells(ids):
        first[(p0.ids[p0.pix_plot[c]], int(p0.pix_rows[c]), int(p0.pix_cols[c]))] = float(p0.pix_agb[c])
    out: dict[str, dict[str, list[float]]] = {"losses (sources)": {}, "gains (sinks)": {}}
    for c in p1.cells(ids):
        pid, r, q = p1.ids[p1.pix_plot[c]], int(p1.pix_rows[c]), int(p1.pix_cols[c])
        if (pid, r, q) not in first:
            continue
        true = float(p1.pix_agb[c]) - first[(pid, r, q)]
        mapped = float(maps[-1][r, q] - maps[0][r, q])
        out["losses (sources)"].setdefault(pid, []).append(min(true, 0.0) - min(mapped, 0.0))
        out["gains (sinks)"].setdefault(pid, []).append(max(true, 0.0) - max(mapped, 0.0))
    if len(out["gains (sinks)"]) < 2:
        return None
    return {name: np.array([np.mean(v) for v in per.values()]) for name, per in out.items()}


def _scores(obs: np.ndarray, pred: np.ndarray, suffix: str = "") -> dict[str, float]:
    err = pred - obs
    ss = ((obs - obs.mean()) ** 2).sum()
    return {f"rmse_mg_ha{suffix}": float(np.sqrt((err**2).mean())), f"bias_mg_ha{suffix}": float(err.mean()),
            f"r2{suffix}": float(1 - (err**2).sum() / ss) if ss > 0 else float("nan")}


def budget(prep: Prepared, maps: list[np.ndarray], test_ids: set[str]) -> list[dict[str, Any]]:
    """Regional carbon per epoch and its change, model-assisted (a difference estimator with the
    held-out plots as the probability sample): total = sum of the map + N x mean plot residual,
    90 % interval from the residuals' standard error. Rows: quantity, value, lower, upper, unit
    (Mg C), and ``true`` when the region's true biomass is known.

    The gross losses and gains are per map cell (the sum of the cells' decreases, and of their
    increases). Differencing two noisy maps inflates both (noise adds to each side), so when the
    plots are stem-mapped at both epochs they are model-assisted too: each held-out plot's mean
    over its cells of (true cell loss - mapped cell loss) is the residual (see
    :func:`_gross_residuals`). Without stem maps they are the maps' difference alone, with no
    interval (``plots`` 0)."""
    N = prep.shape[0] * prep.shape[1]
    k = prep.grid.area_ha * CARBON_FRACTION  # Mg/ha -> Mg C per pixel
    rows, resid = [], []
    for e, year in enumerate(prep.epochs):
        p = prep.plots[e]
        sel, mean = _plot_means(p, maps[e], test_ids)
        res = p.agb[sel] - mean
        resid.append(dict(zip([p.ids[i] for i in sel], res)))
        total = (maps[e].sum() + N * res.mean()) * k
        se = N * res.std(ddof=1) / np.sqrt(len(res)) * k
        row = {"quantity": f"carbon stock {year}", "value": total, "lower_90": total - Z90 * se,
               "upper_90": total + Z90 * se, "unit": "Mg C", "map_only": maps[e].sum() * k, "plots": len(res)}
        if prep.truth is not None:
            row["true"] = float(prep.truth[e].sum() * k)
        rows.append(row)
    if len(prep.epochs) >= 2:
        a, b = resid[0], resid[-1]
        both = sorted(set(a) & set(b))
        dres = np.array([b[i] - a[i] for i in both])
        delta = maps[-1] - maps[0]
        change = (delta.sum() + N * dres.mean()) * k
        se = N * dres.std(ddof=1) / np.sqrt(len(dres)) * k
        span = f"{prep.epochs[0]}-{prep.epochs[-1]}"
        rows.append({"quantity": f"net change {span}", "value": change, "lower_90": change - Z90 * se,
                     "upper_90": change + Z90 * se, "unit": "Mg C", "map_only": delta.sum() * k, "plots": len(dres)})
        gross = _gross_residuals(prep, maps, test_ids)
        for name, part in (("losses (sources)", np.minimum), ("gains (sinks)", np.maximum)):
            mapped = float(part(delta, 0).sum() * k)
            row = {"quantity": f"{name} {span}", "value": mapped, "unit": "Mg C", "map_only": mapped, "plots": 0}
            if gross is not None:  # model-assisted like the stocks, from the re-measured stem-mapped plots
                r = gross[name]
                value = mapped + N * r.mean() * k
                se = N * r.std(ddof=1) / np.sqrt(len(r)) * k
                row.update(value=value, lower_90=value - Z90 * se, upper_90=value + Z90 * se, plots=len(r))
            rows.append(row)
        if prep.truth is not None:
            td = prep.truth[-1] - prep.truth[0]
            rows[-3]["true"] = float(td.sum() * k)
            rows[-2]["true"] = float(np.minimum(td, 0).sum() * k)
            rows[-1]["true"] = float(np.maximum(td, 0).sum() * k)
    return rows


def _fit(prep: Prepared, ckpt: str | Path | None, size: str, mk: dict[str, Any], ids: Sequence[str], *, steps: int,
         batch_size: int, lr: float, layer_decay: float, mode: str, seed: int, precision: str, device: str,
         progress: bool, out_dir: Path | None) -> CarbonNet:
    model = recipe.build(f"carbon_net.{size}", mk, seed=seed, ckpt=ckpt)
    tc = recipe.engine(ENGINE, steps=steps, pretrained=ckpt is not None, mode=mode, layer_decay=layer_decay,
                       batch_size=batch_size, lr=lr, seed=seed, precision=precision, device=device,
                       progress=progress)
    recipe.fit(model, PlotCrops(prep, ids, tile=mk["tile"], seed=seed), tc, out_dir=out_dir)
    return model


def _interval_ends(quantiles: Sequence[float]) -> tuple[int, int]:
    """Indices of the 5 % and 95 % quantiles (the outermost ones when those are not predicted)."""
    q = list(quantiles)
    return (q.index(0.05) if 0.05 in q else 0), (q.index(0.95) if 0.95 in q else len(q) - 1)


HEADS = {"ensemble": "The network's quantile head fine-tuned with the encoder frozen, averaged with a random forest "
                     "on the pretrained network's per-pixel embedding",
         "forest": "A random forest on the pretrained network's per-pixel embedding (the network frozen)",
         "network": "The network's quantile head trained by gradient"}
WIDTH_FLOOR = 1.0  # Mg/ha: the smallest interval width a calibration score divides by


def widen(maps_q: list[np.ndarray], factor: float, quantiles: Sequence[float]) -> list[np.ndarray]:
    """The 90 % interval moved out on both sides by ``factor`` times its own width (in by a
    negative factor), kept around the median and above zero (see :func:`calibrate_interval`)."""
    lo, hi = _interval_ends(quantiles)
    mid = len(list(quantiles)) // 2
    out = []
    for q in maps_q:
        q = q.copy()
        step = factor * np.maximum(q[hi] - q[lo], WIDTH_FLOOR)
        q[lo] = np.minimum(q[lo] - step, q[mid]).clip(min=0)
        q[hi] = np.maximum(q[hi] + step, q[mid])
        out.append(q)
    return out


def calibrate_interval(prep: Prepared, fit: Any, ids: Sequence[str], quantiles: Sequence[float], *, folds: int,
                       seed: int) -> dict[str, float]:
    """Cross-conformal calibration of the 90 % interval (conformalised quantile regression): the
    training plots are split into ``folds`` groups (a plot's epochs stay together); a model fitted
    on the other folds scores each group by ``max(q05 - y, y - q95) / (q95 - q05)`` (the miss in
    units of the interval's own width, so a wide interval over dense forest and a narrow one over
    a field are calibrated alike); the width factor is the ``ceil(0.9 (n + 1))``-th smallest of
    the n scores. ``fit(ids, seed)`` returns a model.
    Held-out plots are never touched, so coverage on them stays an honest test."""
    ids = sorted(ids)
    if folds < 2 or len(ids) < 2 * folds:
        raise ConfigError(f"interval calibration needs >= 2 folds of >= 2 plots; {len(ids)} plots, {folds} folds")
    order = np.random.default_rng((seed, 17)).permutation(len(ids))
    lo, hi = _interval_ends(quantiles)
    scores = []
    for k in range(folds):
        held = {ids[i] for i in order[k::folds]}
        model = fit([i for i in ids if i not in held], seed + 1000 + k)
        maps = [predict_map(model, f, prep.shape) for f in prep.fields]
        obs, plo = _cell_values(prep, [m[lo] for m in maps], held)
        _, phi = _cell_values(prep, [m[hi] for m in maps], held)
        scores.append(np.maximum(plo - obs, obs - phi) / np.maximum(phi - plo, WIDTH_FLOOR))
    sc = np.sort(np.concatenate(scores))
    n = len(sc)
    factor = float(sc[min(n, int(np.ceil(0.9 * (n + 1)))) - 1])  # the ceil(0.9 (n + 1))-th smallest
    raw = float(np.mean(sc <= 0))
    return {"width_factor": factor, "folds": float(folds), "scores": float(n), "raw_coverage_90": raw}


def evaluate_maps(prep: Prepared, maps_q: list[np.ndarray], train_ids: set[str], test_ids: set[str],
                  quantiles: Sequence[float]) -> dict[str, float]:
    """Scores of the maps (quantiles, then the mean; see :func:`predict_map`): held-out plots
    (RMSE, bias, R2 of the mean), the full true map, the 90 % interval's coverage of held-out
    pixels, and the regional budget against the truth."""
    med = [q[-1] for q in maps_q]  # the point estimate: the mean
    m = _scores(*_plot_values(prep, med, test_ids))
    lo, hi = _interval_ends(quantiles)
    if prep.truth is not None:
        H, W = prep.shape
        m.update({f"{k}_map": v for k, v in _scores(np.concatenate([t.ravel() for t in prep.truth]),
                                                   np.concatenate([x.ravel() for x in med])).items()})
        held = []
        for e, (q, t) in enumerate(zip(maps_q, prep.truth)):
            ok = np.ones((H, W), bool)
            p = prep.plots[e]
            cells = p.cells(train_ids)
            ok[p.pix_rows[cells], p.pix_cols[cells]] = False
            held.append(((t >= q[lo]) & (t <= q[hi]))[ok])
        m["coverage_90"] = float(np.concatenate(held).mean())
    else:
        obs_lo, p_lo = _cell_values(prep, [q[lo] for q in maps_q], test_ids)
        _, p_hi = _cell_values(prep, [q[hi] for q in maps_q], test_ids)
        m["coverage_90"] = float(((obs_lo >= p_lo) & (obs_lo <= p_hi)).mean())
    rows = budget(prep, med, test_ids)
    last = [r for r in rows if r["quantity"].startswith("carbon stock")][-1]
    m["budget_total_mg_c"] = float(last["value"])
    m["budget_interval_halfwidth_pct"] = float(100 * (last["upper_90"] - last["value"]) / abs(last["value"]))
    if "true" in last:
        m["budget_error_pct"] = float(100 * (last["value"] - last["true"]) / last["true"])
        m["budget_in_interval"] = float(last["lower_90"] <= last["true"] <= last["upper_90"])
        ch = next(r for r in rows if r["quantity"].startswith("net change"))
        m["change_error_mg_c"] = float(ch["value"] - ch["true"])
        m["change_in_interval"] = float(ch["lower_90"] <= ch["true"] <= ch["upper_90"])
        for r in rows:
            if r["quantity"].startswith(("losses", "gains")) and "lower_90" in r:
                key = r["quantity"].split()[0]
                m[f"{key}_error_pct"] = float(100 * (r["value"] - r["true"]) / abs(r["true"]))
                m[f"{key}_map_only_error_pct"] = float(100 * (r["map_only"] - r["true"]) / abs(r["true"]))
                m[f"{key}_in_interval"] = float(r["lower_90"] <= r["true"] <= r["upper_90"])
    return m


@recorded("carbon", "finetune")
def finetune(*, ckpt: opt.Parent, data: opt.Data, out: opt.Out,
             task: Annotated[str, opt.Opt("biomass: above-ground biomass (Mg/ha) with a 90 % interval")] = "biomass",
             labels: opt.Labels = None, label_fraction: opt.LabelFraction = 1.0, steps: opt.Steps = 300,
             seed: opt.Seed = 0,
             mode: Annotated[str | None, opt.Opt("full, frozen or linear_probe (None: frozen from a checkpoint, "
                                             "full from scratch)", choices=("full", "frozen", "linear_probe"))] = None,
             config: opt.ParentSize = None, batch_size: opt.BatchSize = 16, lr: opt.FinetuneRate = None,
             layer_decay: opt.LayerDecay = None, baselines: opt.Baselines = False,
             calibration_folds: Annotated[int, opt.Opt("cross-conformal folds calibrating the 90 % interval (0: "
                                                   "uncalibrated)", low=0)] = 5,
             head: Annotated[str | None, opt.Opt("network, forest or ensemble (None: ensemble from a checkpoint, "
                                             "network from scratch)")] = None,
             precision: opt.Precision = "auto", device: opt.Device = "auto",
             progress: opt.Progress = True) -> dict[str, float]:
    """Fine-tune biomass quantiles (5 %, 50 %, 95 %) and mean on ``labels`` field plots (default: all plots
    outside the held-out set, or ``label_fraction`` of them; each plot is measured at every
    epoch); the fixed held-out 30 % of plots (see :func:`split_plots`) score it. With
    ``baselines`` (True or a subset of ``scratch``, ``rf``) the same plots train the model from
    scratch and a random forest on per-pixel source values. ``mode`` defaults to ``frozen`` from a
    checkpoint (the pretrained encoder is kept, the pixel decoder and head learn: with tens of
    plots, updating the encoder too overfits) and ``full`` from scratch. ``head``: ``network``
    (the default from scratch: the pixel decoder and quantile head trained by gradient),
    ``forest`` (the pretrained network frozen whole and a random forest, the baseline's own
    settings, on its per-pixel embedding; the quantiles are the trees' spread; ``steps`` does
    not apply) or ``ensemble`` (the default from a checkpoint: the two averaged). The 90 % interval is
    calibrated by cross-conformal prediction on the training plots (``calibration_folds``
    extra fits, fewer when there are under two plots per fold; 0 skips it; see
    :func:`calibrate_interval`). Writes ``out/model``, maps
    (``maps/*.tif`` cloud-optimised GeoTIFF, ``maps/carbon.nc`` CF NetCDF), ``budget.csv`` and
    ``metrics.json``."""
    if task != "biomass":
        raise ConfigError(f"unknown carbon task {task!r}; expected 'biomass'")
    if head is not None and head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; expected one of {', '.join(HEADS)} (--head)")
    if head not in (None, "network") and ckpt is None:
        raise ConfigError(f"--head {head}: a {head} head maps a pretrained embedding: it needs a checkpoint "
                          "(--from PATH), not --from scratch")
    label_budget = LabelBudget.from_options(labels, label_fraction, pool="field plots outside the held-out 30 %",
                                      minimum=2)
    out = Path(out)
    if ckpt is not None:
        pcfg = recipe.parent_config(ckpt, "carbon")
        pk = pcfg["model_kwargs"]
        size = config or recipe.size_of(pcfg)
        prep = prepare(data, tile=int(pk["tile"]), groups=pk["groups"])
        mk = {k: pk[k] for k in ("groups", "tile", "patch")}
    else:
        size = config or "tiny"
        prep = prepare(data)
        mk = {"groups": prep.groups, "tile": 32, "patch": 8}
    pool, test = split_plots(prep)
    chosen = label_budget.pick(pool, seed)
    labels = len(chosen)
    train_ids, test_ids = set(chosen), set(test)
    wanted = recipe.requested_baselines(baselines, ("scratch", "rf"))
    if ckpt is None:
        wanted = [b for b in wanted if b != "scratch"]  # the model itself is from scratch
    lr = lr or 1e-3
    mode = mode or ("frozen" if ckpt is not None else "full")
    if layer_decay is None:
        layer_decay = ENGINE.layer_decay if ckpt is not None and mode == "full" else 1.0
    head = head or ("ensemble" if ckpt is not None else "network")
    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
    if head != "network" and ckpt is None:
        raise ConfigError(f"a {head} head maps a pretrained embedding: it needs a checkpoint (--from PATH)")
    kw = {"steps": steps, "batch_size": batch_size, "seed": seed, "precision": precision, "device": device,
          "progress": progress}
    if head != "network":
        base = recipe.build(f"carbon_net.{size}", mk, seed=seed, ckpt=ckpt)
        emb = [embed_map(base, f, prep.shape) for f in prep.fields]
    if head == "forest":
        mode = "frozen"  # the network is not trained at all

    mk0 = dict(mk)  # the network's own arguments (the forest's sizes are added for the saved model)

    def refit(ids: Sequence[str], s_: int, out_dir: Path | None = None) -> CarbonNet:
        if head == "forest":
            return _fit_forest_head(base, emb, prep, set(ids), s_)
        net = _fit(prep, ckpt, size, mk0, ids, lr=lr, layer_decay=layer_decay, mode=mode, out_dir=out_dir,
                   **{**kw, "seed": s_, "progress": kw["progress"] and out_dir is not None})
        if head == "network":
            return net
        return CarbonEnsemble.combine(net, _fit_forest_head(base, emb, prep, set(ids), s_), get_size(size), **mk0)

    model = refit(chosen, seed, out / "train")
    family = "carbon_ensemble" if head == "ensemble" else "carbon_net"
    if model.has_forest or isinstance(model, CarbonEnsemble):
        fm = model.forest_net if isinstance(model, CarbonEnsemble) else model
        mk = {**mk, "forest_trees": int(fm.forest_roots.numel()), "forest_nodes": int(fm.forest_left.numel())}
    maps = [predict_map(model, f, prep.shape) for f in prep.fields]
    calib: dict[str, float] = {}
    folds = min(calibration_folds, len(chosen) // 2)  # every fold holds >= 2 plots
    if calibration_folds and folds < 2:
        LOGGER.warning("%d plots are too few to calibrate the interval (>= 4 needed); it stays uncalibrated",
                       len(chosen))
    elif calibration_folds:
        calib = calibrate_interval(prep, refit, chosen, model.quantiles, folds=folds, seed=seed)
        maps = widen(maps, calib["width_factor"], model.quantiles)
    metrics = evaluate_maps(prep, maps, train_ids, test_ids, model.quantiles)
    metrics.update({f"calibration_{k}": v for k, v in calib.items()})

    def scratch() -> dict[str, float]:
        sm = _fit(prep, None, size, mk0, chosen, lr=lr, layer_decay=1.0, mode="full", out_dir=None, **kw)
        ms = evaluate_maps(prep, [predict_map(sm, f, prep.shape) for f in prep.fields], train_ids, test_ids,
                           sm.quantiles)
        return {k: v for k, v in ms.items() if k.startswith(("rmse", "bias", "r2"))}

    def forest() -> dict[str, float]:
        rmaps = _random_forest(prep, train_ids, seed)
        m = _scores(*_plot_values(prep, rmaps, test_ids))
        if prep.truth is not None:
            m.update({f"{k}_map": v for k, v in _scores(np.concatenate([t.ravel() for t in prep.truth]),
                                                         np.concatenate([x.ravel() for x in rmaps])).items()})
        return m

    metrics.update(recipe.run_baselines(wanted, {"scratch": scratch, "rf": forest}))
    metrics.update({"labelled_plots": float(labels), "test_plots": float(len(test)), "epochs": float(len(prep.epochs))})
    rows = budget(prep, [q[-1] for q in maps], test_ids)
    write_maps(prep, maps, rows, out, model.quantiles)
    mc = ModelConfig(domain="carbon", task="biomass", model_type=f"{family}.{size}", model_kwargs=mk,
                     geometry={"grid": prep.grid.describe(), "sources": S.sources_json(prep.specs),
                               "tile": mk["tile"], "quantiles": list(model.quantiles)},
                     processors={"calibration": calib},
                     card=_card(prep, f"{HEADS[head]} ({ckpt or 'scratch'}), fitted on {labels} field plots."),
                     training={"plots": chosen, "from": str(ckpt) if ckpt else "scratch", "head": head,
                               "steps": steps if head != "forest" else 0, "lr": lr,
                               "layer_decay": layer_decay, "mode": mode, "seed": seed, "data": str(data)})
    recipe.finish(model, out, mc, metrics)
    return metrics


def write_maps(prep: Prepared, maps: list[np.ndarray], rows: list[dict[str, Any]], out: Path,
               quantiles: Sequence[float]) -> None:
    """Biomass / carbon / uncertainty maps as cloud-optimised GeoTIFF, one CF NetCDF, budget.csv."""
    import pandas as pd
    import xarray as xr

    from hfmi_kit.data.cf import write_cf

    mdir = out / "maps"
    names = [*(f"agb_q{int(round(100 * q)):02d}" for q in quantiles), "agb_mean"]
    mid = len(names) - 1  # the mean
    for year, q in zip(prep.epochs, maps):
        write_geotiff(mdir / f"agb_{year}.tif", q, crs=prep.grid.crs, transform=prep.grid.transform, nodata=-9999.0,
                      band_names=names, units="Mg ha-1", description=f"above-ground biomass quantiles {year}", cog=True)
        write_geotiff(mdir / f"carbon_{year}.tif", q * CARBON_FRACTION, crs=prep.grid.crs,
                      transform=prep.grid.transform, nodata=-9999.0,
                      band_names=[n.replace("agb", "carbon") for n in names], units="Mg C ha-1",
                      description=f"carbon stock quantiles {year}", cog=True)
    if len(maps) >= 2:
        write_geotiff(mdir / "change.tif", (maps[-1][mid] - maps[0][mid]) * CARBON_FRACTION, crs=prep.grid.crs,
                      transform=prep.grid.transform, nodata=-9999.0, band_names=["carbon_change"], units="Mg C ha-1",
                      description=f"carbon change {prep.epochs[0]}-{prep.epochs[-1]}", cog=True)
    H, W = prep.shape
    t = prep.grid.transform
    x = t.c + t.a * (np.arange(W) + 0.5)
    y = t.f + t.e * (np.arange(H) + 0.5)
    data_vars = {}
    for qi, name in enumerate(names):
        data_vars[name] = (("time", "y", "x"), np.stack([m[qi] for m in maps]).astype(np.float32),
                           {"long_name": (f"above-ground biomass, {quantiles[qi]:.0%} quantile"
                                          if qi < len(quantiles) else "above-ground biomass, mean"), "units": "Mg ha-1",
                            "grid_mapping": "spatial_ref"})
    data_vars["carbon"] = (("time", "y", "x"), np.stack([m[mid] for m in maps]).astype(np.float32) * CARBON_FRACTION,
                           {"long_name": "carbon stock in above-ground biomass", "units": "Mg ha-1",
                            "grid_mapping": "spatial_ref"})
    ds = xr.Dataset(data_vars, coords={
        "time": ("time", np.array([np.datetime64(f"{y_}-07-01", "ns") for y_ in prep.epochs]),
                 {"standard_name": "time"}),
        "y": ("y", y, {"standard_name": "projection_y_coordinate", "units": "m", "axis": "Y"}),
        "x": ("x", x, {"standard_name": "projection_x_coordinate", "units": "m", "axis": "X"})},
        attrs={"Conventions": "CF-1.8", "title": "hfmi_kit biomass and carbon maps", "institution": "hfmi_kit",
               "source": "hfmi_kit carbon_net", "history": f"{np.datetime64('now')}: predicted",
               "references": "Chave et al. 2014 allometry; carbon fraction 0.47 (IPCC)"})
    ds["spatial_ref"] = xr.DataArray(np.int32(0), attrs={"crs_wkt": prep.grid.crs.to_wkt(),
                                                         "spatial_ref": prep.grid.crs.to_wkt(),
                                                         "GeoTransform": " ".join(map(str, list(t)[:6]))})
    for v in [*names, "carbon"]:
        ds[v].encoding["_FillValue"] = np.float32(-9999.0)
    write_cf(ds, mdir / "carbon.nc")
    frame = pd.DataFrame(rows)
    tmp = out / ".budget.csv.tmp"
    frame.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(out / "budget.csv")


def predictor(model: CarbonNet, config: dict[str, Any] | None = None) -> Predictor:
    """The model's predictor: ``windows`` maps a region's fields (tiles at half-tile stride,
    overlaps averaged; see :func:`predict_map` for the forest and ensemble heads) and ``post``
    moves the 90 % interval of a list of quantile maps out by the width factor calibrated at
    fine-tuning (``processors.calibration.width_factor``; none: unchanged)."""
    cfg = config if config is not None else getattr(model, "hfmi_config", {})
    factor = (cfg or {}).get("processors", {}).get("calibration", {}).get("width_factor")

    def post(maps: list[np.ndarray]) -> list[np.ndarray]:
        return maps if factor is None else widen(maps, float(factor), model.quantiles)

    return Predictor(model, model_fn=model.predict, post=post, config=cfg)


def map_region(ckpt: str | Path, data: str | Path) -> tuple[CarbonNet, Prepared, list[np.ndarray]]:
    """Load a fine-tuned biomass model and map ``data`` with it: ``(model, prepared region, maps)``,
    the maps (Q + 1, H, W) per epoch with the 90 % interval calibrated at fine-tuning."""
    cfg = recipe.parent_config(ckpt, "carbon", task="biomass")
    model = load_pretrained(ckpt)
    if not isinstance(model, CarbonNet):
        raise ConfigError(f"{ckpt}: {cfg.get('model_type')} is not a carbon biomass model")
    prep = prepare(data, tile=model.tile, groups=model.groups)
    return model, prep, map_epochs(predictor(model, cfg), prep)


def map_epochs(pred: Predictor, prep: Prepared) -> list[np.ndarray]:
    """The (Q + 1, H, W) maps of every epoch of ``prep`` by the model of ``pred``, its calibrated
    interval applied (``pred.post``)."""
    return pred.post([predict_map(pred.model, f, prep.shape) for f in prep.fields])


def load(data: str | Path, *, ckpt: str | Path, config: dict[str, Any]) -> Bundle:
    """The region ``data`` prepared on the checkpoint's tiles and sources, and its field plots the
    checkpoint was not trained on: on the same region (by the checksum of its ``region.json``,
    whatever the path) its training plots are left out; on another region every plot is scored."""
    mk = config.get("model_kwargs", {})
    prep = prepare(data, tile=int(mk["tile"]), groups=mk["groups"])
    same = any(d.get("sha256") == hashlib.sha256((prep.root / "region.json").read_bytes()).hexdigest()
               for d in config.get("card", {}).get("data", []))
    train_ids = set(config.get("training", {}).get("plots", [])) if same else set()
    test_ids = {pid for p in prep.plots for pid in p.ids} - train_ids
    return Bundle(Path(data), (prep, train_ids, test_ids), len(test_ids), unit="plot",
                  meta={"test_plots": len(test_ids)})


def score(pred: Predictor, bundle: Bundle, *, out: Path | None = None) -> Scored:
    """Map the region (every epoch, the calibrated 90 % interval) and score the maps on the
    held-out plots (:func:`evaluate_maps`); the outputs are the maps and the regional budget."""
    model = pred.model
    if not isinstance(model, CarbonNet):
        raise ConfigError(f"{pred.source}: {pred.config.get('model_type')} is not a carbon biomass model")
    prep, train_ids, test_ids = bundle.items
    maps = map_epochs(pred, prep)
    metrics = evaluate_maps(prep, maps, train_ids, test_ids, model.quantiles)
    rows = budget(prep, [q[-1] for q in maps], test_ids)
    return Scored(metrics, outputs=(prep, maps, rows, model.quantiles))


def write_outputs(scored: Scored, out: Path) -> list[Path]:
    """The maps (COG and CF NetCDF) and ``budget.csv`` (:func:`write_maps`)."""
    prep, maps, rows, quantiles = scored.outputs
    write_maps(prep, maps, rows, out, quantiles)
    return [out / "maps", out / "budget.csv"]


@opt.typed
def evaluate(*, ckpt: opt.Checkpoint, data: opt.Data, out: opt.Out) -> dict[str, float]:
    """Map a region with a fine-tuned model and score it on the plots it was not trained on."""
    return recipe.evaluate(get_domain("carbon"), ckpt=ckpt, data=data, out=out)
