"""Carbon plots (HoloViews): the sources side by side, biomass and uncertainty maps, the change
map and the regional budget. Label-efficiency curves use :func:`hfmi_kit.viz.core.label_efficiency`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hfmi_kit.data.cf import open_cf
from hfmi_kit.errors import DataError
from hfmi_kit.viz import require_holoviews
from hfmi_kit.viz.core import fit_display


@dataclass
class MapSet:
    """Predicted maps, from a run in memory or from its ``maps/carbon.nc``."""

    epochs: list[str]  # epoch labels (years)
    bounds: tuple[float, float, float, float]  # (left, bottom, right, top) in the grid's CRS [m]
    maps: list[np.ndarray]  # per epoch (quantiles..., mean) x H x W [Mg/ha]
    truth: list[np.ndarray] | None = None  # the true biomass per epoch when known (generated regions)
    crs: str = ""  # the grid's CRS as its authority code (EPSG:32633) or name; "" when unknown
    projected: bool = True  # coordinates in metres (a scale bar can be drawn), not degrees
    plots: tuple[np.ndarray, np.ndarray] | None = None  # field plot centres (x, y) in the CRS, when known


def _crs_label(crs: Any) -> tuple[str, bool]:
    """A CRS (rasterio, pyproj or WKT) as ``EPSG:n`` (else its name) and whether it is projected."""
    from pyproj import CRS

    c = CRS.from_user_input(crs if isinstance(crs, str) else crs.to_wkt())
    code = c.to_epsg()
    return (f"EPSG:{code}" if code else c.name), bool(c.is_projected)


def map_set(source: Any, maps: Sequence[np.ndarray] | None = None) -> MapSet:
    """A :class:`MapSet` from ``(prep, maps)`` (what :func:`.tasks.map_region` returns) or from the
    CF NetCDF a fine-tuning or evaluation writes (a path or an open Dataset)."""
    if maps is not None:
        crs, projected = _crs_label(source.grid.crs)
        t = source.grid.transform
        p = source.plots[-1] if source.plots else None
        xy = None if p is None else (t.c + (np.asarray(p.cols) + 0.5) * t.a, t.f + (np.asarray(p.rows) + 0.5) * t.e)
        return MapSet([str(e) for e in source.epochs], _bounds(source.grid, source.shape), list(maps),
                      None if source.truth is None else list(source.truth), crs, projected, xy)
    import xarray as xr

    ds = source if isinstance(source, xr.Dataset) else open_cf(Path(source))
    names = [*sorted(str(v) for v in ds.data_vars if str(v).startswith("agb_q")), "agb_mean"]
    missing = [v for v in names if v not in ds] + [c for c in ("time", "x", "y") if c not in ds.coords]
    if missing or len(names) < 3:
        raise DataError(f"{source}: not a carbon map file (missing {missing or 'quantile layers'})")
    x, y = ds["x"].values, ds["y"].values
    dx, dy = float(abs(x[1] - x[0])) if len(x) > 1 else 1.0, float(abs(y[1] - y[0])) if len(y) > 1 else 1.0
    bounds = (float(x.min()) - dx / 2, float(y.min()) - dy / 2, float(x.max()) + dx / 2, float(y.max()) + dy / 2)
    stack = np.stack([ds[v].transpose("time", "y", "x").values for v in names], axis=1).astype(np.float32)
    if float(y[0]) < float(y[-1]):  # rows run north to south in the images
        stack = stack[..., ::-1, :]
    years = [str(t)[:4] for t in ds["time"].values]
    wkt = ds["spatial_ref"].attrs.get("crs_wkt") if "spatial_ref" in ds else None
    crs, projected = _crs_label(wkt) if wkt else ("", True)
    return MapSet(years, bounds, list(stack), crs=crs, projected=projected)


def _image(a: np.ndarray, ms: MapSet, title: str, cmap: str, clim: tuple[float, float] | None = None,
           size: int = 260, *, quantity: str = "AGB", units: str = "Mg/ha", plots: bool = False) -> Any:
    """One map on the grid's coordinates (km, or degrees for a geographic CRS, with the CRS in
    the axis labels), its colourbar titled with ``units``, a scale bar, and the field plots'
    centres when ``plots`` and they are known."""
    hv = require_holoviews()
    lo, hi = clim or (float(np.nanpercentile(a, 2)), float(np.nanpercentile(a, 98)))
    k = 1000.0 if ms.projected else 1.0
    unit = "km" if ms.projected else "°"
    crs = f" ({ms.crs})" if ms.crs else ""
    left, bottom, right, top = (v / k for v in ms.bounds)
    img = hv.Image(fit_display(a), bounds=(left, bottom, right, top),
                   kdims=[f"easting [{unit}]{crs}", f"northing [{unit}]"] if ms.projected else
                   [f"longitude [{unit}]{crs}", f"latitude [{unit}]"], vdims=[hv.Dimension(quantity, unit=units)])
    out = img.opts(cmap=cmap, clim=(lo, hi), colorbar=True, frame_height=size, data_aspect=1 if ms.projected else None,
                   title=title, tools=["hover"], clipping_colors={"NaN": "#dddddd"}, xticks=4, yticks=4)
    if plots and ms.plots is not None:
        out = out * hv.Points((ms.plots[0] / k, ms.plots[1] / k), img.kdims, label="field plots").opts(
            marker="square", size=5, fill_color=None, line_color="black")
    if ms.projected:
        out = out * scale_bar(ms.bounds, kdims=img.kdims)
    return out.opts(legend_position="bottom") if isinstance(out, hv.Overlay) else out


def scale_bar(bounds: tuple[float, float, float, float], kdims: Sequence[Any] = ("x", "y")) -> Any:
    """A scale bar for a map with ``bounds`` in metres (drawn in km): a 1, 2 or 5 x 10^n m bar
    of about a fifth of the width in the lower left, labelled with its length."""
    hv = require_holoviews()
    left, bottom, right, top = bounds
    target = (right - left) / 5
    length = max((m * 10 ** e for e in range(0, 8) for m in (1, 2, 5) if m * 10 ** e <= target), default=1.0)
    x0, y0 = left + 0.05 * (right - left), bottom + 0.06 * (top - bottom)
    label = f"{length / 1000:g} km" if length >= 1000 else f"{length:g} m"
    bar = hv.Path([[(x0 / 1000, y0 / 1000), ((x0 + length) / 1000, y0 / 1000)]], list(kdims),
                  label="scale bar").opts(color="black", line_width=4)
    text = hv.Text((x0 + length / 2) / 1000, (y0 + 0.07 * (top - bottom)) / 1000, label, kdims=list(kdims)).opts(
        text_font_size="9pt", text_color="black", text_font_style="bold")
    return bar * text


def _bounds(grid: Any, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    t = grid.transform
    return (t.c, t.f + t.e * shape[0], t.c + t.a * shape[1], t.f)


def sources(prep: Any, epoch: int = 0, *, groups: Sequence[str] | None = None) -> Any:
    """Every source band of one epoch on the common grid (grey: no data, e.g. clouds, outside the
    lidar strips)."""
    hv = require_holoviews()
    H, W = prep.shape
    ms = map_set(prep, [])
    items = [_image(v[:H, :W], ms, g, "viridis", size=200, quantity=g, units="normalised")
             for g, v in prep.fields[epoch].items() if groups is None or g in groups]
    return hv.Layout(items).cols(4).opts(title=f"sources {prep.epochs[epoch]} (normalised)")


def biomass_maps(source: Any, maps: Sequence[np.ndarray] | None = None, epoch: int = -1) -> Any:
    """Predicted biomass (mean), the interval width (outer quantiles) and, when known, the truth.
    ``source``/``maps``: see :func:`map_set` (``prep, maps`` or the ``carbon.nc`` of a run)."""
    hv = require_holoviews()
    ms = map_set(source, maps)
    q = ms.maps[epoch]
    hi = float(np.nanpercentile(q[-1], 99))
    items = [_image(q[-1], ms, f"AGB {ms.epochs[epoch]} [Mg/ha]", "YlGn", (0, hi), plots=True),
             _image(q[-2] - q[0], ms, "90 % interval width [Mg/ha]", "magma", quantity="interval width",
                    plots=True)]
    if ms.truth is not None:
        items.append(_image(ms.truth[epoch], ms, "true AGB [Mg/ha]", "YlGn", (0, hi)))
    return hv.Layout(items).cols(3)


def change_map(source: Any, maps: Sequence[np.ndarray] | None = None, carbon_fraction: float = 0.47) -> Any:
    """Carbon change between the first and last epoch (red: loss, a source; blue: gain, a sink)."""
    hv = require_holoviews()
    ms = map_set(source, maps)
    if len(ms.maps) < 2:
        raise DataError(f"a change map needs two epochs; the maps have {ms.epochs}")
    d = (ms.maps[-1][-1] - ms.maps[0][-1]) * carbon_fraction  # the means
    lim = float(np.nanpercentile(np.abs(d), 99)) or 1.0
    title = f"predicted change {ms.epochs[0]}-{ms.epochs[-1]} [Mg C/ha]"
    items = [_image(d, ms, title, "RdBu", (-lim, lim), quantity="carbon change", units="Mg C/ha")]
    if ms.truth is not None:
        items.append(_image((ms.truth[-1] - ms.truth[0]) * carbon_fraction, ms, "true change [Mg C/ha]",
                            "RdBu", (-lim, lim), quantity="carbon change", units="Mg C/ha"))
    return hv.Layout(items).cols(2)


def budget_plot(rows: Sequence[Mapping[str, Any]]) -> Any:
    """Regional totals with their 90 % intervals, and the truth where known: the carbon stocks
    (thousands of Mg C) and the changes between epochs (net, losses, gains: hundreds, of either
    sign) on panels of their own, each with its own axis."""
    hv = require_holoviews()
    rows = [r for r in rows if r.get("lower_90") is not None and np.isfinite(r.get("lower_90", np.nan))]
    stocks = [r for r in rows if str(r["quantity"]).startswith("carbon stock")]
    changes = [r for r in rows if not str(r["quantity"]).startswith("carbon stock")]

    def panel(part: list[Mapping[str, Any]], title: str, axis: str) -> Any:
        names = [str(r["quantity"]) for r in part]
        est = hv.Scatter([(n, r["value"]) for n, r in zip(names, part)], "quantity", axis,
                         label="estimate").opts(size=9, color="black")
        err = hv.ErrorBars([(n, r["value"], r["value"] - r["lower_90"], r["upper_90"] - r["value"])
                            for n, r in zip(names, part)], "quantity", [axis, "neg", "pos"])
        out = err * est
        if all("true" in r for r in part):
            out = out * hv.Scatter([(n, r["true"]) for n, r in zip(names, part)], "quantity", axis,
                                   label="truth").opts(size=9, color="firebrick", marker="x")
        if axis.startswith("change"):
            out = out * hv.HLine(0).opts(color="grey", line_dash="dotted", line_width=1)
        return out.opts(width=420, height=340, title=title, legend_position="top_left", xrotation=25,
                        xlabel="", ylabel=f"{axis} (Mg C)")

    parts = [panel(p, t, a) for p, t, a in ((stocks, "carbon stocks (90 % intervals)", "stock"),
                                             (changes, "changes between epochs (90 % intervals)", "change"))
             if p]
    if not parts:
        raise ValueError("no budget row has a 90 % interval")
    if len(parts) == 1:
        return parts[0]
    return hv.Layout(parts).opts(shared_axes=False).cols(2)
