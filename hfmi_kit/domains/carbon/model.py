"""The multi-source model: one token group per source band plus a query group; missing data are
absent (padding) tokens. A pixel decoder joins the query tokens' context with each pixel's own
source values. Pretraining hides whole sources twice over: their tokens (reconstructed by the MAE
decoder) and, in a second pass, one source per tile at the pixel level (reconstructed through
the pixel decoder, so the pathway that fine-tuning maps to biomass is pretrained too).
Fine-tuning predicts biomass quantiles and the mean per pixel from the pixel decoder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hfmi_kit.errors import ConfigError, DataError
from hfmi_kit.models import Backbone, EncoderConfig, GridTokenizer, mae_forward, make_decoder, register_model
from hfmi_kit.models.tokenizers import TokenBatch, patchify

QUERY = "query"
TARGET_SCALE = 100.0  # Mg/ha: biomass is learned in units of 100 Mg/ha


class CarbonNet(nn.Module):
    """Tiles of aligned sources -> tokens -> encoder -> pixel decoder; the MAE decoder and the pixel
    reconstruction (pretraining) and the biomass quantile and mean head (fine-tuning).

    Args:
        groups: token groups ``source:band`` (from the source descriptions).
        tile, patch: tile side and patch side in pixels.
        quantiles: predicted biomass quantiles (the middle one is the point estimate).
        min_valid: a patch becomes a token only if this fraction of its pixels has data.
        plot_weight: weight of the plot-mean error in the fine-tuning loss (batches with a
            ``plot_index``: each labelled cell's plot, -1 elsewhere); 0 leaves it out.
        forest_trees, forest_nodes: sizes of a forest head (see :meth:`set_forest`); 0: none.

    A batch holds ``fields`` as ``<group>`` keys (B, tile, tile) already normalised, NaN where the
    source has no data, and for fine-tuning ``target`` (B, tile, tile) in Mg/ha, NaN off the plots.
    """

    def __init__(self, *, size: EncoderConfig, groups: Sequence[str], tile: int = 32, patch: int = 8,
                 quantiles: Sequence[float] = (0.05, 0.5, 0.95), min_valid: float = 0.5,
                 mask_ratio: float = 0.5, plot_weight: float = 1.0, forest_trees: int = 0,
                 forest_nodes: int = 0) -> None:
        super().__init__()
        self.groups, self.tile, self.patch = list(groups), tile, patch
        self.quantiles = list(quantiles)
        self.min_valid, self.mask_ratio, self.plot_weight = min_valid, mask_ratio, plot_weight
        tok = GridTokenizer(groups=[*self.groups, QUERY], grid=(tile, tile), patch=(patch, patch), dim=size.dim)
        self.backbone = Backbone(tok, size)
        self.decoder = make_decoder(self.backbone, num_groups=len(self.groups) + 1, num_positions=tok.num_patches,
                                    patch_numel=patch * patch)
        # pixel decoder: the query token's context (broadcast over its patch) + the pixel's own values
        D, G = size.dim, len(self.groups)
        self.ctx_norm = nn.LayerNorm(D)
        self.pixel_proj = nn.Sequential(nn.Linear(2 * G, D), nn.GELU(), nn.Linear(D, D))
        self.trunk = nn.Sequential(nn.GELU(), nn.Linear(D, D), nn.GELU())
        self.recon = nn.Linear(D, G)  # pretraining: a hidden source's values at every pixel
        self.out = nn.Linear(D, len(self.quantiles) + 1)  # fine-tuning: quantiles + mean
        # the forest head: regression trees on the frozen per-pixel embedding, stored as tensors
        # (node arrays of every tree, concatenated) so a checkpoint stays plain safetensors
        self.register_buffer("forest_roots", torch.zeros(forest_trees, dtype=torch.int64))
        self.register_buffer("forest_left", torch.zeros(forest_nodes, dtype=torch.int64))
        self.register_buffer("forest_right", torch.zeros(forest_nodes, dtype=torch.int64))
        self.register_buffer("forest_feature", torch.zeros(forest_nodes, dtype=torch.int64))
        self.register_buffer("forest_threshold", torch.zeros(forest_nodes, dtype=torch.float64))
        self.register_buffer("forest_value", torch.zeros(forest_nodes, dtype=torch.float64))
        self._register_load_state_dict_pre_hook(_no_forest_in_old_checkpoints)
        sources = sorted({g.split(":", 1)[0] for g in self.groups})
        self.register_buffer("group_map", torch.tensor(
            [sources.index(g.split(":", 1)[0]) for g in self.groups] + [len(sources)]), persistent=False)

    def tokens(self, fields: Mapping[str, torch.Tensor]) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
        """Token batch with padding for patches without data, the (B, T, P) targets and weights."""
        present = {g: fields[g] for g in self.groups if g in fields}
        B = next(iter(present.values())).shape[0] if present else next(iter(fields.values())).shape[0]
        dev = self.backbone.tokenizer.weight.device
        filled = {g: torch.nan_to_num(v, nan=0.0) for g, v in present.items()}
        filled[QUERY] = torch.zeros(B, self.tile, self.tile, device=dev)
        tb = self.backbone.tokenizer(filled)
        pads, tgts, wts = [], [], []
        for name, (s, e) in tb.layout.items():
            if name == QUERY:
                n = e - s
                pads.append(torch.zeros(B, n, dtype=torch.bool, device=dev))
                tgts.append(torch.zeros(B, n, self.patch**2, device=dev))
                wts.append(torch.zeros(B, n, self.patch**2, device=dev))
                tb.maskable[s:e] = False  # the query tokens are always seen
                continue
            valid = patchify((~torch.isnan(present[name])).float(), (self.patch, self.patch))  # (B, N, P)
            pads.append(valid.mean(-1) < self.min_valid)
            tgts.append(patchify(filled[name], (self.patch, self.patch)))
            wts.append(valid)
        tb.padding = torch.cat(pads, dim=1)
        return tb, torch.cat(tgts, dim=1), torch.cat(wts, dim=1)

    def pixel_features(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, H, W, D) per-pixel features: the query tokens' context (broadcast over their patch)
        joined with the pixel's own source values and their validity."""
        tb, _, _ = self.tokens(fields)
        z = self.backbone.encode(tb)
        s, e = tb.layout[QUERY]
        B, t, p = z.shape[0], self.tile, self.patch
        ctx = z[:, s:e].reshape(B, t // p, t // p, -1)  # (B, gh, gw, D)
        ctx = ctx.repeat_interleave(p, 1).repeat_interleave(p, 2)  # (B, H, W, D)
        absent = torch.full((B, t, t), float("nan"), device=z.device)
        vals = torch.stack([fields[g] if g in fields else absent for g in self.groups], -1)  # (B, H, W, G)
        valid = (~torch.isnan(vals)).to(ctx.dtype)
        pix = self.pixel_proj(torch.cat([torch.nan_to_num(vals), valid], -1).to(ctx.dtype))
        return self.trunk(self.ctx_norm(ctx) + pix)

    def embedding(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, H, W, D + G) per-pixel embedding for a forest head: the pixel features and the
        pixel decoder's reconstruction of every source (its estimate where a source is missing)."""
        z = self.pixel_features(fields)
        return torch.cat([z, self.recon(z)], -1)

    @property
    def has_forest(self) -> bool:
        return self.forest_roots.numel() > 0

    def set_forest(self, forest: Any) -> None:
        """Make a fitted scikit-learn ``RandomForestRegressor`` (on :meth:`embedding` features)
        the biomass head: its trees are copied into the ``forest_*`` buffers."""
        trees = [est.tree_ for est in forest.estimators_]
        sizes = [t.node_count for t in trees]
        roots = torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0)

        def cat(name: str, dtype: torch.dtype, shift: bool = False) -> torch.Tensor:
            parts = []
            for r, t in zip(roots.tolist(), trees):
                a = torch.as_tensor(getattr(t, name) if name != "value" else t.value[:, 0, 0]).to(dtype)
                parts.append(torch.where(a >= 0, a + r, a) if shift else a)
            return torch.cat(parts)

        self.forest_roots = roots
        self.forest_left = cat("children_left", torch.int64, True)
        self.forest_right = cat("children_right", torch.int64, True)
        self.forest_feature = cat("feature", torch.int64)
        self.forest_threshold, self.forest_value = cat("threshold", torch.float64), cat("value", torch.float64)

    def forest_predict(self, x: torch.Tensor, *, chunk: int = 512) -> torch.Tensor:
        """Every tree's prediction (T, N) for embeddings ``x`` (N, F): the walk of scikit-learn's
        trees (``x <= threshold`` goes left, float32 inputs as scikit-learn compares them), on the
        breadth-first table of :func:`pack_forest`, ``chunk`` rows at a time."""
        return self._forest_rows(x, chunk=chunk).T

    def _forest_rows(self, x: torch.Tensor, *, chunk: int = 512) -> torch.Tensor:
        """The trees' predictions as (N, T), contiguous: each row's trees side by side."""
        table = self._forest_table()
        if not len(x):
            return table.value.new_zeros(0, table.trees)
        return torch.cat([_walk(table, part) for part in x.float().split(chunk)])

    def _forest_table(self) -> ForestTable:
        """The packed table of the ``forest_*`` buffers, rebuilt when they change (set, loaded, moved)."""
        bufs = (self.forest_roots, self.forest_left, self.forest_right, self.forest_feature, self.forest_threshold,
                self.forest_value)
        key = tuple((b.data_ptr(), b._version, b.device) for b in bufs)
        if getattr(self, "_forest_cache", (None,))[0] != key:
            self._forest_cache = (key, pack_forest(*bufs))
        return self._forest_cache[1]

    def _forest_quantiles(self, emb: torch.Tensor) -> torch.Tensor:
        """(Q + 1, N) in Mg/ha from the forest: the quantiles of the trees' predictions (their
        spread; the interval is calibrated at fine-tuning) and their mean."""
        rows = self._forest_rows(emb)  # (N, T): the quantile over contiguous rows is several times faster
        q = torch.quantile(rows, torch.tensor(self.quantiles, dtype=rows.dtype, device=emb.device), dim=1)
        return torch.cat([q, rows.mean(1)[None]]).float()

    def predict(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Biomass (B, Q + 1, tile, tile) in Mg/ha: the quantiles (monotone) and, last, the mean
        (the point estimate: unbiased, so maps sum to totals; biomass is skewed, its median is not).
        With a forest head (:meth:`set_forest`) the trees map the tile's embedding."""
        if self.has_forest:
            emb = self.embedding(fields)
            B, H, W, F_ = emb.shape
            return self._forest_quantiles(emb.reshape(-1, F_)).reshape(-1, B, H, W).permute(1, 0, 2, 3)
        return self.network_predict(fields)

    def network_predict(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The network's own biomass head (what fine-tuning by gradient trains), as :meth:`predict`."""
        out = self.out(self.pixel_features(fields)).permute(0, 3, 1, 2)  # (B, Q + 1, H, W)
        maps, mean = out[:, :-1], out[:, -1:]
        mid = len(self.quantiles) // 2
        centre = maps[:, mid]
        # monotone quantiles: cumulative positive offsets below and above the median
        down = centre[:, None] - torch.cumsum(F.softplus(maps[:, :mid].flip(1)), 1)  # nearest first
        up = centre[:, None] + torch.cumsum(F.softplus(maps[:, mid + 1:]), 1)
        lower, upper = list(down.flip(1).unbind(1)), list(up.unbind(1))
        return torch.cat([torch.stack([*lower, centre, *upper], dim=1), mean], dim=1).float() * TARGET_SCALE

    def _pixel_recon(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Hide one source per tile (its tokens and its pixel values) and predict its values at
        every pixel where it has data from the other sources and the context: the same pixel
        pathway that fine-tuning maps to biomass."""
        g0 = next(iter(fields.values()))
        B = g0.shape[0]
        sid = self.group_map[: len(self.groups)]  # source index of each group
        n_src = int(sid.max()) + 1
        hide = torch.randint(n_src, (B,), device=g0.device)  # (B,)
        hidden = {g: sid[i] == hide for i, g in enumerate(self.groups)}  # group -> (B,) bool
        vis = {g: torch.where(hidden[g][:, None, None], torch.full_like(v, float("nan")), v)
               for g, v in fields.items()}
        pred = self.recon(self.pixel_features(vis))  # (B, H, W, G)
        absent = torch.full_like(g0, float("nan"))
        tgt = torch.stack([fields.get(g, absent) for g in self.groups], -1)
        w = (~torch.isnan(tgt)) & torch.stack([hidden[g] for g in self.groups], -1)[:, None, None, :]
        return (((pred - torch.nan_to_num(tgt)) ** 2) * w).sum() / w.sum().clamp_min(1)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        src = batch["inputs"]  # {source group: (B, H, W)}
        fields = {g: src[g] for g in self.groups if g in src}
        if "target" not in batch:  # pretraining: hide whole sources, reconstruct them
            tb, tgt, w = self.tokens(fields)
            loss, _, _ = mae_forward(self.backbone, self.decoder, tb, tgt, w, mask_ratio=self.mask_ratio,
                                     strategy="group", group_map=self.group_map)
            pix = self._pixel_recon(fields)
            return {"loss": loss + pix, "token_loss": loss.detach(), "pixel_loss": pix.detach()}
        out = self.network_predict(fields) / TARGET_SCALE  # (B, Q + 1, H, W)
        q, mean = out[:, :-1], out[:, -1]
        y = batch["target"] / TARGET_SCALE
        lab = ~torch.isnan(y)
        n = lab.sum().clamp_min(1)
        yv = torch.nan_to_num(y)
        tau = torch.tensor(self.quantiles, device=q.device)[None, :, None, None]
        diff = yv[:, None] - q
        pinball = (torch.maximum(tau * diff, (tau - 1) * diff) * lab[:, None]).sum() / (n * len(self.quantiles))
        mse = (((mean - yv) ** 2) * lab).sum() / n
        loss = pinball + 0.5 * mse
        out_ = {"pinball": pinball.detach(), "mse": mse.detach(), "labelled_pixels": lab.sum().float()}
        if "plot_index" in batch and self.plot_weight > 0:
            plot_mse = _plot_mse(mean, yv, lab, batch["plot_index"])
            loss = loss + self.plot_weight * plot_mse
            out_["plot_mse"] = plot_mse.detach()
        return {"loss": loss, **out_}


class ForestTable(NamedTuple):
    """A forest's nodes renumbered breadth-first so that an inner node's children are ``left`` and
    ``left + 1``; a leaf points at itself. ``threshold`` is float32 (rounded down, so ``x <= t``
    on float32 ``x`` is scikit-learn's float64 test exactly; +inf at leaves), ``value`` float64."""

    trees: int
    left: torch.Tensor  # (nodes,) int32
    feature: torch.Tensor  # (nodes,) int32
    threshold: torch.Tensor  # (nodes,) float32
    value: torch.Tensor  # (nodes,) float64
    inner: torch.Tensor  # (nodes,) bool: not a leaf
    depth: int


def pack_forest(roots: torch.Tensor, left: torch.Tensor, right: torch.Tensor, feature: torch.Tensor,
                threshold: torch.Tensor, value: torch.Tensor) -> ForestTable:
    """The :class:`ForestTable` of concatenated scikit-learn node arrays (children < 0 at leaves)."""
    dev = left.device
    lt, rt, ft = left.cpu().numpy(), right.cpu().numpy(), feature.cpu().numpy()
    th, va = threshold.cpu().numpy(), value.cpu().numpy()
    new_id = np.zeros(len(lt), np.int64)
    levels, frontier, start = [], roots.cpu().numpy(), 0
    while len(frontier):  # one level of every tree at a time; children of a node stay adjacent
        levels.append(frontier)
        new_id[frontier] = start + np.arange(len(frontier))
        start += len(frontier)
        if start > len(lt):
            raise DataError(f"the forest_* tensors do not form trees (a node is reached twice; {len(lt)} nodes)")
        inner = frontier[lt[frontier] >= 0]
        frontier = np.stack([lt[inner], rt[inner]], 1).ravel()
    old = np.concatenate(levels) if levels else np.zeros(0, np.int64)
    leaf = lt[old] < 0
    new_left = np.where(leaf, np.arange(len(old)), new_id[np.where(leaf, 0, lt[old])])
    t32 = th[old].astype(np.float32)
    t32 = np.where(t32.astype(np.float64) > th[old], np.nextafter(t32, np.float32(-np.inf)), t32)
    t32[leaf] = np.inf

    def put(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

    return ForestTable(trees=len(roots), left=put(new_left.astype(np.int32)),
                       feature=put(np.where(leaf, 0, ft[old]).astype(np.int32)),
                       threshold=put(t32), value=put(va[old]), inner=put(~leaf), depth=max(len(levels) - 1, 0))


def _walk(t: ForestTable, x: torch.Tensor) -> torch.Tensor:
    """(N, T) leaf values of float32 rows ``x`` (N, F); roots are nodes 0..T-1 of the table.

    Every (row, tree) pair steps one level per pass; a pair at its leaf stays there (a leaf is its
    own left child with threshold +inf), so the pairs still walking are gathered into a smaller
    set only every few levels, when fewer than 60 % of them remain (the gather costs more than a
    few passes over finished pairs). Node ids and offsets are int32 (half the memory traffic)."""
    N, F_ = x.shape
    if N * F_ >= 2**31:
        raise ConfigError(f"a forest walk of {N} rows x {F_} features overflows int32 offsets: pass a smaller chunk")
    n = torch.arange(t.trees, device=x.device, dtype=torch.int32).repeat(N)  # row-major: row r's trees
    off = (torch.arange(N, device=x.device, dtype=torch.int32) * F_).repeat_interleave(t.trees)
    flat = x.contiguous().reshape(-1)
    node, active = n, None  # active: the pairs still walked (None: all of them)
    for level in range(t.depth):
        xv = flat.index_select(0, t.feature.index_select(0, n).add_(off))
        n = t.left.index_select(0, n).add_(xv > t.threshold.index_select(0, n))
        if active is None:
            node = n
        else:
            node.index_copy_(0, active, n)
        if level % 3 == 2 or level == t.depth - 1:
            keep = t.inner.index_select(0, n)
            still = int(keep.sum())
            if still == 0:
                break
            if still < 0.6 * n.numel():
                idx = keep.nonzero().squeeze(1)
                active = idx if active is None else active.index_select(0, idx)
                n, off = n.index_select(0, idx), off.index_select(0, idx)
    return t.value.index_select(0, node).view(N, t.trees)


def _no_forest_in_old_checkpoints(state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Checkpoints written before the forest head have no ``forest_*`` tensors: empty ones."""
    for name, dtype in (("roots", torch.int64), ("left", torch.int64), ("right", torch.int64),
                        ("feature", torch.int64), ("threshold", torch.float64), ("value", torch.float64)):
        state.setdefault(f"{prefix}forest_{name}", torch.zeros(0, dtype=dtype))


def _plot_mse(mean: torch.Tensor, y: torch.Tensor, lab: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Squared error of the plot means: the predicted mean biomass averaged over each plot's
    labelled cells in the tile against the same cells' observed mean (errors shared by a
    plot's cells, which a per-cell loss barely sees, are what a plot-level estimate is made of)."""
    ok = lab & (index >= 0)
    if not ok.any():
        return mean.sum() * 0.0
    B = index.shape[0]
    key = (torch.arange(B, device=index.device)[:, None, None] * (int(index.max()) + 1) + index)[ok]
    _, inv = torch.unique(key, return_inverse=True)
    m = int(inv.max()) + 1
    n = torch.zeros(m, device=mean.device).index_add_(0, inv, torch.ones_like(mean[ok]))
    p = torch.zeros(m, device=mean.device).index_add_(0, inv, mean[ok].float()) / n
    t = torch.zeros(m, device=mean.device).index_add_(0, inv, y[ok].float()) / n
    return ((p - t) ** 2).mean()


class CarbonEnsemble(CarbonNet):
    """The two heads of one pretrained model, averaged: this network with its quantile head
    fine-tuned by gradient, and ``forest_net``, the pretrained network unchanged with a forest on
    its embedding (each head's quantiles and means averaged; the interval is calibrated after).

    Built from the same arguments as :class:`CarbonNet` plus the forest's sizes; :meth:`combine`
    makes one from two fitted models.
    """

    def __init__(self, *, size: EncoderConfig, groups: Sequence[str], forest_trees: int = 0, forest_nodes: int = 0,
                 **kw: Any) -> None:
        super().__init__(size=size, groups=groups, **kw)
        self.forest_net = CarbonNet(size=size, groups=groups, forest_trees=forest_trees, forest_nodes=forest_nodes,
                                    **kw)

    @classmethod
    def combine(cls, network: CarbonNet, forest: CarbonNet, size: EncoderConfig, **kw: Any) -> CarbonEnsemble:
        """One model from a network fine-tuned by gradient and a forest-head model (same groups)."""
        ens = cls(size=size, forest_trees=int(forest.forest_roots.numel()),
                  forest_nodes=int(forest.forest_left.numel()), **kw)
        ens.load_state_dict({**network.state_dict(), **{f"forest_net.{k}": v for k, v in forest.state_dict().items()}})
        return ens.eval()

    def predict(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Biomass (B, Q + 1, tile, tile) in Mg/ha: the two heads' quantiles and means, averaged."""
        return 0.5 * (self.network_predict(fields) + self.forest_net.predict(fields))


# the model families, created by name: create_model("<family>.<size>", **kwargs)
register_model("carbon_net")(CarbonNet)
register_model("carbon_ensemble")(CarbonEnsemble)
