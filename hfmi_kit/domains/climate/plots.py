"""Climate plots (HoloViews): forecast maps with a lead slider, skill vs lead, what-if maps.

The notebooks and the dashboard call these same functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import xarray as xr

from hfmi_kit.data.cf import open_cf
from hfmi_kit.viz.core import curves, map_with_slider, method_name, single_map


def _vertical_dim(da: xr.DataArray) -> str | None:
    return next((str(d) for d in da.dims if d in da.coords and str(da[d].attrs.get("axis", "")).upper() == "Z"),
                None)


def field(ds: xr.Dataset, name: str, suffix: str = "") -> xr.DataArray:
    """``name + suffix`` of a forecast or what-if file: a variable, or one level of one
    (``ta_500``: ``ta`` at 500 hPa on its vertical axis; ``ta_500``, ``_response``: that level of
    ``ta_response``)."""
    if f"{name}{suffix}" in ds:
        return ds[f"{name}{suffix}"]
    base, _, level = name.rpartition("_")
    if f"{base}{suffix}" in ds and (z := _vertical_dim(ds[f"{base}{suffix}"])) is not None:
        da = ds[f"{base}{suffix}"]
        try:
            return da.sel({z: float(level)}, method="nearest", tolerance=1e-6).drop_vars(z)
        except (KeyError, ValueError):
            pass
    raise KeyError(f"no variable {name}{suffix} (nor level {name.rpartition('_')[2]} of {base}{suffix}) in the file")


def field_names(ds: xr.Dataset, names: list[str], suffix: str = "") -> list[str]:
    """``names`` (of the variables ``name + suffix``) with each variable on a vertical axis
    spelled as its level fields (``ta`` -> ``ta_850``, ``ta_500``), as the metrics and
    checkpoints name them."""
    out = []
    for n in names:
        da = ds[f"{n}{suffix}"]
        z = _vertical_dim(da)
        out += [f"{n}_{float(x):g}" for x in da[z].values] if z else [n]
    return out


def on_earth(ds: xr.Dataset) -> bool:
    """Whether a forecast or what-if file is of the Earth (its coastline belongs on the maps), not
    of the generator's idealised planet (its input's title says "synthetic")."""
    return "synthetic" not in str(ds.attrs.get("hfmi_input_title", ds.attrs.get("title", ""))).lower()


def lead_step(forecast: xr.Dataset | str | Path) -> str:
    """The time step a forecast's leads count (``1 month``, ``1 year``), from its ``lead`` axis
    (the ``step`` attribute, or the long name ``forecast lead in steps of ...`` of older files);
    "" when the file does not say."""
    ds = open_cf(forecast) if not isinstance(forecast, xr.Dataset) else forecast
    attrs = ds["lead"].attrs if "lead" in ds.coords else {}
    step = str(attrs.get("step", ""))
    if not step and "steps of " in str(attrs.get("long_name", "")):
        step = str(attrs["long_name"]).split("steps of ", 1)[1].strip()
    return step


def forecast_maps(forecast: xr.Dataset | str | Path, var: str = "tas", init_index: int = 0, *,
                  dynamic: bool = False, projection: str = "plate-carree") -> Any:
    """Forecast of ``var`` from one initialisation, with a lead-time slider (``dynamic``: frames are
    rendered on demand, as in the dashboard); the coastline drawn on maps of the Earth; in
    ``projection`` (plate-carree, robinson, mollweide, north-polar, south-polar)."""
    ds = open_cf(forecast) if not isinstance(forecast, xr.Dataset) else forecast
    da = field(ds, var).isel(init_time=init_index).load()
    init = str(ds["init_time"].values[init_index])[:10]
    return map_with_slider(da, "lead", cmap="viridis" if var != "siconc" else "Blues_r",
                           title=f"{var} forecast from {init}", dynamic=dynamic, coast=on_earth(ds),
                           projection=projection)


BASELINE_NAMES = {"skip": "skip path (linear inverse model)"}  # the others: viz.core.method_name


def skill_vs_lead(metrics: Mapping[str, float] | str | Path, var: str = "tas", metric: str = "rmse", *,
                  step: str = "") -> Any:
    """RMSE (or ACC) against lead time for the model and every baseline the metrics hold for
    ``var`` at every lead (persistence, climatology, damped persistence, the skip path): the
    strongest one included, whichever it is. ``step`` names what a lead counts (``1 month``;
    :func:`lead_step` of the forecast file); without it the axis says "steps"."""
    m = json.loads(Path(metrics).read_text()) if not isinstance(metrics, Mapping) else metrics
    leads = sorted(int(k.rsplit("lead", 1)[1]) for k in m if k.startswith(f"{metric}_{var}_lead"))
    series = {"model": (leads, [m[f"{metric}_{var}_lead{k}"] for k in leads])}
    suffix = f"_{var}_lead{leads[0]}" if leads else None
    bases = sorted({k[len(metric) + 1:-len(suffix)] for k in m
                    if suffix and k.startswith(f"{metric}_") and k.endswith(suffix) and k != f"{metric}{suffix}"})
    for base in bases:
        if all(f"{metric}_{base}_{var}_lead{k}" in m for k in leads):
            name = BASELINE_NAMES.get(base) or method_name(base)
            series[name] = (leads, [m[f"{metric}_{base}_{var}_lead{k}"] for k in leads])
    label = "latitude-weighted RMSE" if metric == "rmse" else "anomaly correlation"
    xlabel = f"lead [steps of {step}]" if step else "lead [steps]"
    return curves(series, xlabel=xlabel, ylabel=label, title=f"{var}: {label} vs lead")


def whatif_maps(whatif: xr.Dataset | str | Path, var: str = "tas", *, projection: str = "plate-carree") -> Any:
    """Predicted ensemble-mean response, its spread and (when known) the true response, in
    ``projection`` (see :func:`forecast_maps`)."""
    ds = open_cf(whatif) if not isinstance(whatif, xr.Dataset) else whatif
    resp = field(ds, var, "_response").load()
    try:
        truth = field(ds, var, "_response_true").load()
    except KeyError:
        truth = None
    panels = []
    m = float(abs(resp).max())
    if truth is not None:
        m = max(m, float(abs(truth).max()))
    coast = on_earth(ds)
    panels.append(single_map(resp, clim=(-m, m), title=f"{var} response (model ensemble mean)", coast=coast,
                             projection=projection))
    if truth is not None:
        panels.append(single_map(truth, clim=(-m, m), title=f"{var} response (generator truth)", coast=coast,
                                 projection=projection))
    panels.append(single_map(field(ds, var, "_response_spread").load(), cmap="viridis",
                             title=f"{var} response spread (ensemble std)", coast=coast, projection=projection))
    import holoviews as hv

    return hv.Layout(panels).cols(2)
