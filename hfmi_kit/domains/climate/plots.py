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
from hfmi_kit.viz.core import curves, map_with_slider, single_map


def forecast_maps(forecast: xr.Dataset | str | Path, var: str = "tas", init_index: int = 0, *,
                  dynamic: bool = False) -> Any:
    """Forecast of ``var`` from one initialisation, with a lead-time slider (``dynamic``: frames are
    rendered on demand, as in the dashboard)."""
    ds = open_cf(forecast) if not isinstance(forecast, xr.Dataset) else forecast
    da = ds[var].isel(init_time=init_index).load()
    init = str(ds["init_time"].values[init_index])[:10]
    return map_with_slider(da, "lead", cmap="viridis" if var != "siconc" else "Blues_r",
                           title=f"{var} forecast from {init}", dynamic=dynamic)


BASELINE_NAMES = {"damped_persistence": "damped persistence", "skip": "skip path (linear inverse model)"}


def skill_vs_lead(metrics: Mapping[str, float] | str | Path, var: str = "tas", metric: str = "rmse") -> Any:
    """RMSE (or ACC) against lead time for the model and every baseline the metrics hold for
    ``var`` at every lead (persistence, climatology, damped persistence, the skip path): the
    strongest one included, whichever it is."""
    m = json.loads(Path(metrics).read_text()) if not isinstance(metrics, Mapping) else metrics
    leads = sorted(int(k.rsplit("lead", 1)[1]) for k in m if k.startswith(f"{metric}_{var}_lead"))
    series = {"model": (leads, [m[f"{metric}_{var}_lead{k}"] for k in leads])}
    suffix = f"_{var}_lead{leads[0]}" if leads else None
    bases = sorted({k[len(metric) + 1:-len(suffix)] for k in m
                    if suffix and k.startswith(f"{metric}_") and k.endswith(suffix) and k != f"{metric}{suffix}"})
    for base in bases:
        if all(f"{metric}_{base}_{var}_lead{k}" in m for k in leads):
            series[BASELINE_NAMES.get(base, base)] = (leads, [m[f"{metric}_{base}_{var}_lead{k}"] for k in leads])
    label = "latitude-weighted RMSE" if metric == "rmse" else "anomaly correlation"
    return curves(series, xlabel="lead [months]", ylabel=label, title=f"{var}: {label} vs lead")


def whatif_maps(whatif: xr.Dataset | str | Path, var: str = "tas") -> Any:
    """Predicted ensemble-mean response, its spread and (when known) the true response."""
    ds = open_cf(whatif) if not isinstance(whatif, xr.Dataset) else whatif
    resp = ds[f"{var}_response"].load()
    panels = []
    m = float(abs(resp).max())
    if f"{var}_response_true" in ds:
        m = max(m, float(abs(ds[f"{var}_response_true"]).max()))
    panels.append(single_map(resp, clim=(-m, m), title=f"{var} response (model ensemble mean)"))
    if f"{var}_response_true" in ds:
        panels.append(single_map(ds[f"{var}_response_true"].load(), clim=(-m, m),
                                 title=f"{var} response (generator truth)"))
    panels.append(single_map(ds[f"{var}_response_spread"].load(), cmap="viridis",
                             title=f"{var} response spread (ensemble std)"))
    import holoviews as hv

    return hv.Layout(panels).cols(2)
