"""Carbon plots (HoloViews): the sources side by side, biomass and uncertainty maps, the change
map and the regional budget. Label-efficiency curves use :func:`hfmi_kit.viz.core.label_efficiency`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hfmi_kit.viz import require_holoviews


def _image(a: np.ndarray, bounds: tuple[float, float, float, float], title: str, cmap: str,
           clim: tuple[float, float] | None = None, size: int = 260) -> Any:
    hv = require_holoviews()
    lo, hi = clim or (float(np.nanpercentile(a, 2)), float(np.nanpercentile(a, 98)))
    return hv.Image(a, bounds=bounds, kdims=["x [m]", "y [m]"]).opts(
        cmap=cmap, clim=(lo, hi), colorbar=True, width=size + 60, height=size, title=title, tools=["hover"],
        xaxis=None, yaxis=None, clipping_colors={"NaN": "#dddddd"})


def _bounds(grid: Any, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    t = grid.transform
    return (t.c, t.f + t.e * shape[0], t.c + t.a * shape[1], t.f)


def sources(prep: Any, epoch: int = 0, *, groups: Sequence[str] | None = None) -> Any:
    """Every source band of one epoch on the common grid (grey: no data, e.g. clouds, outside the
    lidar strips)."""
    hv = require_holoviews()
    H, W = prep.shape
    b = _bounds(prep.grid, prep.shape)
    items = [_image(v[:H, :W], b, g, "viridis", size=200) for g, v in prep.fields[epoch].items()
             if groups is None or g in groups]
    return hv.Layout(items).cols(4).opts(title=f"sources {prep.epochs[epoch]} (normalised)")


def biomass_maps(prep: Any, maps: Sequence[np.ndarray], epoch: int = -1,
                 quantiles: Sequence[float] = (0.05, 0.5, 0.95)) -> Any:
    """Predicted biomass (mean), the 90 % interval width and, when known, the truth
    (``maps``: per epoch the quantiles then the mean, as :func:`.tasks.predict_map` gives)."""
    hv = require_holoviews()
    b = _bounds(prep.grid, prep.shape)
    q = maps[epoch]
    hi = float(np.nanpercentile(q[-1], 99))
    items = [_image(q[-1], b, f"AGB {prep.epochs[epoch]} [Mg/ha]", "YlGn", (0, hi)),
             _image(q[len(quantiles) - 1] - q[0], b, "90 % interval width [Mg/ha]", "magma")]
    if prep.truth is not None:
        items.append(_image(prep.truth[epoch], b, "true AGB [Mg/ha]", "YlGn", (0, hi)))
    return hv.Layout(items).cols(3)


def change_map(prep: Any, maps: Sequence[np.ndarray], carbon_fraction: float = 0.47) -> Any:
    """Carbon change between the first and last epoch (red: loss, a source; blue: gain, a sink)."""
    hv = require_holoviews()
    b = _bounds(prep.grid, prep.shape)
    d = (maps[-1][-1] - maps[0][-1]) * carbon_fraction  # the means
    lim = float(np.nanpercentile(np.abs(d), 99)) or 1.0
    items = [_image(d, b, f"predicted change {prep.epochs[0]}-{prep.epochs[-1]} [Mg C/ha]", "RdBu", (-lim, lim))]
    if prep.truth is not None:
        items.append(_image((prep.truth[-1] - prep.truth[0]) * carbon_fraction, b, "true change [Mg C/ha]", "RdBu",
                            (-lim, lim)))
    return hv.Layout(items).cols(2)


def budget_plot(rows: Sequence[Mapping[str, Any]]) -> Any:
    """Regional totals with their 90 % intervals, and the truth where known."""
    hv = require_holoviews()
    rows = [r for r in rows if r.get("lower_90") is not None and np.isfinite(r.get("lower_90", np.nan))]
    names = [r["quantity"] for r in rows]
    est = hv.Scatter([(n, r["value"]) for n, r in zip(names, rows)], "quantity", "Mg C", label="estimate").opts(
        size=9, color="black")
    err = hv.ErrorBars([(n, r["value"], r["value"] - r["lower_90"], r["upper_90"] - r["value"])
                        for n, r in zip(names, rows)], "quantity", ["Mg C", "neg", "pos"])
    out = err * est
    if all("true" in r for r in rows):
        out = out * hv.Scatter([(n, r["true"]) for n, r in zip(names, rows)], "quantity", "Mg C",
                               label="truth").opts(size=9, color="firebrick", marker="x")
    return out.opts(width=620, height=320, title="regional carbon budget (90 % intervals)", legend_position="top_left")
