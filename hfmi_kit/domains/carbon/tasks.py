"""Carbon: prepare a region, pretrain on unlabelled tiles, fine-tune biomass quantiles on field
plots with baselines, map biomass / carbon / uncertainty, and sum a regional budget."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hfmi_kit import options as opt
from hfmi_kit.checkpoints import resolve as resolve_checkpoint
from hfmi_kit.data.windows import blend_windows, lattice_block
from hfmi_kit.domains.base import Bundle, Scored, get_domain
from hfmi_kit.domains.carbon import sources as S
from hfmi_kit.domains.carbon import tiles as T
from hfmi_kit.domains.carbon.model import CarbonEnsemble, CarbonNet
from hfmi_kit.domains.carbon.synth import CARBON_FRACTION
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


IN_MEMORY_BYTES = 512 * 2**20  # a region whose fields fit in this is read whole once; larger ones window by window


@dataclass
class Prepared:
    """A region on its target grid: per epoch the readers of its sources (see :mod:`.tiles`), the
    plots and, when known, the true biomass. :meth:`window` gives the normalised fields of any
    window (group -> (h, w), NaN where absent and outside the map); a region whose fields fit in
    :data:`IN_MEMORY_BYTES` is read once and held (``fields``, padded with NaN to whole tiles),
    a larger one is read window by window from its files."""

    root: Path
    grid: S.Grid
    epochs: list[int]
    specs: list[S.SourceSpec]
    plots: list[S.Plots]
    shape: tuple[int, int]  # unpadded map shape
    tile: int
    readers: list[dict[str, Any]]  # per epoch: source name -> reader
    keep: list[str] | None = None  # the groups read (None: every group of the sources)
    truth_readers: list[Any] | None = None
    _fields: list[dict[str, np.ndarray]] | None = None
    _truth: list[np.ndarray] | None = None

    @property
    def groups(self) -> list[str]:
        return [g for s in self.specs for g in s.groups()]

    @property
    def padded(self) -> tuple[int, int]:
        """The map shape padded to whole tiles (the lattice the model's windows lie on)."""
        H, W = self.shape
        return -(-H // self.tile) * self.tile, -(-W // self.tile) * self.tile

    @property
    def in_memory(self) -> bool:
        return self._fields is not None

    @property
    def has_truth(self) -> bool:
        return self.truth_readers is not None

    def _read(self, e: int, r0: int, c0: int, h: int, w: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for spec in self.specs:
            reader = self.readers[e].get(spec.name)
            bands = [(b, g) for b, g in enumerate(spec.groups()) if self.keep is None or g in self.keep]
            if reader is None or not bands:
                continue
            scale = np.asarray(spec.scale, np.float64)
            norm = reader.read(self.grid, r0, c0, h, w, affine=(1 / scale, -np.asarray(spec.offset) / scale))
            for b, g in bands:
                out[g] = norm[b]
        return out

    def window(self, e: int, r0: int, c0: int, h: int, w: int) -> dict[str, np.ndarray]:
        """The normalised fields of epoch ``e`` on the cells ``[r0, r0 + h) x [c0, c0 + w)``:
        group -> (h, w) float32, NaN where a source has no data and outside the map."""
        if self._fields is None:
            return self._read(e, r0, c0, h, w)
        Hp, Wp = self.padded
        a0, a1, b0, b1 = max(r0, 0), min(r0 + h, Hp), max(c0, 0), min(c0 + w, Wp)
        if (a0, a1, b0, b1) == (r0, r0 + h, c0, c0 + w):
            return {g: v[r0:r0 + h, c0:c0 + w] for g, v in self._fields[e].items()}
        out = {}
        for g, v in self._fields[e].items():
            x = np.full((h, w), np.nan, dtype=np.float32)
            if a0 < a1 and b0 < b1:
                x[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = v[a0:a1, b0:b1]
            out[g] = x
        return out

    @property
    def fields(self) -> list[dict[str, np.ndarray]]:
        """Per epoch the whole padded fields (a region held in memory only)."""
        if self._fields is None:
            raise DataError(f"{self.root}: a region of {self.shape[0]} x {self.shape[1]} cells is read window by "
                            "window, not held whole; use its maps (hfmi evaluate writes them as COGs)")
        return self._fields

    def truth_window(self, e: int, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        """The true biomass [Mg/ha] of epoch ``e`` on a window (NaN outside the map)."""
        if self.truth_readers is None:
            raise DataError(f"{self.root}: the region declares no true biomass maps")
        if self._truth is not None and r0 >= 0 and c0 >= 0 and r0 + h <= self.shape[0] and c0 + w <= self.shape[1]:
            return self._truth[e][r0:r0 + h, c0:c0 + w]
        return self.truth_readers[e].read(self.grid, r0, c0, h, w)[0]

    @property
    def truth(self) -> list[np.ndarray] | None:
        """Per epoch the whole true biomass map (a region held in memory; None when unknown)."""
        if self.truth_readers is None:
            return None
        if self._truth is None:
            _ = self.fields  # the same refusal for a region read window by window
        return self._truth


def prepare(data: str | Path, *, tile: int = 32, crs: str | None = None, resolution: float | None = None,
            groups: Sequence[str] | None = None, in_memory: bool | None = None) -> Prepared:
    """Open every source and plot of ``data`` on the target grid (see :func:`.sources.target_grid`):
    only headers and plot tables are read here. ``in_memory`` (None: when the fields fit in
    :data:`IN_MEMORY_BYTES`) reads the fields once and holds them."""
    region = S.open_region(data)
    readers = [{s.name: r for s in region.sources if (r := S.source_reader(region, e, s)) is not None}
               for e in range(len(region.epochs))]
    grid = S.target_grid(region, crs=crs, resolution=resolution, readers=readers)
    plots = [S.read_plots(region, year, grid) for year in region.epochs]
    truth_readers = None
    tfiles = region.meta.get("truth", {}).get("agb")
    if tfiles:
        spec = S.SourceSpec("truth", "", "raster", ("agb",), "Mg ha-1", (0.0,), (1.0,))
        truth_readers = [T.RasterSource(spec, [region.root / t]) for t in tfiles]
    prep = Prepared(root=region.root, grid=grid, epochs=region.epochs, specs=region.sources, plots=plots,
                    shape=grid.shape, tile=tile, readers=readers, keep=None if groups is None else list(groups),
                    truth_readers=truth_readers)
    Hp, Wp = prep.padded
    n_groups = len([g for g in prep.groups if groups is None or g in groups])
    size = 4 * Hp * Wp * len(region.epochs) * (n_groups + (1 if tfiles else 0))
    if in_memory or (in_memory is None and size <= IN_MEMORY_BYTES):
        prep._fields = [prep._read(e, 0, 0, Hp, Wp) for e in range(len(region.epochs))]
        if truth_readers is not None:
            prep._truth = [r.read(grid, 0, 0, *grid.shape)[0] for r in truth_readers]
    return prep


def region_folders(data: str | Path) -> list[Path]:
    """``data`` itself when it is a region (it holds ``region.json``), else the region folders in
    it, in name order: a corpus of regions to pretrain on (different forests, seasons, sensors'
    scenes). Hidden folders and links leading out of ``data`` are not regions. Neither is one line
    naming the folder."""
    root = Path(data)
    if (root / "region.json").is_file() or not root.is_dir():
        return [root]
    base = root.resolve()
    found = sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir()
                   and p.resolve().is_relative_to(base) and (p / "region.json").is_file())
    if not found:
        raise DataError(f"{root}: no region.json, and no folder in it holds one (expected a region folder or a "
                        "folder of region folders)")
    return found


def _tensors(f: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {g: torch.from_numpy(np.ascontiguousarray(v)) for g, v in f.items()}


class TileCrops(Dataset):
    """Random tiles of every epoch (unlabelled; pretraining), with random flips and rotations:
    ``{"inputs": {source group: (tile, tile)}}``. A tile is a function of (seed, index) alone,
    read from the region's files when it is not held in memory. ``prep`` may be several regions
    (a corpus): a tile's region is drawn in proportion to its cells x epochs, and a group a region
    lacks is all NaN in its tiles (absent tokens, as outside the map)."""

    def __init__(self, prep: Prepared | Sequence[Prepared], *, tile: int, length: int = 100_000,
                 seed: int = 0) -> None:
        self.preps = [prep] if isinstance(prep, Prepared) else list(prep)
        self.prep, self.tile, self.length, self.seed = self.preps[0], tile, length, seed
        w = np.array([p.shape[0] * p.shape[1] * len(p.epochs) for p in self.preps], dtype=float)
        self.weights = w / w.sum()
        self.groups = list(dict.fromkeys(g for p in self.preps for g in p.groups if p.keep is None or g in p.keep))

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
        prep = self.preps[int(rng.choice(len(self.preps), p=self.weights))] if len(self.preps) > 1 else self.prep
        e = int(rng.integers(len(prep.epochs)))
        H, W = prep.shape
        r, c = int(rng.integers(0, max(1, H - self.tile + 1))), int(rng.integers(0, max(1, W - self.tile + 1)))
        x = prep.window(e, r, c, self.tile, self.tile)
        if len(self.preps) > 1:  # a group this region lacks: all NaN, i.e. absent tokens
            x = {g: x[g] if g in x else np.full((self.tile, self.tile), np.nan, np.float32) for g in self.groups}
        return {"inputs": self._augment(_tensors(x), rng)}


class PlotCrops(TileCrops):
    """Tiles around the training plots, ``{"inputs": {...}, "target": (tile, tile), "plot_index":
    (tile, tile)}``: ``target`` holds the biomass of the cells the plots cover
    (per cell for stem-mapped plots, else the plot's biomass), NaN elsewhere. Each plot and epoch
    is drawn equally often, the tile placed at random but covering the plot's centre. Only the
    plots' cells are held, never a map-sized label array."""

    def __init__(self, prep: Prepared, plot_ids: Sequence[str], *, tile: int, length: int = 100_000,
                 seed: int = 0) -> None:
        super().__init__(prep, tile=tile, length=length, seed=seed)
        keep = set(plot_ids)
        self.cells = []  # per epoch (rows, cols, biomass, plot index) of the training plots' cells
        self.where = []  # (epoch, row, col) of each training plot's centre
        for e, p in enumerate(prep.plots):
            c = p.cells(keep)
            self.cells.append((p.pix_rows[c], p.pix_cols[c], p.pix_agb[c].astype(np.float32), p.pix_plot[c]))
            self.where += [(e, int(r), int(c)) for pid, r, c in zip(p.ids, p.rows, p.cols) if pid in keep]
        if not self.where:
            raise DataError("no training plots selected")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, i))
        e, r, c = self.where[int(rng.integers(len(self.where)))]
        H, W = self.prep.shape
        t = self.tile
        r0 = int(rng.integers(max(0, r - t + 1), min(r, H - t) + 1))
        c0 = int(rng.integers(max(0, c - t + 1), min(c, W - t) + 1))
        item = _tensors(self.prep.window(e, r0, c0, t, t))
        rows, cols, agb, idx = self.cells[e]
        sel = (rows >= r0) & (rows < r0 + t) & (cols >= c0) & (cols < c0 + t)
        target = np.full((t, t), np.nan, dtype=np.float32)
        index = np.full((t, t), -1, dtype=np.int64)
        target[rows[sel] - r0, cols[sel] - c0] = agb[sel]
        index[rows[sel] - r0, cols[sel] - c0] = idx[sel]
        item["target"], item["plot_index"] = torch.from_numpy(target), torch.from_numpy(index)
        item = self._augment(item, rng)  # sources, target and plot index turned alike
        target, plot_index = item.pop("target"), item.pop("plot_index")
        return {"inputs": item, "target": target, "plot_index": plot_index}


def split_plots(prep: Prepared) -> tuple[list[str], list[str]]:
    """(pool, test) plot ids: a fixed 30 % of the plots (by a hash of the id) are held out."""
    ids = sorted({pid for p in prep.plots for pid in p.ids})
    if not ids:
        raise DataError(f"{prep.root}: no field plots (plots.csv and trees.csv); an unlabelled region serves "
                        "pretraining only, fine-tuning and scores need plots")
    test = [i for i in ids if int(hashlib.sha256(i.encode()).hexdigest(), 16) % 10 < 3]
    return [i for i in ids if i not in set(test)], test


def _card(prep: Prepared | Sequence[Prepared], summary: str) -> dict[str, Any]:
    preps = [prep] if isinstance(prep, Prepared) else list(prep)
    data = []
    for p in preps:
        meta = S.open_region(p.root).meta
        data.append({"file": p.root.name, "path": str(p.root), "licence": meta.get("licence", "unknown"),
                     "description": meta.get("description", ""),
                     "sha256": hashlib.sha256((p.root / "region.json").read_bytes()).hexdigest()})
    return {"summary": summary, "licence": "Apache-2.0 (weights and code)", "data": data,
            "intended_use": "research on multi-source biomass mapping and carbon budgets",
            "limitations": f"trained on {len(preps)} region(s); sources must be described as in region.json"}


@recorded("carbon", "pretrain")
def pretrain(*, data: opt.Data, out: opt.Out, config: opt.Size = "tiny", steps: opt.Steps = 1500,
             seed: opt.Seed = 0,
             resume: opt.Resume = False, batch_size: opt.BatchSize = 16, lr: opt.LearningRate = 1e-3, tile: Tile = 32,
             patch: Annotated[int, opt.Opt("edge of the square patches (tokens), in pixels", low=1)] = 8,
             mask_ratio: opt.MaskRatio = 0.5, precision: opt.Precision = "auto", device: opt.Device = "auto",
             progress: opt.Progress = True, variables: opt.Variables = None,
             crs: Annotated[str | None, opt.Opt("CRS of the common grid, e.g. EPSG:32633 (None: the region's)")] = None,
             resolution: Annotated[float | None, opt.Opt("cell size of the common grid in CRS units (None: the "
                                                     "region's)", above=0)] = None,
             checkpoint_every: opt.CheckpointEvery = 0) -> Path:
    """Masked multi-source reconstruction on unlabelled tiles of every epoch: whole sources are
    hidden and predicted from the others. Plots are never read as labels. ``data`` is a region or
    a folder of regions (see :func:`region_folders`; the model's groups are the union of theirs).
    Step checkpoints every ``checkpoint_every`` steps (0: half-way). Returns ``out/model``. The
    defaults are the recipe of the shipped ``carbon.tiny`` (1500 steps)."""
    out = Path(out)
    preps = [prepare(d, tile=tile, crs=crs, resolution=resolution) for d in region_folders(data)]
    prep = preps[0]
    union = list(dict.fromkeys(g for p in preps for g in p.groups))
    groups = [g for g in union if variables is None or g.split(":", 1)[0] in variables]
    if not groups:
        raise DataError(f"{data}: no sources left (variables={list(variables or [])})")
    mk = {"groups": groups, "tile": tile, "patch": patch, "mask_ratio": mask_ratio}
    model = recipe.build(f"carbon_net.{config}", mk, seed=seed)
    tc = recipe.engine(ENGINE, steps=steps, batch_size=batch_size, lr=lr, seed=seed, precision=precision,
                       device=device, progress=progress, checkpoint_every=checkpoint_every or max(steps // 2, 1))
    mc = ModelConfig(domain="carbon", task="pretrain", model_type=f"carbon_net.{config}", model_kwargs=mk,
                     geometry={"grid": prep.grid.describe(), "sources": S.sources_json(prep.specs), "tile": tile,
                               **({"regions": [p.root.name for p in preps]} if len(preps) > 1 else {})},
                     card=_card(preps, "Multi-source foundation model (optical, radar, lidar CHM) pretrained by "
                                       "masked source reconstruction on unlabelled tiles."))
    res = recipe.fit(model, TileCrops(preps, tile=tile, seed=seed), tc, out_dir=out, config=mc, resume=resume)
    mc.training = {**dataclasses.asdict(tc), "data": str(data)}
    return recipe.finish(model, out, mc, {"train_loss": res.last_loss})


Reader = Callable[[int, int, int, int], dict[str, np.ndarray]]  # (r0, c0, h, w) -> group -> (h, w)
BLOCK = 1024  # cells per side of a map block made at once
PLOT_BLOCK = 512  # plots within a block of this many cells share their windows


def _fields_reader(fields: dict[str, np.ndarray]) -> Reader:
    return lambda r0, c0, h, w: {g: v[r0:r0 + h, c0:c0 + w] for g, v in fields.items()}


def _blend(model: CarbonNet, read: Reader, padded: tuple[int, int], fn: Any, channels: int,
           r0: int, c0: int, h: int, w: int, batch_size: int) -> np.ndarray:
    """``fn(batch) -> (B, channels, tile, tile)`` on the cells ``[r0, r0 + h) x [c0, c0 + w)``:
    the tiles of the whole map's lattice (half-tile stride) that cover them, overlaps averaged,
    so a block equals the same cells of the whole map (:func:`~hfmi_kit.data.windows.lattice_block`)."""
    model.eval()
    t = model.tile
    (a, b), (a1, b1), corners = lattice_block(padded, t, (r0, c0), (r0 + h, c0 + w))
    f = read(a, b, a1 - a, b1 - b)
    out = blend_windows(fn, lambda k: _tensors({g: v[k[0]:k[0] + t, k[1]:k[1] + t] for g, v in f.items()}),
                        (a1 - a, b1 - b), t, channels=channels, batch_size=batch_size,
                        device=next(model.parameters()).device, corners=corners)
    return out[:, r0 - a:r0 - a + h, c0 - b:c0 - b + w]


def _embedding_channels(model: CarbonNet) -> int:
    return model.trunk[1].out_features + len(model.groups)


def embed_block(model: CarbonNet, read: Reader, padded: tuple[int, int], r0: int, c0: int, h: int, w: int, *,
                batch_size: int = 8) -> np.ndarray:
    """The per-pixel embedding (F, h, w) of :meth:`.CarbonNet.embedding` on a block, tiles averaged."""
    return _blend(model, read, padded, lambda b: model.embedding(b).permute(0, 3, 1, 2), _embedding_channels(model),
                  r0, c0, h, w, batch_size)


@torch.no_grad()
def predict_block(model: CarbonNet, read: Reader, padded: tuple[int, int], r0: int, c0: int, h: int, w: int, *,
                  batch_size: int = 8) -> np.ndarray:
    """Biomass (Q + 1, h, w) [Mg/ha] on a block, the quantiles then the mean: tiles at half-tile
    stride, overlaps averaged. A forest head maps the averaged embedding (the features it was
    fitted on, see :func:`embed_block`)."""
    Q = len(model.quantiles) + 1
    if isinstance(model, CarbonEnsemble):  # each head as it maps alone, then averaged
        net = _blend(model, read, padded, model.network_predict, Q, r0, c0, h, w, batch_size).clip(min=0)
        return 0.5 * (net + predict_block(model.forest_net, read, padded, r0, c0, h, w, batch_size=batch_size))
    if model.has_forest:
        emb = embed_block(model, read, padded, r0, c0, h, w, batch_size=batch_size)
        x = torch.from_numpy(emb.reshape(emb.shape[0], -1).T.copy())
        out = torch.cat([model._forest_quantiles(x[i:i + 8192]) for i in range(0, x.shape[0], 8192)], 1)
        return out.numpy().reshape(Q, h, w).clip(min=0)
    return _blend(model, read, padded, model.predict, Q, r0, c0, h, w, batch_size).clip(min=0)


def embed_map(model: CarbonNet, fields: dict[str, np.ndarray], shape: tuple[int, int], *,
              batch_size: int = 8) -> np.ndarray:
    """The per-pixel embedding (F, H, W) of a map held in memory (padded ``fields``)."""
    padded = next(iter(fields.values())).shape
    return embed_block(model, _fields_reader(fields), padded, 0, 0, *shape, batch_size=batch_size)


def predict_map(model: CarbonNet, fields: dict[str, np.ndarray], shape: tuple[int, int], *,
                batch_size: int = 8) -> np.ndarray:
    """Biomass maps (Q + 1, H, W) [Mg/ha] of a map held in memory (padded ``fields``; see
    :func:`predict_block`)."""
    padded = next(iter(fields.values())).shape
    return predict_block(model, _fields_reader(fields), padded, 0, 0, *shape, batch_size=batch_size)


Block = Callable[[int, int, int, int, int], np.ndarray]  # (epoch, r0, c0, h, w) -> (channels, h, w)


def model_blocks(model: CarbonNet, prep: Prepared, post: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
                 *, batch_size: int = 8) -> Block:
    """The model's biomass on any block of any epoch of ``prep``, ``post`` (e.g. the calibrated
    interval, pixel by pixel) applied."""
    def block(e: int, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        q = predict_block(model, functools.partial(prep.window, e), prep.padded, r0, c0, h, w, batch_size=batch_size)
        return post([q])[0] if post is not None else q
    return block


def feature_blocks(prep: Prepared) -> Block:
    """The per-pixel source values (bands, h, w) of a block (NaN where absent), the random
    forest's inputs, in the order of the groups read."""
    def block(e: int, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        return np.stack(list(prep.window(e, r0, c0, h, w).values()))
    return block


def cell_values(prep: Prepared, block: Block, ids: set[str] | None = None) -> list[np.ndarray]:
    """Per epoch the (channels, n) values of ``block`` at the cells of the plots in ``ids`` (all
    plots if None), in the order of ``plots[e].cells(ids)``: only the windows around the plots
    are made (plots within :data:`PLOT_BLOCK` cells of each other share theirs)."""
    out = []
    for e, p in enumerate(prep.plots):
        cells = p.cells(ids)
        rows, cols = p.pix_rows[cells], p.pix_cols[cells]
        vals = None
        key = (rows // PLOT_BLOCK) * (prep.shape[1] // PLOT_BLOCK + 1) + cols // PLOT_BLOCK
        for k in np.unique(key):
            sel = np.flatnonzero(key == k)
            r0, c0 = int(rows[sel].min()), int(cols[sel].min())
            v = block(e, r0, c0, int(rows[sel].max()) + 1 - r0, int(cols[sel].max()) + 1 - c0)
            if vals is None:
                vals = np.zeros((v.shape[0], len(cells)), dtype=np.float64)
            vals[:, sel] = v[:, rows[sel] - r0, cols[sel] - c0]
        out.append(vals if vals is not None else np.zeros((0, 0)))
    return out


def random_forest(prep: Prepared, train_ids: set[str], seed: int) -> Any:
    """The classical baseline: a random forest on the per-pixel source values of the cells the
    training plots cover (every epoch; the same labels the network learns from), to be applied
    to :func:`feature_blocks`."""
    X = cell_values(prep, feature_blocks(prep), train_ids)
    y = [p.pix_agb[p.cells(train_ids)] for p in prep.plots]
    return _forest(seed).fit(np.concatenate([x.T for x in X]), np.concatenate(y))


def forest_blocks(rf: Any, prep: Prepared) -> Block:
    """The random-forest baseline's biomass (1, h, w) on a block."""
    feats = feature_blocks(prep)

    def block(e: int, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        x = feats(e, r0, c0, h, w)
        return rf.predict(x.reshape(x.shape[0], -1).T).reshape(1, h, w)
    return block


def _forest(seed: int) -> Any:
    """The random forest of the baseline and of the forest head (same settings for both)."""
    from sklearn.ensemble import RandomForestRegressor

    return RandomForestRegressor(n_estimators=300, min_samples_leaf=2, max_features=1 / 3, n_jobs=-1,
                                 random_state=seed)


def _fit_forest_head(base: CarbonNet, emb: list[np.ndarray], prep: Prepared, ids: set[str], seed: int) -> CarbonNet:
    """A copy of the pretrained ``base`` whose biomass head is a forest on its per-pixel
    embedding ``emb`` (per epoch (F, n) at the cells of every plot, see :func:`cell_values`) at
    the cells of the plots in ``ids``."""
    import copy

    X, y = [], []
    for e, p in enumerate(prep.plots):
        X.append(emb[e][:, p.cells(ids)].T)
        y.append(p.pix_agb[p.cells(ids)])
    model = copy.deepcopy(base)
    model.set_forest(_forest(seed).fit(np.concatenate(X), np.concatenate(y)))
    return model.eval()


@dataclass
class MapStats:
    """What the scores and the budget need from the maps of every epoch, gathered in one pass
    over the map (:func:`map_pass`) or from maps held in memory (:meth:`from_maps`): the maps'
    values at every plot cell, the region's sums and, where the true biomass is known, its
    sums and the errors against it."""

    cells: list[np.ndarray]  # per epoch (channels, n) at every plot cell (the order of plots[e].pix_*)
    total: list[float]  # per epoch the sum of the mean map [Mg/ha x cells]
    cells_count: int  # cells of the map
    delta: dict[str, float] = field(default_factory=dict)  # last - first epoch of the mean: net, loss, gain
    truth_total: list[float] | None = None
    truth_delta: dict[str, float] = field(default_factory=dict)
    truth_cells: list[np.ndarray] | None = None  # per epoch the true biomass at every plot cell
    err: dict[str, float] = field(default_factory=dict)  # mean map vs truth over every epoch: n, sums
    covered: list[tuple[float, float]] = field(default_factory=list)  # per epoch (inside the interval, cells)

    @classmethod
    def from_maps(cls, prep: Prepared, maps: Sequence[np.ndarray], quantiles: Sequence[float] | None = None,
                  truth: Sequence[np.ndarray] | None = None) -> MapStats:
        """The statistics of maps held in memory: per epoch (channels, H, W) or (H, W)."""
        maps = [m[None] if m.ndim == 2 else m for m in maps]
        acc = _Accumulator(prep, quantiles, truth is not None)
        acc.add(0, 0, list(maps), None if truth is None else list(truth))
        return acc.stats()


class _Accumulator:
    """Adds up :class:`MapStats` block by block."""

    def __init__(self, prep: Prepared, quantiles: Sequence[float] | None, with_truth: bool) -> None:
        self.prep, self.with_truth = prep, with_truth
        self.ends = _interval_ends(quantiles) if quantiles else None
        n = len(prep.epochs)
        self.total = [0.0] * n
        self.cells: list[np.ndarray | None] = [None] * n
        self.delta = {"net": 0.0, "loss": 0.0, "gain": 0.0}
        self.t_total, self.t_delta = [0.0] * n, {"net": 0.0, "loss": 0.0, "gain": 0.0}
        self.t_cells = [np.full(len(p.pix_rows), np.nan) for p in prep.plots]
        self.err = {"n": 0.0, "err": 0.0, "err2": 0.0, "obs": 0.0, "obs2": 0.0}
        self.covered = [[0.0, 0.0] for _ in range(n)]

    def add(self, r0: int, c0: int, maps: list[np.ndarray], truth: list[np.ndarray] | None) -> None:
        h, w = maps[0].shape[1:]
        for e, (m, p) in enumerate(zip(maps, self.prep.plots)):
            if self.cells[e] is None:
                self.cells[e] = np.full((m.shape[0], len(p.pix_rows)), np.nan)
            sel = np.flatnonzero((p.pix_rows >= r0) & (p.pix_rows < r0 + h) & (p.pix_cols >= c0) &
                                 (p.pix_cols < c0 + w))
            self.cells[e][:, sel] = m[:, p.pix_rows[sel] - r0, p.pix_cols[sel] - c0]
            self.total[e] += float(m[-1].sum(dtype=np.float64))
            if truth is not None:
                t = truth[e]
                ok = np.isfinite(t)
                self.t_cells[e][sel] = t[p.pix_rows[sel] - r0, p.pix_cols[sel] - c0]
                self.t_total[e] += float(t[ok].sum(dtype=np.float64))
                d = (m[-1] - t)[ok].astype(np.float64)
                for k, v in (("n", ok.sum()), ("err", d.sum()), ("err2", (d * d).sum()),
                             ("obs", t[ok].sum(dtype=np.float64)), ("obs2", (t[ok].astype(np.float64) ** 2).sum())):
                    self.err[k] += float(v)
                if self.ends is not None:
                    lo, hi = self.ends
                    self.covered[e][0] += float(((t >= m[lo]) & (t <= m[hi]) & ok).sum())
                    self.covered[e][1] += float(ok.sum())
        if len(maps) >= 2:
            d = (maps[-1][-1] - maps[0][-1]).astype(np.float64)
            self.delta["net"] += float(d.sum())
            self.delta["loss"] += float(np.minimum(d, 0).sum())
            self.delta["gain"] += float(np.maximum(d, 0).sum())
            if truth is not None:
                td = (truth[-1] - truth[0]).astype(np.float64)
                td = td[np.isfinite(td)]
                self.t_delta["net"] += float(td.sum())
                self.t_delta["loss"] += float(np.minimum(td, 0).sum())
                self.t_delta["gain"] += float(np.maximum(td, 0).sum())

    def stats(self) -> MapStats:
        H, W = self.prep.shape
        t = self.with_truth
        return MapStats(cells=[c if c is not None else np.zeros((1, 0)) for c in self.cells], total=self.total,
                        cells_count=H * W, delta=self.delta if len(self.total) >= 2 else {},
                        truth_total=self.t_total if t else None, truth_delta=self.t_delta if t else {},
                        truth_cells=self.t_cells if t else None, err=self.err if t else {},
                        covered=[tuple(c) for c in self.covered] if t else [])


def map_pass(prep: Prepared, block: Block, *, quantiles: Sequence[float] | None = None, writer: Any = None,
             truth: bool = True, size: int = BLOCK, progress: bool = False) -> MapStats:
    """The maps of every epoch made block by block (``size`` cells a side; each block's seams are
    those of the whole map, see :func:`_blend`), each handed to ``writer.write(r0, c0, maps)``
    and added to the returned :class:`MapStats` (the truth's too when ``truth`` and known).
    Memory holds one block of every epoch, whatever the region's size."""
    from tqdm.auto import tqdm

    H, W = prep.shape
    with_truth = truth and prep.has_truth
    acc = _Accumulator(prep, quantiles, with_truth)
    corners = [(r, c) for r in range(0, H, size) for c in range(0, W, size)]
    for r0, c0 in tqdm(corners, desc="map blocks", unit="block", disable=not progress or len(corners) < 2,
                       mininterval=5):
        h, w = min(size, H - r0), min(size, W - c0)
        maps = [block(e, r0, c0, h, w) for e in range(len(prep.epochs))]
        if writer is not None:
            writer.write(r0, c0, maps)
        tr = [prep.truth_window(e, r0, c0, h, w) for e in range(len(prep.epochs))] if with_truth else None
        acc.add(r0, c0, maps, tr)
    return acc.stats()


def _as_stats(prep: Prepared, maps: MapStats | Sequence[np.ndarray]) -> MapStats:
    return maps if isinstance(maps, MapStats) else MapStats.from_maps(prep, maps)


def _plot_values(prep: Prepared, stats: MapStats, ids: set[str], channel: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(observed, predicted) biomass of the plots in ``ids`` over every epoch: the plot's own
    biomass against the map's mean over the cells the plot covers."""
    obs, pred = [], []
    for e, p in enumerate(prep.plots):
        sel, mean = _plot_means(p, stats.cells[e][channel], ids)
        obs.append(p.agb[sel])
        pred.append(mean)
    return np.concatenate(obs), np.concatenate(pred)


def _plot_means(p: S.Plots, at_cells: np.ndarray, ids: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the plots in ``ids`` and the mean over each one's cells of a map's values
    ``at_cells`` (at every plot cell, the order of ``p.pix_*``)."""
    cells = p.cells(ids)
    k = p.pix_plot[cells]
    n = np.bincount(k, minlength=len(p.ids))
    sums = np.bincount(k, weights=at_cells[cells], minlength=len(p.ids))
    sel = np.flatnonzero(n > 0)
    return sel, sums[sel] / n[sel]


def _cell_values(prep: Prepared, stats: MapStats, ids: set[str], channel: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(observed, predicted) biomass of every cell the plots in ``ids`` cover, over every epoch."""
    obs, pred = [], []
    for e, p in enumerate(prep.plots):
        cells = p.cells(ids)
        obs.append(p.pix_agb[cells])
        pred.append(stats.cells[e][channel][cells])
    return np.concatenate(obs), np.concatenate(pred)


def _gross_residuals(prep: Prepared, stats: MapStats, ids: set[str]) -> dict[str, np.ndarray] | None:
    """Per plot in ``ids``, the mean over its cells measured at the first and last epoch of the
    true minus the mapped cell loss (``min(0, change)``) and gain (``max(0, change)``); None
    unless both epochs are stem-mapped (only then is a cell's own change known)."""
    p0, p1 = prep.plots[0], prep.plots[-1]
    if not (p0.stem_mapped and p1.stem_mapped):
        return None
    first = {}
    for c in p0.cells(ids):
        first[(p0.ids[p0.pix_plot[c]], int(p0.pix_rows[c]), int(p0.pix_cols[c]))] = (float(p0.pix_agb[c]),
                                                                                     float(stats.cells[0][-1][c]))
    out: dict[str, dict[str, list[float]]] = {"losses (sources)": {}, "gains (sinks)": {}}
    for c in p1.cells(ids):
        pid, r, q = p1.ids[p1.pix_plot[c]], int(p1.pix_rows[c]), int(p1.pix_cols[c])
        if (pid, r, q) not in first:
            continue
        true0, mapped0 = first[(pid, r, q)]
        true = float(p1.pix_agb[c]) - true0
        mapped = float(stats.cells[-1][-1][c]) - mapped0
        out["losses (sources)"].setdefault(pid, []).append(min(true, 0.0) - min(mapped, 0.0))
        out["gains (sinks)"].setdefault(pid, []).append(max(true, 0.0) - max(mapped, 0.0))
    if len(out["gains (sinks)"]) < 2:
        return None
    return {name: np.array([np.mean(v) for v in per.values()]) for name, per in out.items()}


def _map_scores(st: MapStats) -> dict[str, float]:
    """RMSE, bias and R2 of the mean map against the true map over every cell and epoch."""
    n, err, err2, obs, obs2 = (st.err[k] for k in ("n", "err", "err2", "obs", "obs2"))
    ss = obs2 - obs * obs / n
    return {"rmse_mg_ha_map": float(np.sqrt(err2 / n)), "bias_mg_ha_map": float(err / n),
            "r2_map": float(1 - err2 / ss) if ss > 0 else float("nan")}


def baseline_scores(prep: Prepared, block: Block, test_ids: set[str]) -> dict[str, float]:
    """A baseline's RMSE, bias and R2 on the held-out plots and, where the true biomass is known,
    over the whole true map (one pass over the map; else only the windows around the plots)."""
    if prep.has_truth:
        st = map_pass(prep, block)
        return {**_scores(*_plot_values(prep, st, test_ids)), **_map_scores(st)}
    st = MapStats(cells=cell_values(prep, block), total=[], cells_count=0)
    return _scores(*_plot_values(prep, st, test_ids))


def _scores(obs: np.ndarray, pred: np.ndarray, suffix: str = "") -> dict[str, float]:
    err = pred - obs
    ss = ((obs - obs.mean()) ** 2).sum()
    return {f"rmse_mg_ha{suffix}": float(np.sqrt((err**2).mean())), f"bias_mg_ha{suffix}": float(err.mean()),
            f"r2{suffix}": float(1 - (err**2).sum() / ss) if ss > 0 else float("nan")}


def budget(prep: Prepared, maps: MapStats | Sequence[np.ndarray], test_ids: set[str]) -> list[dict[str, Any]]:
    """Regional carbon per epoch and its change, model-assisted (a difference estimator with the
    held-out plots as the probability sample): total = sum of the map + N x mean plot residual,
    90 % interval from the residuals' standard error. Rows: quantity, value, lower, upper, unit
    (Mg C), and ``true`` when the region's true biomass is known. ``maps``: the
    :class:`MapStats` of a map pass, or the mean maps (H, W) held in memory.

    The gross losses and gains are per map cell (the sum of the cells' decreases, and of their
    increases). Differencing two noisy maps inflates both (noise adds to each side), so when the
    plots are stem-mapped at both epochs they are model-assisted too: each held-out plot's mean
    over its cells of (true cell loss - mapped cell loss) is the residual (see
    :func:`_gross_residuals`). Without stem maps they are the maps' difference alone, with no
    interval (``plots`` 0)."""
    if not isinstance(maps, MapStats) and prep.truth_readers is not None and prep.in_memory:
        maps = MapStats.from_maps(prep, maps, truth=prep.truth)
    st = _as_stats(prep, maps)
    N = st.cells_count
    k = prep.grid.area_ha * CARBON_FRACTION  # Mg/ha -> Mg C per pixel
    rows, resid = [], []
    for e, year in enumerate(prep.epochs):
        p = prep.plots[e]
        sel, mean = _plot_means(p, st.cells[e][-1], test_ids)
        res = p.agb[sel] - mean
        resid.append(dict(zip([p.ids[i] for i in sel], res)))
        total = (st.total[e] + N * res.mean()) * k
        se = N * res.std(ddof=1) / np.sqrt(len(res)) * k
        row = {"quantity": f"carbon stock {year}", "value": total, "lower_90": total - Z90 * se,
               "upper_90": total + Z90 * se, "unit": "Mg C", "map_only": st.total[e] * k, "plots": len(res)}
        if st.truth_total is not None:
            row["true"] = float(st.truth_total[e] * k)
        rows.append(row)
    if len(prep.epochs) >= 2:
        a, b = resid[0], resid[-1]
        both = sorted(set(a) & set(b))
        dres = np.array([b[i] - a[i] for i in both])
        change = (st.delta["net"] + N * dres.mean()) * k
        se = N * dres.std(ddof=1) / np.sqrt(len(dres)) * k
        span = f"{prep.epochs[0]}-{prep.epochs[-1]}"
        rows.append({"quantity": f"net change {span}", "value": change, "lower_90": change - Z90 * se,
                     "upper_90": change + Z90 * se, "unit": "Mg C", "map_only": st.delta["net"] * k,
                     "plots": len(dres)})
        gross = _gross_residuals(prep, st, test_ids)
        for name, part in (("losses (sources)", "loss"), ("gains (sinks)", "gain")):
            mapped = float(st.delta[part] * k)
            row = {"quantity": f"{name} {span}", "value": mapped, "unit": "Mg C", "map_only": mapped, "plots": 0}
            if gross is not None:  # model-assisted like the stocks, from the re-measured stem-mapped plots
                r = gross[name]
                value = mapped + N * r.mean() * k
                se = N * r.std(ddof=1) / np.sqrt(len(r)) * k
                row.update(value=value, lower_90=value - Z90 * se, upper_90=value + Z90 * se, plots=len(r))
            rows.append(row)
        if st.truth_total is not None:
            rows[-3]["true"] = float(st.truth_delta["net"] * k)
            rows[-2]["true"] = float(st.truth_delta["loss"] * k)
            rows[-1]["true"] = float(st.truth_delta["gain"] * k)
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
HEAD_CHOICES = ("auto", *HEADS)  # auto: the head of the three with the lowest cross-validated plot RMSE
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
                       seed: int) -> dict[str, Any]:
    """Cross-conformal calibration of the 90 % interval (conformalised quantile regression): the
    training plots are split into ``folds`` groups (a plot's epochs stay together); a model fitted
    on the other folds scores each group by ``max(q05 - y, y - q95) / (q95 - q05)`` (the miss in
    units of the interval's own width, so a wide interval over dense forest and a narrow one over
    a field are calibrated alike); the width factor is the ``ceil(0.9 (n + 1))``-th smallest of
    the n scores. The same out-of-fold maps give ``cv_rmse_mg_ha``, the plots' biomass against
    the map's mean over each plot, as the held-out test scores it.

    ``fit(ids, seed)`` returns a model, or a dict of candidate models by name (then the result is
    a dict of these figures by name: each candidate is calibrated and cross-validated on the same
    folds, e.g. to choose a head). Held-out plots are never touched, so coverage on them stays an
    honest test."""
    ids = sorted(ids)
    if folds < 2 or len(ids) < 2 * folds:
        raise ConfigError(f"interval calibration needs >= 2 folds of >= 2 plots; {len(ids)} plots, {folds} folds")
    order = np.random.default_rng((seed, 17)).permutation(len(ids))
    lo, hi = _interval_ends(quantiles)
    scores: dict[str, list[np.ndarray]] = {}
    errors: dict[str, list[np.ndarray]] = {}
    single = True
    for k in range(folds):
        held = {ids[i] for i in order[k::folds]}
        models = fit([i for i in ids if i not in held], seed + 1000 + k)
        if isinstance(models, Mapping):
            single = False
        else:
            models = {"": models}
        for name, model in models.items():
            at = cell_values(prep, model_blocks(model, prep), held)  # the held-out plots' cells only
            obs = np.concatenate([p.pix_agb[p.cells(held)] for p in prep.plots])
            plo, phi = np.concatenate([v[lo] for v in at]), np.concatenate([v[hi] for v in at])
            scores.setdefault(name, []).append(np.maximum(plo - obs, obs - phi) / np.maximum(phi - plo, WIDTH_FLOOR))
            for p, v in zip(prep.plots, at):  # plot-scale errors of the map's mean, as the test scores them
                full = np.full(len(p.pix_plot), np.nan)
                full[p.cells(held)] = v[-1]
                sel, mean = _plot_means(p, full, held)
                errors.setdefault(name, []).append(mean - p.agb[sel])
    out: dict[str, Any] = {}
    for name, sc_list in scores.items():
        sc = np.sort(np.concatenate(sc_list))
        n = len(sc)
        err = np.concatenate(errors[name])
        out[name] = {"width_factor": float(sc[min(n, int(np.ceil(0.9 * (n + 1)))) - 1]),  # the ceil(0.9 (n+1))-th
                     "folds": float(folds), "scores": float(n), "raw_coverage_90": float(np.mean(sc <= 0)),
                     "cv_rmse_mg_ha": float(np.sqrt(np.mean(err**2))) if err.size else float("nan")}
    return out[""] if single else out


def evaluate_maps(prep: Prepared, maps: MapStats | list[np.ndarray], train_ids: set[str], test_ids: set[str],
                  quantiles: Sequence[float]) -> dict[str, float]:
    """Scores of the maps (quantiles, then the mean; the :class:`MapStats` of :func:`map_pass`, or
    the maps held in memory): held-out plots (RMSE, bias, R2 of the mean), the full true map, the
    90 % interval's coverage of the pixels outside the training plots, and the regional budget
    against the truth."""
    if not isinstance(maps, MapStats):
        maps = MapStats.from_maps(prep, maps, quantiles, truth=prep.truth if prep.has_truth else None)
    st = maps
    m = _scores(*_plot_values(prep, st, test_ids))
    lo, hi = _interval_ends(quantiles)
    if st.truth_cells is not None:
        m.update(_map_scores(st))
        hit = total = 0.0
        for e, p in enumerate(prep.plots):  # every cell but those of the training plots
            inside, cells = st.covered[e]
            c = p.cells(train_ids)
            _, first = np.unique(np.stack([p.pix_rows[c], p.pix_cols[c]]), axis=1, return_index=True)
            c = c[first]
            t, q = st.truth_cells[e][c], st.cells[e][:, c]
            ok = np.isfinite(t)
            hit += inside - float(((t >= q[lo]) & (t <= q[hi]) & ok).sum())
            total += cells - float(ok.sum())
        m["coverage_90"] = hit / max(total, 1.0)
    else:
        obs_lo, p_lo = _cell_values(prep, st, test_ids, lo)
        _, p_hi = _cell_values(prep, st, test_ids, hi)
        m["coverage_90"] = float(((obs_lo >= p_lo) & (obs_lo <= p_hi)).mean())
    rows = budget(prep, st, test_ids)
    last = [r for r in rows if r["quantity"].startswith("carbon stock")][-1]
    m["budget_total_mg_c"] = float(last["value"])
    m["budget_interval_halfwidth_pct"] = float(100 * (last["upper_90"] - last["value"]) / abs(last["value"]))
    if "true" in last:
        m["budget_error_pct"] = float(100 * (last["value"] - last["true"]) / last["true"])
        m["budget_in_interval"] = float(last["lower_90"] <= last["true"] <= last["upper_90"])
        ch = next((r for r in rows if r["quantity"].startswith("net change")), None)
        if ch is not None:
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
             head: Annotated[str | None, opt.Opt("auto, network, forest or ensemble (None: auto from a checkpoint, "
                                             "network from scratch; auto: the one of the three with the "
                                             "lowest cross-validated plot RMSE on the training plots)")] = None,
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
    not apply), ``ensemble`` (the two averaged) or ``auto`` (the default from a checkpoint: the
    network and the forest are fitted on the same cross-validation folds of the training plots as
    the calibration (5 folds when ``calibration_folds`` is 0), and the one of the three heads with
    the lowest out-of-fold plot RMSE is kept, with its own calibration; the held-out plots play no
    part; with too few plots to cross-validate, ``ensemble``). The 90 % interval is calibrated by
    cross-conformal prediction on the training plots (``calibration_folds`` extra fits, fewer when
    there are under two plots per fold; 0 skips it; see :func:`calibrate_interval`). Writes ``out/model``, maps
    (``maps/*.tif`` cloud-optimised GeoTIFF, ``maps/carbon.nc`` CF NetCDF), ``budget.csv`` and
    ``metrics.json``."""
    if task != "biomass":
        raise ConfigError(f"unknown carbon task {task!r}; expected 'biomass'")
    if head is not None and head not in HEAD_CHOICES:
        raise ConfigError(f"unknown head {head!r}; expected one of {', '.join(HEAD_CHOICES)} (--head)")
    if head not in (None, "network") and ckpt is None:
        raise ConfigError(f"--head {head}: {'an' if head == 'auto' else 'a'} {head} head maps a pretrained "
                          "embedding: it needs a checkpoint (--from PATH), not --from scratch")
    label_budget = LabelBudget.from_options(labels, label_fraction, pool="field plots outside the held-out 30 %",
                                      minimum=2)
    out = Path(out)
    ckpt = resolve_checkpoint(ckpt)  # a shipped checkpoint's name (carbon.tiny) -> its folder
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
    head = head or ("auto" if ckpt is not None else "network")
    if head not in HEAD_CHOICES:
        raise ConfigError(f"unknown head {head!r}; expected one of {', '.join(HEAD_CHOICES)}")
    if head != "network" and ckpt is None:
        raise ConfigError(f"{'an' if head == 'auto' else 'a'} {head} head maps a pretrained embedding: it needs a "
                          "checkpoint (--from PATH)")
    kw = {"steps": steps, "batch_size": batch_size, "seed": seed, "precision": precision, "device": device,
          "progress": progress}
    if head != "network":  # the frozen embedding at every plot cell, made once
        base = recipe.build(f"carbon_net.{size}", mk, seed=seed, ckpt=ckpt)
        emb = cell_values(prep, lambda e, r0, c0, h, w: embed_block(base, functools.partial(prep.window, e),
                                                                    prep.padded, r0, c0, h, w))
    mk0 = dict(mk)  # the network's own arguments (the forest's sizes are added for the saved model)

    def candidates(ids: Sequence[str], s_: int, out_dir: Path | None = None) -> dict[str, CarbonNet]:
        """The three heads from one network fit and one forest fit on ``ids``."""
        net = _fit(prep, ckpt, size, mk0, ids, lr=lr, layer_decay=layer_decay, mode=mode, out_dir=out_dir,
                   **{**kw, "seed": s_, "progress": kw["progress"] and out_dir is not None})
        fo = _fit_forest_head(base, emb, prep, set(ids), s_)
        return {"network": net, "forest": fo, "ensemble": CarbonEnsemble.combine(net, fo, get_size(size), **mk0)}

    def refit(ids: Sequence[str], s_: int, out_dir: Path | None = None) -> CarbonNet:
        if head == "forest":
            return _fit_forest_head(base, emb, prep, set(ids), s_)
        if head == "network":
            return _fit(prep, ckpt, size, mk0, ids, lr=lr, layer_decay=layer_decay, mode=mode, out_dir=out_dir,
                        **{**kw, "seed": s_, "progress": kw["progress"] and out_dir is not None})
        return candidates(ids, s_, out_dir)["ensemble"]

    calib: dict[str, float] = {}
    folds = min(calibration_folds or 5 if head == "auto" else calibration_folds, len(chosen) // 2)
    head_cv: dict[str, float] = {}
    requested = head
    if head == "auto":  # cross-validate the three heads on the training plots, keep the best
        if folds < 2:
            LOGGER.warning("%d plots are too few to cross-validate the heads (>= 4 needed); using the ensemble",
                           len(chosen))
            head = "ensemble"
        else:
            cv = calibrate_interval(prep, candidates, chosen, base.quantiles, folds=folds, seed=seed)
            head_cv = {h: c["cv_rmse_mg_ha"] for h, c in cv.items()}
            head = min(head_cv, key=lambda h: head_cv[h])
            LOGGER.info("head by %d-fold cross-validation on the training plots (plot RMSE, Mg/ha): %s; kept %s",
                        folds, ", ".join(f"{h} {v:.1f}" for h, v in head_cv.items()), head)
            if calibration_folds:
                calib = cv[head]
    if head == "forest":
        mode = "frozen"  # the network is not trained at all
    model = refit(chosen, seed, out / "train")  # the head kept, fitted on every training plot
    family = "carbon_ensemble" if head == "ensemble" else "carbon_net"
    if model.has_forest or isinstance(model, CarbonEnsemble):
        fm = model.forest_net if isinstance(model, CarbonEnsemble) else model
        mk = {**mk, "forest_trees": int(fm.forest_roots.numel()), "forest_nodes": int(fm.forest_left.numel())}
    folds = min(calibration_folds, len(chosen) // 2)  # every fold holds >= 2 plots
    if calibration_folds and folds < 2:
        LOGGER.warning("%d plots are too few to calibrate the interval (>= 4 needed); it stays uncalibrated",
                       len(chosen))
    elif calibration_folds and not calib:
        calib = calibrate_interval(prep, refit, chosen, model.quantiles, folds=folds, seed=seed)
    post = predictor(model, {"processors": {"calibration": calib}}).post
    writer = MapWriter(prep, out, model.quantiles)
    try:
        stats = map_pass(prep, model_blocks(model, prep, post), quantiles=model.quantiles, writer=writer,
                         progress=progress)
    except BaseException:
        writer.abort()
        raise
    metrics = evaluate_maps(prep, stats, train_ids, test_ids, model.quantiles)
    metrics.update({f"calibration_{k}": v for k, v in calib.items()})
    metrics.update({f"head_cv_rmse_mg_ha_{h}": v for h, v in head_cv.items()})

    def scratch() -> dict[str, float]:
        sm = _fit(prep, None, size, mk0, chosen, lr=lr, layer_decay=1.0, mode="full", out_dir=None, **kw)
        return baseline_scores(prep, model_blocks(sm, prep), test_ids)

    def forest() -> dict[str, float]:
        return baseline_scores(prep, forest_blocks(random_forest(prep, train_ids, seed), prep), test_ids)

    metrics.update(recipe.run_baselines(wanted, {"scratch": scratch, "rf": forest}))
    metrics.update({"labelled_plots": float(labels), "test_plots": float(len(test)), "epochs": float(len(prep.epochs))})
    writer.close(budget(prep, stats, test_ids))
    mc = ModelConfig(domain="carbon", task="biomass", model_type=f"{family}.{size}", model_kwargs=mk,
                     geometry={"grid": prep.grid.describe(), "sources": S.sources_json(prep.specs),
                               "tile": mk["tile"], "quantiles": list(model.quantiles)},
                     processors={"calibration": calib},
                     card=_card(prep, f"{HEADS[head]} ({ckpt or 'scratch'}), fitted on {labels} field plots."),
                     training={"plots": chosen, "from": str(ckpt) if ckpt else "scratch", "head": head,
                               "head_requested": requested, "head_cv_rmse_mg_ha": head_cv,
                               "steps": steps if head != "forest" else 0, "lr": lr,
                               "layer_decay": layer_decay, "mode": mode, "seed": seed, "data": str(data)})
    recipe.finish(model, out, mc, metrics)
    return metrics


NODATA = -9999.0


def _map_names(quantiles: Sequence[float]) -> list[str]:
    return [*(f"agb_q{int(round(100 * q)):02d}" for q in quantiles), "agb_mean"]


class MapWriter:
    """Biomass / carbon / uncertainty maps written block by block: per epoch ``agb_<year>.tif``
    (the quantiles, then the mean) and ``carbon_<year>.tif``, and ``change.tif``, each a tiled
    GeoTIFF while the blocks come, then a cloud-optimised GeoTIFF with overviews; then one CF
    NetCDF ``carbon.nc`` read back from them chunk by chunk. Everything is made in a temporary
    folder that becomes ``out/maps`` only when complete (:meth:`close`; :meth:`abort` removes
    it), so an interrupted run leaves no half-written map."""

    def __init__(self, prep: Prepared, out: Path, quantiles: Sequence[float]) -> None:
        import tempfile

        import rasterio

        self.prep, self.out, self.quantiles = prep, Path(out), list(quantiles)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".maps.tmp-", dir=self.out))
        H, W = prep.shape
        names = _map_names(quantiles)
        self.layers: dict[str, tuple[list[str], str, str]] = {}
        for year in prep.epochs:
            self.layers[f"agb_{year}"] = (names, "Mg ha-1", f"above-ground biomass quantiles {year}")
            self.layers[f"carbon_{year}"] = ([n.replace("agb", "carbon") for n in names], "Mg C ha-1",
                                             f"carbon stock quantiles {year}")
        if len(prep.epochs) >= 2:
            self.layers["change"] = (["carbon_change"], "Mg C ha-1",
                                     f"carbon change {prep.epochs[0]}-{prep.epochs[-1]}")
        self.ds: dict[str, Any] = {}
        try:
            for name, (bands, _, _) in self.layers.items():
                self.ds[name] = rasterio.open(
                    self.tmp / f".{name}.tiled.tif", "w", driver="GTiff", width=W, height=H, count=len(bands),
                    dtype="float32", crs=prep.grid.crs, transform=prep.grid.transform, nodata=NODATA, tiled=True,
                    blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="IF_SAFER")
        except BaseException:
            self.abort()
            raise

    def write(self, r0: int, c0: int, maps: list[np.ndarray]) -> None:
        """The (Q + 1, h, w) maps of every epoch on the block whose upper-left cell is (r0, c0)."""
        from rasterio.windows import Window

        h, w = maps[0].shape[1:]
        win = Window(c0, r0, w, h)
        for year, m in zip(self.prep.epochs, maps):
            self.ds[f"agb_{year}"].write(m.astype(np.float32), window=win)
            self.ds[f"carbon_{year}"].write((m * CARBON_FRACTION).astype(np.float32), window=win)
        if "change" in self.ds:
            self.ds["change"].write(((maps[-1][-1] - maps[0][-1]) * CARBON_FRACTION).astype(np.float32)[None],
                                    window=win)

    def close(self, rows: list[dict[str, Any]] | None = None) -> Path:
        """Finish the COGs and the NetCDF, put them at ``out/maps`` (and ``rows`` at
        ``out/budget.csv``); returns ``out/maps``."""
        import rasterio
        import rasterio.shutil

        from hfmi_kit.config import move_into_place

        try:
            for name, (bands, units, description) in self.layers.items():
                d = self.ds.pop(name)
                for i, b in enumerate(bands, start=1):
                    d.set_band_description(i, b)
                    d.update_tags(i, units=units)
                d.update_tags(DESCRIPTION=description, units=units)
                tiled = Path(d.name)
                d.close()
                rasterio.shutil.copy(tiled, self.tmp / f"{name}.tif", driver="COG", COMPRESS="DEFLATE",
                                     BLOCKSIZE="512", OVERVIEW_RESAMPLING="AVERAGE", BIGTIFF="IF_SAFER")
                tiled.unlink()
            self._netcdf(self.tmp / "carbon.nc")
            maps = move_into_place(self.tmp, self.out / "maps")
        except BaseException:
            self.abort()
            raise
        if rows is not None:
            write_budget(rows, self.out)
        return maps

    def abort(self) -> None:
        import shutil

        for d in self.ds.values():
            d.close()
        self.ds = {}
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _netcdf(self, path: Path) -> None:
        import dask.array as da
        import xarray as xr

        from hfmi_kit.data.cf import write_cf

        prep = self.prep
        H, W = prep.shape
        t = prep.grid.transform
        names = _map_names(self.quantiles)
        rows = max(1, min(H, (64 * 2**20) // (4 * W)))  # chunks of about 64 MB

        def stack(kind: str, band: int) -> Any:
            files = [self.tmp / f"{kind}_{y}.tif" for y in prep.epochs]
            return da.from_array(_Bands(files, band, (H, W)), chunks=(1, rows, W), asarray=True, lock=True)

        data_vars = {}
        for qi, name in enumerate(names):
            data_vars[name] = (("time", "y", "x"), stack("agb", qi + 1),
                               {"long_name": (f"above-ground biomass, {self.quantiles[qi]:.0%} quantile"
                                              if qi < len(self.quantiles) else "above-ground biomass, mean"),
                                "units": "Mg ha-1", "grid_mapping": "spatial_ref"})
        data_vars["carbon"] = (("time", "y", "x"), stack("carbon", len(names)),
                               {"long_name": "carbon stock in above-ground biomass", "units": "Mg ha-1",
                                "grid_mapping": "spatial_ref"})
        ds = xr.Dataset(data_vars, coords={
            "time": ("time", np.array([np.datetime64(f"{y_}-07-01", "ns") for y_ in prep.epochs]),
                     {"standard_name": "time"}),
            "y": ("y", t.f + t.e * (np.arange(H) + 0.5), {"standard_name": "projection_y_coordinate", "units": "m",
                                                          "axis": "Y"}),
            "x": ("x", t.c + t.a * (np.arange(W) + 0.5), {"standard_name": "projection_x_coordinate", "units": "m",
                                                          "axis": "X"})},
            attrs={"Conventions": "CF-1.8", "title": "hfmi_kit biomass and carbon maps", "institution": "hfmi_kit",
                   "source": "hfmi_kit carbon_net", "history": f"{np.datetime64('now')}: predicted",
                   "references": "Chave et al. 2014 allometry; carbon fraction 0.47 (IPCC)"})
        ds["spatial_ref"] = xr.DataArray(np.int32(0), attrs={"crs_wkt": prep.grid.crs.to_wkt(),
                                                             "spatial_ref": prep.grid.crs.to_wkt(),
                                                             "GeoTransform": " ".join(map(str, list(t)[:6]))})
        for v in [*names, "carbon"]:
            ds[v].encoding.update(_FillValue=np.float32(NODATA), chunksizes=(1, min(rows, 512), min(W, 512)),
                                  zlib=True, complevel=1)
        write_cf(ds, path)


class _Bands:
    """One band of a GeoTIFF per epoch as a lazy (time, y, x) array, read window by window."""

    def __init__(self, files: list[Path], band: int, shape: tuple[int, int]) -> None:
        self.files, self.band = files, band
        self.shape, self.dtype, self.ndim = (len(files), *shape), np.dtype("float32"), 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        from rasterio.windows import Window

        ts, ys, xs = (k.indices(n) for k, n in zip(key, self.shape))
        out = []
        for i in range(*ts):
            with T.open_raster(self.files[i]) as src:
                out.append(src.read(self.band, window=Window(xs[0], ys[0], xs[1] - xs[0], ys[1] - ys[0])))
        return np.stack(out) if out else np.zeros((0, ys[1] - ys[0], xs[1] - xs[0]), np.float32)


def write_budget(rows: list[dict[str, Any]], out: Path) -> Path:
    """The regional budget's rows as ``out/budget.csv``, atomically."""
    import pandas as pd

    tmp = out / ".budget.csv.tmp"
    pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")
    return tmp.replace(out / "budget.csv")


def write_maps(prep: Prepared, maps: list[np.ndarray], rows: list[dict[str, Any]], out: Path,
               quantiles: Sequence[float]) -> None:
    """Maps held in memory (per epoch (Q + 1, H, W)) as :class:`MapWriter` writes them, and
    ``budget.csv``."""
    w = MapWriter(prep, out, quantiles)
    try:
        w.write(0, 0, maps)
    except BaseException:
        w.abort()
        raise
    w.close(rows)


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
    """The (Q + 1, H, W) maps of every epoch of ``prep`` (a region held in memory) by the model
    of ``pred``, its calibrated interval applied (``pred.post``)."""
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
    """Map the region block by block (every epoch, the calibrated 90 % interval; written under
    ``out/maps`` as they are made when ``out`` is given) and score the maps on the held-out plots
    (:func:`evaluate_maps`); the outputs are the regional budget's rows."""
    model = pred.model
    if not isinstance(model, CarbonNet):
        raise ConfigError(f"{pred.source}: {pred.config.get('model_type')} is not a carbon biomass model")
    prep, train_ids, test_ids = bundle.items
    writer = MapWriter(prep, out, model.quantiles) if out is not None else None
    try:
        stats = map_pass(prep, model_blocks(model, prep, pred.post), quantiles=model.quantiles, writer=writer,
                         progress=True)
        rows = budget(prep, stats, test_ids)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return Scored(evaluate_maps(prep, stats, train_ids, test_ids, model.quantiles), outputs=rows)


def write_outputs(scored: Scored, out: Path) -> list[Path]:
    """``budget.csv`` (the maps, COG and CF NetCDF, were written by :func:`score` as they were made)."""
    write_budget(scored.outputs, out)
    return [out / "maps", out / "budget.csv"]


@opt.typed
def evaluate(*, ckpt: opt.Checkpoint, data: opt.Data, out: opt.Out) -> dict[str, float]:
    """Map a region with a fine-tuned model and score it on the plots it was not trained on."""
    return recipe.evaluate(get_domain("carbon"), ckpt=ckpt, data=data, out=out)
