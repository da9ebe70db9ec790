"""Climate models on the shared backbone: an MAE + next-step pretrainer, a forecaster, a sea-ice head.

Token groups are named ``<var>@t0``, ``<var>@t-1`` (state at the context steps), ``<forcing>@t+1``
(field forcings of the step being predicted) and the scalar ``<scalar>@t+1`` (CO2 forcing).
All three families share parameter names under ``backbone.*`` so a pretrained backbone
transfers into the forecaster or the sea-ice model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hfmi_kit.domains.climate.data import lim_step
from hfmi_kit.models import (
    Backbone,
    DenseHead,
    EncoderConfig,
    GridTokenizer,
    PooledHead,
    TokenBatch,
    mae_forward,
    make_decoder,
    register_model,
)
from hfmi_kit.models.windowed import GridBackbone, PatchEmbed, PatchHead


def state_group(var: str, lag: int) -> str:
    return f"{var}@t{-lag}" if lag else f"{var}@t0"


class ClimateNet(nn.Module):
    """Backbone over the climate token groups; subclasses add heads."""

    def __init__(self, *, size: EncoderConfig, variables: Sequence[str], field_forcings: Sequence[str],
                 scalar_forcings: Sequence[str], grid: Sequence[int], patch: Sequence[int] = (4, 4),
                 context: int = 2, lat: Sequence[float] | None = None,
                 residual_scale: Sequence[float] | None = None, lim_modes: int = 0, phases: int = 12,
                 layout: str = "groups", window: Sequence[int] = (8, 8), periodic: bool = True) -> None:
        super().__init__()
        self.variables, self.field_forcings = list(variables), list(field_forcings)
        self.scalar_forcings, self.context = list(scalar_forcings), context
        groups = [state_group(v, c) for c in range(context) for v in self.variables]
        groups += [f"{f}@t+1" for f in self.field_forcings]
        # a grid the patch does not divide is padded (periodic in longitude, the edge row
        # repeated in latitude) to the next multiple, and outputs are cropped back
        self.grid = (int(grid[0]), int(grid[1]))
        self.periodic = bool(periodic)  # the longitudes go round the globe (a regional grid does not)
        padded = [-(-g // int(p)) * int(p) for g, p in zip(self.grid, patch)]
        # layout "groups": a token per (variable, context step, patch), global attention (the
        # checkpoints before session 12); "windowed": a token per patch holding every variable,
        # attention in shifted local windows periodic in longitude (cost linear in the grid)
        if layout not in ("groups", "windowed"):
            raise ValueError(f"layout must be 'groups' or 'windowed', got {layout!r}")
        self.layout = layout
        if layout == "windowed":
            emb = PatchEmbed(len(groups), tuple(patch), tuple(padded), size.dim,  # type: ignore[arg-type]
                             scalars=len(self.scalar_forcings))
            self.backbone: Any = GridBackbone(emb, size, (int(window[0]), int(window[1])), periodic=self.periodic)
        else:
            tok = GridTokenizer(groups=groups, grid=padded, patch=patch, dim=size.dim,
                                scalars=[f"{s}@t+1" for s in self.scalar_forcings], condition_on_scalars=True)
            self.backbone = Backbone(tok, size)
        H = grid[0]
        lat_t = torch.tensor(lat if lat is not None else [(-90 + 180 * (i + 0.5) / H) for i in range(H)])
        w = torch.cos(torch.deg2rad(lat_t.float())).clamp_min(0)
        self.register_buffer("lat_weight", (w / w.mean())[:, None], persistent=False)  # (H, 1)
        # Heads predict one-step tendencies in units of their standard deviation (GraphCast style).
        rs = torch.tensor(list(residual_scale) if residual_scale is not None else [1.0] * len(self.variables))
        self.register_buffer("residual_scale", rs.float()[None, :, None, None], persistent=False)
        # Climatology of the training years (normalised) in ``phases`` bins of the year (12 months
        # for monthly data, days of year for daily, 1 for annual), saved with the weights: a step
        # starts from x_t plus the climatological change of its bin, so an untrained head is
        # the anomaly-persistence forecast and the network learns what differs from it.
        self.phases = int(phases)
        self.register_buffer("climatology", torch.zeros(self.phases, len(self.variables), *grid))
        # Lag-1 regression of anomalies on the training years (damped anomaly persistence): the
        # skip path decays an anomaly towards climatology at the rate the data shows, so the
        # untrained forecaster already beats climatology wherever anomalies persist at all.
        self.register_buffer("damping", torch.ones(len(self.variables), *grid))
        # Linear response to the scalar forcings (CO2): b in anom[t+1] = a anom[t] + b (s[t+1] - s_ref),
        # fitted with ``damping`` by least squares on the training years (a forced linear inverse
        # model). A changed forcing then moves the skip path's equilibrium by b ds / (1 - a) per
        # cell: the data's own response pattern, which the network refines.
        self.register_buffer("forcing_response", torch.zeros(len(self.scalar_forcings), len(self.variables), *grid))
        self.register_buffer("forcing_ref", torch.zeros(len(self.scalar_forcings)))
        # With ``lim_modes`` > 0 the anomaly step is a forced linear inverse model in that many EOFs
        # (see ``data.LinearInverseModel``; non-local, so a changed forcing gets the data's response
        # pattern) and ``damping`` applies to the residual outside the EOFs only.
        self.lim_modes = int(lim_modes)
        V, S, k = len(self.variables), len(self.scalar_forcings), self.lim_modes
        self.register_buffer("lim_project", torch.zeros(k, V, *grid))
        self.register_buffer("lim_reconstruct", torch.zeros(k, V, *grid))
        self.register_buffer("lim_operator", torch.zeros(k, k))
        self.register_buffer("lim_forcing", torch.zeros(S, k))
        self._register_load_state_dict_pre_hook(self._unforced_if_absent)

    def _unforced_if_absent(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Checkpoints written before the forced skip path load as they were saved: no forcing
        response, no linear inverse model."""
        for name in ("forcing_response", "forcing_ref", "lim_project", "lim_reconstruct", "lim_operator",
                     "lim_forcing"):
            if prefix + name not in state_dict:
                state_dict[prefix + name] = torch.zeros_like(getattr(self, name))

    def set_climatology(self, clim: torch.Tensor) -> None:
        """Set the (P, V, H, W) normalised climatology of the training years (P bins of the year)."""
        if tuple(clim.shape) != tuple(self.climatology.shape):
            raise ValueError(f"climatology shape {tuple(clim.shape)}, expected {tuple(self.climatology.shape)}")
        self.climatology.copy_(clim)

    def set_damping(self, damping: torch.Tensor) -> None:
        """Set the (V, H, W) lag-1 anomaly regression coefficients (1 = plain anomaly persistence)."""
        if tuple(damping.shape) != tuple(self.damping.shape):
            raise ValueError(f"damping shape {tuple(damping.shape)}, expected {tuple(self.damping.shape)}")
        self.damping.copy_(damping)

    def set_forcing_response(self, response: torch.Tensor, ref: torch.Tensor) -> None:
        """Set the (S, V, H, W) linear response to the scalar forcings and their (S,) reference values."""
        if tuple(response.shape) != tuple(self.forcing_response.shape) or tuple(ref.shape) != (response.shape[0],):
            raise ValueError(f"forcing response shape {tuple(response.shape)} / {tuple(ref.shape)}, expected "
                             f"{tuple(self.forcing_response.shape)} / {tuple(self.forcing_ref.shape)}")
        self.forcing_response.copy_(response)
        self.forcing_ref.copy_(ref)

    def set_lim(self, lim: Any) -> None:
        """Set the skip path's :class:`~hfmi_kit.domains.climate.data.LinearInverseModel` (its
        residual damping becomes ``damping``; the per-cell forcing response is then unused)."""
        if lim.modes != self.lim_modes:
            raise ValueError(f"linear inverse model with {lim.modes} modes; this model was built for {self.lim_modes}")
        for name, value in (("lim_project", lim.project), ("lim_reconstruct", lim.reconstruct),
                            ("lim_operator", lim.operator), ("lim_forcing", lim.forcing)):
            if tuple(value.shape) != tuple(getattr(self, name).shape):
                raise ValueError(f"{name} shape {tuple(value.shape)}, expected {tuple(getattr(self, name).shape)}")
            getattr(self, name).copy_(value)
        self.set_damping(lim.residual_damping)
        self.set_forcing_response(torch.zeros_like(self.forcing_response), lim.ref)

    def skip(self, inputs: torch.Tensor, phase: torch.Tensor, scalars: torch.Tensor | None = None) -> torch.Tensor:
        """The statistical forecast the network corrects, (B, V, H, W): clim[p+1] plus the anomaly
        x_t - clim[p] stepped by the linear inverse model (``lim_modes`` > 0) or per cell as
        a anom + b (s_t+1 - s_ref); ``phase`` (B,) is the climatological bin of t+1 (its month for
        monthly data), ``scalars`` (B, S) the forcing at t+1."""
        anom = inputs[:, -1] - self.climatology[(phase - 1) % self.phases]
        forced = scalars is not None and bool(self.scalar_forcings)
        ds = (scalars - self.forcing_ref).to(anom.dtype) if forced else None  # (B, S)
        if self.lim_modes:
            return self.climatology[phase] + lim_step(anom, ds, self.lim_project, self.lim_reconstruct,
                                                      self.lim_operator, self.lim_forcing, self.damping)
        out = self.climatology[phase] + self.damping * anom
        if ds is not None:
            out = out + torch.einsum("bs,svhw->bvhw", ds, self.forcing_response)
        return out

    def next_state(self, inputs: torch.Tensor, delta: dict[str, torch.Tensor], phase: torch.Tensor,
                   scalars: torch.Tensor | None = None) -> torch.Tensor:
        """The skip path (see :meth:`skip`) + scale * Δ -> (B, V, H, W)."""
        return self.skip(inputs, phase, scalars) + self.residual_scale * torch.stack([delta[v] for v in self.variables],
                                                                                     dim=1)

    @property
    def tokenizer(self) -> Any:
        """The :class:`GridTokenizer` (layout ``groups``) or :class:`PatchEmbed` (``windowed``)."""
        return self.backbone.tokenizer

    def channels(self, inputs: torch.Tensor, forcing: torch.Tensor) -> torch.Tensor:
        """(B, C, V, H, W) context and (B, F, H, W) forcing -> (B, C*V + F, H', W') on the padded
        grid: the channels of a windowed layout's patches, in the order of the token groups."""
        B, C = inputs.shape[:2]
        return self.pad(torch.cat([inputs.reshape(B, C * inputs.shape[2], *inputs.shape[3:]), forcing], dim=1))

    def encode_step(self, inputs: torch.Tensor, forcing: torch.Tensor, scalars: torch.Tensor) -> tuple[Any, Any]:
        """The encoder's output for one step and what the head needs with it: (z, token batch)
        for layout ``groups``, (z, None) for ``windowed``."""
        if self.layout == "windowed":
            return self.backbone.encode(self.tokenizer(self.channels(inputs, forcing), scalars)), None
        tb = self.tokenize(inputs, forcing, scalars)
        return self.backbone.encode(tb), tb

    def delta(self, z: torch.Tensor, tb: Any) -> dict[str, torch.Tensor]:
        """The head's normalised tendencies per variable on the data's grid."""
        if self.layout == "windowed":
            out = self.head(z)  # (B, V, H', W')
            return self.crop({v: out[:, i] for i, v in enumerate(self.variables)})
        return self.crop(self.head(z, tb))

    def pad(self, x: torch.Tensor, fill: float | None = None) -> torch.Tensor:
        """(..., H, W) -> the tokenizer's (..., H', W'): longitude wrapped around (the last column
        repeated on a regional grid), the last latitude row repeated (or ``fill`` in the new
        cells, e.g. 0 for loss weights)."""
        H, W = self.grid
        Hp, Wp = self.tokenizer.grid
        if (Hp, Wp) == (H, W):
            return x
        if fill is not None:
            return torch.nn.functional.pad(x, (0, Wp - W, 0, Hp - H), value=fill)
        if Wp > W:
            x = torch.cat([x, x[..., : Wp - W] if self.periodic else x[..., -1:].expand(*x.shape[:-1], Wp - W)], -1)
        return torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], Hp - H, x.shape[-1])], dim=-2) if Hp > H else x

    def crop(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fields on the tokenizer's (padded) grid back on the data's grid."""
        H, W = self.grid
        return {k: v[..., :H, :W] for k, v in fields.items()}

    def tokenize(self, inputs: torch.Tensor, forcing: torch.Tensor, scalars: torch.Tensor) -> TokenBatch:
        """``inputs`` (B, C, V, H, W), ``forcing`` (B, F, H, W), ``scalars`` (B, S)."""
        C = inputs.shape[1]
        fields = {}
        for c in range(C):  # inputs[:, -1] is time t (lag 0)
            for vi, v in enumerate(self.variables):
                fields[state_group(v, C - 1 - c)] = self.pad(inputs[:, c, vi])
        for fi, f in enumerate(self.field_forcings):
            fields[f"{f}@t+1"] = self.pad(forcing[:, fi])
        sc = {f"{s}@t+1": scalars[:, si] for si, s in enumerate(self.scalar_forcings)}
        return self.tokenizer(fields, sc)

    def _dense_head(self, hidden: int) -> nn.Module:
        """The next-state head: a :class:`DenseHead` per variable (``groups``) or one
        :class:`PatchHead` for every variable (``windowed``); named ``head`` in both."""
        tok = self.tokenizer
        if self.layout == "windowed":
            return PatchHead(self.backbone.cfg.dim, len(self.variables), tok.patch, tok.patch_grid, hidden)
        return DenseHead(dim=self.backbone.cfg.dim, outputs={v: state_group(v, 0) for v in self.variables},
                         grid=tok.grid, patch=tok.patch, hidden=hidden)

    def weighted_mse(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Latitude- and validity-weighted MSE in units of each variable's one-step tendency std.

        pred/target (B, V, H, W), mask (B, V, H, W). Measuring errors in tendency units keeps
        every variable's loss O(1) (persistence scores about 1), as GraphCast does.
        """
        w = mask * self.lat_weight
        err = (pred - target) / self.residual_scale
        return (err**2 * w).sum() / w.sum().clamp_min(1.0)


class ClimateForecaster(ClimateNet):
    """Predict the state at t+1 as x_t + Δ; roll out autoregressively for lead times 1..K."""

    def __init__(self, *, head_hidden: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        self.head = self._dense_head(head_hidden)

    def step(self, inputs: torch.Tensor, forcing: torch.Tensor, scalars: torch.Tensor,
             mask: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """One step: (B, C, V, H, W) context -> (B, V, H, W) next state (0 where undefined)."""
        z, tb = self.encode_step(inputs, forcing, scalars)
        return self.next_state(inputs, self.delta(z, tb), phase, scalars) * mask

    def rollout(self, inputs: torch.Tensor, forcing: torch.Tensor, scalars: torch.Tensor,
                mask: torch.Tensor, phase: torch.Tensor, steps: int | None = None,
                network: bool = True) -> torch.Tensor:
        """Autoregressive rollout: forcing (B, K, F, H, W), scalars (B, K, S), ``phase`` (B,) of
        the first predicted step -> (B, K, V, H, W). ``network=False`` rolls out the statistical
        skip path alone (what the network's corrections are measured against)."""
        K = steps or forcing.shape[1]
        ctx, outs = inputs, []
        for k in range(K):
            m = (phase + k) % self.phases
            if network:
                nxt = self.step(ctx, forcing[:, k], scalars[:, k], mask, m)
            else:
                nxt = self.skip(ctx, m, scalars[:, k]) * mask
            outs.append(nxt)
            ctx = torch.cat([ctx[:, 1:], nxt[:, None]], dim=1)
        return torch.stack(outs, dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.rollout(batch["inputs"], batch["forcing"], batch["scalars"], batch["mask"], batch["phase"])
        K = pred.shape[1]
        mask = batch["mask"]
        loss = sum(self.weighted_mse(pred[:, k], batch["target"][:, k], mask) for k in range(K)) / K
        return {"loss": loss}


class ClimatePretrainer(ClimateNet):
    """Masked reconstruction across variables and space-time patches, plus next-step prediction."""

    def __init__(self, *, mask_ratio: float = 0.6, mask_strategy: str = "mixed",
                 next_step_weight: float = 1.0, head_hidden: int | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        tok = self.tokenizer
        head_hidden = self.backbone.cfg.dim if head_hidden is None else head_hidden
        if self.layout == "windowed":
            # masked patches (every channel of a patch hidden at once) are replaced by a learned
            # token and reconstructed from the windows around them (SimMIM, Xie et al. 2022: MAE's
            # dropping of tokens does not fit windowed attention)
            self.mask_token = nn.Parameter(torch.zeros(self.backbone.cfg.dim))
            self.decoder: nn.Module = PatchHead(self.backbone.cfg.dim, self._channels, tok.patch, tok.patch_grid)
        else:
            self.decoder = make_decoder(self.backbone, num_groups=len(tok.groups) + len(tok.scalars),
                                        num_positions=tok.num_patches, patch_numel=tok.patch_numel)
        # Named like the forecaster's head so next-step skill transfers with the backbone.
        self.head = self._dense_head(head_hidden)
        self.mask_ratio, self.mask_strategy, self.next_step_weight = mask_ratio, mask_strategy, next_step_weight

    @property
    def _channels(self) -> int:
        return self.context * len(self.variables) + len(self.field_forcings)

    def _masked_patches(self, inputs: torch.Tensor, forcing: torch.Tensor, scalars: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
        """The windowed layout's reconstruction loss: ``mask_ratio`` of the patches hidden, every
        channel of them rebuilt, squared error weighted by validity and latitude on hidden cells."""
        x = self.channels(inputs, forcing)  # (B, K, H', W')
        B, K = x.shape[:2]
        t = self.tokenizer(x, scalars)  # (B, T, D)
        T = t.shape[1]
        hide = torch.rand(B, T, device=x.device).argsort(1) < max(1, int(round(self.mask_ratio * T)))
        t = torch.where(hide[..., None], self.mask_token.to(t.dtype) + self.tokenizer.pos_embed, t)
        rec = self.decoder(self.backbone.encode(t))  # (B, K, H', W')
        C, V = inputs.shape[1], inputs.shape[2]
        w = torch.cat([mask[:, None].expand(B, C, V, *mask.shape[-2:]).reshape(B, C * V, *mask.shape[-2:]),
                       torch.ones(B, K - C * V, *mask.shape[-2:], device=x.device)], dim=1) * self.lat_weight
        w = self.pad(w, fill=0.0)
        gh, gw = self.tokenizer.patch_grid
        ph, pw = self.tokenizer.patch
        cell_hidden = hide.reshape(B, gh, 1, gw, 1).expand(B, gh, ph, gw, pw).reshape(B, 1, gh * ph, gw * pw)
        w = w * cell_hidden
        return ((rec - x) ** 2 * w).sum() / w.sum().clamp_min(1.0)

    def _targets(self, tb: TokenBatch, inputs: torch.Tensor, forcing: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch targets and validity weights (B, T, P) aligned with the token batch."""
        tok = self.tokenizer
        B, T, _ = tb.tokens.shape
        tgt = torch.zeros(B, T, tok.patch_numel, device=inputs.device)
        wts = torch.zeros_like(tgt)
        C = inputs.shape[1]
        for c in range(C):
            for vi, v in enumerate(self.variables):
                s, e = tb.layout[state_group(v, C - 1 - c)]
                tgt[:, s:e] = tok.patchify(self.pad(inputs[:, c, vi]))
                wts[:, s:e] = tok.patchify(self.pad(mask[:, vi] * self.lat_weight, fill=0.0))  # padding: no weight
        for fi, f in enumerate(self.field_forcings):
            s, e = tb.layout[f"{f}@t+1"]
            tgt[:, s:e] = tok.patchify(self.pad(forcing[:, fi]))
            wts[:, s:e] = tok.patchify(self.pad(self.lat_weight.expand_as(forcing[:, fi]), fill=0.0))
        return tgt, wts

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs, forcing, scalars = batch["inputs"], batch["forcing"][:, 0], batch["scalars"][:, 0]
        mask = batch["mask"]
        if self.layout == "windowed":
            mae_loss = self._masked_patches(inputs, forcing, scalars, mask)
        else:
            tb = self.tokenize(inputs, forcing, scalars)
            tgt, wts = self._targets(tb, inputs, forcing, mask)
            strategy = self.mask_strategy
            if strategy == "mixed":  # alternate structured and random masking between steps
                strategy = ("random", "block", "group")[int(torch.randint(0, 3, ()).item())]
            mae_loss, _, _ = mae_forward(self.backbone, self.decoder, tb, tgt, wts,
                                         mask_ratio=self.mask_ratio, strategy=strategy)
        z, tb = self.encode_step(inputs, forcing, scalars)
        pred = self.next_state(inputs, self.delta(z, tb), batch["phase"], scalars)
        next_loss = self.weighted_mse(pred, batch["target"][:, 0], mask)
        with torch.no_grad():  # reference: the next-step loss of persistence (x_t+1 = x_t)
            persistence = self.weighted_mse(inputs[:, -1], batch["target"][:, 0], mask)
        return {"loss": mae_loss + self.next_step_weight * next_loss, "mae_loss": mae_loss.detach(),
                "next_step_loss": next_loss.detach(), "next_step_persistence": persistence}


class SeaIceExtent(ClimateNet):
    """Pooled head: normalised total sea-ice extent at t+1 from the state at t."""

    def __init__(self, *, head_hidden: int = 64, **kw: Any) -> None:
        super().__init__(**kw)
        self.head = PooledHead(dim=self.backbone.cfg.dim, out_dim=1, hidden=head_hidden)

    def predict(self, inputs: torch.Tensor, forcing: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        z, tb = self.encode_step(inputs, forcing, scalars)
        if tb is None:  # windowed: every token is a patch of the grid
            return self.head.net(self.head.norm(z.mean(dim=1)))[:, 0]
        return self.head(z, tb)[:, 0]  # (B,)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.predict(batch["inputs"], batch["forcing"][:, 0], batch["scalars"][:, 0])
        return {"loss": ((pred - batch["extent"]) ** 2).mean()}


def cell_area_km2(lat: Sequence[float], nlon: int) -> torch.Tensor:
    """Area of each grid cell (H, 1) in km² for a regular grid of ``nlon`` columns."""
    lat_t = torch.tensor(list(lat), dtype=torch.float64)
    dlat = math.radians(180.0 / len(lat_t))
    dlon = 2 * math.pi / nlon
    R = 6371.0
    return (R * R * dlat * dlon * torch.cos(torch.deg2rad(lat_t)))[:, None]


# the model families, created by name: create_model("<family>.<size>", **kwargs)
register_model("climate_forecaster")(ClimateForecaster)
register_model("climate_pretrainer")(ClimatePretrainer)
register_model("climate_seaice")(SeaIceExtent)
