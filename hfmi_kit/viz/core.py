"""Generic plot builders: maps with a slider, metric curves, loss curves."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from hfmi_kit.viz import require_holoviews


def map_with_slider(da: xr.DataArray, slider_dim: str, *, x: str = "lon", y: str = "lat",
                    cmap: str = "RdBu_r", title: str = "", symmetric: bool = False,
                    width: int = 520, height: int = 280) -> Any:
    """A map (``x``, ``y``) for each value of ``slider_dim``: a HoloMap with a slider widget."""
    hv = require_holoviews()
    vals = np.asarray(da.values, dtype=np.float64)
    lo, hi = np.nanmin(vals), np.nanmax(vals)
    if symmetric:
        m = max(abs(lo), abs(hi))
        lo, hi = -m, m
    units = da.attrs.get("units", "")
    label = f"{da.name or ''} [{units}]" if units else str(da.name or "")

    def img(v: Any) -> Any:
        sl = da.sel({slider_dim: v}).transpose(y, x)
        return hv.Image((sl[x].values, sl[y].values, sl.values), kdims=[x, y], vdims=[label]).opts(
            cmap=cmap, clim=(lo, hi), colorbar=True, width=width, height=height, tools=["hover"],
            title=title)

    return hv.HoloMap({v.item() if hasattr(v, "item") else v: img(v) for v in da[slider_dim].values},
                      kdims=[slider_dim])


def single_map(da: xr.DataArray, *, x: str = "lon", y: str = "lat", cmap: str = "RdBu_r", title: str = "",
               symmetric: bool = False, clim: tuple[float, float] | None = None, width: int = 420,
               height: int = 240) -> Any:
    """One lat-lon map as an ``hv.Image``."""
    hv = require_holoviews()
    vals = np.asarray(da.values, dtype=np.float64)
    if clim is None:
        lo, hi = np.nanmin(vals), np.nanmax(vals)
        if symmetric:
            m = max(abs(lo), abs(hi), 1e-9)
            lo, hi = -m, m
        clim = (float(lo), float(hi))
    sl = da.transpose(y, x)
    units = da.attrs.get("units", "")
    return hv.Image((sl[x].values, sl[y].values, sl.values), kdims=[x, y],
                    vdims=[f"{da.name} [{units}]" if units else str(da.name)]).opts(
        cmap=cmap, clim=clim, colorbar=True, width=width, height=height, tools=["hover"], title=title)


def curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
           title: str = "", logx: bool = False, width: int = 480, height: int = 300) -> Any:
    """Overlay of named (x, y) curves with markers."""
    hv = require_holoviews()
    items = []
    for name, (xs, ys) in series.items():
        c = hv.Curve((list(xs), list(ys)), xlabel, ylabel, label=name)
        items.append(c * hv.Scatter(c).opts(size=6))
    return hv.Overlay(items).opts(title=title, width=width, height=height, legend_position="top_right",
                                  logx=logx)


def loss_curve(metrics_jsonl: str | Path, keys: Sequence[str] = ("loss",)) -> Any:
    """Training curves from a run's ``metrics.jsonl``."""
    rows = [json.loads(x) for x in Path(metrics_jsonl).read_text().splitlines() if x.strip()]
    tr = [r for r in rows if r.get("split") == "train"]
    series = {k: ([r["step"] for r in tr if k in r], [r[k] for r in tr if k in r]) for k in keys}
    return curves(series, xlabel="step", ylabel="loss", title="training loss")


def label_efficiency(rows: Sequence[Mapping[str, Any]], metric: str, *, xlabel: str = "labelled cases",
                     title: str | None = None) -> Any:
    """``metric`` against the number of labels (log axis), one curve per ``method`` of ``rows``
    (dicts with ``labels``, ``method`` and the metric)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in sorted(rows, key=lambda r: r["labels"]):
        xs, ys = series.setdefault(str(r["method"]), ([], []))
        xs.append(float(r["labels"]))
        ys.append(float(r[metric]))
    return curves(series, xlabel=xlabel, ylabel=metric, title=title or f"label efficiency ({metric})", logx=True)
