"""Climate runs on the dashboard (forecast maps with a lead slider, skill against lead, what-if
response maps), drawn by the functions the ``03_visualize`` notebook uses; files are read
through ``run.file`` (inside the results folder)."""

from __future__ import annotations

from typing import Any

from hfmi_kit.errors import ConfigError
from hfmi_kit.viz.dashboard import guard, open_netcdf, panel, published, show
from hfmi_kit.viz.results import Run


def section(run: Run) -> list[Any]:
    """Forecast maps with a lead slider, skill against lead, and what-if response maps."""

    from hfmi_kit.domains.climate.plots import field_names, forecast_maps, lead_step, skill_vs_lead, whatif_maps
    from hfmi_kit.viz.projection import PROJECTIONS

    pn = panel()

    def projection() -> Any:
        return pn.widgets.Select(name="projection", options=list(PROJECTIONS), value="plate-carree")

    out: list[Any] = []
    fc_path = published(run, "forecast.nc", out)
    if fc_path is not None:
        def forecast() -> Any:
            ds = open_netcdf(fc_path)
            names = field_names(ds, [str(v) for v in ds.data_vars if {"init_time", "lead"} <= set(ds[v].dims)])
            if not names:
                raise ConfigError(f"{fc_path.name}: no variable with init_time and lead dimensions")
            var = pn.widgets.Select(name="variable", options=names, value="tas" if "tas" in names else names[0])
            proj = projection()

            def maps(v: str, p: str) -> Any:
                return show(forecast_maps(ds, v, dynamic=True, projection=p))

            def skill(v: str) -> Any:
                plots = [skill_vs_lead(run.metrics, v, m, step=lead_step(ds)) for m in ("rmse", "acc")
                         if f"{m}_{v}_lead1" in run.metrics]
                return pn.Row(*[show(p) for p in plots]) if plots else pn.pane.Markdown(
                    f"*no per-lead scores of {v} in metrics.json*")

            return pn.Column(f"### Forecast ({fc_path.name})", pn.Row(var, proj), pn.bind(maps, var, proj),
                             "### Skill against lead",
                             pn.bind(skill, var))
        out.append(guard(fc_path.name, forecast))
    wi_path = published(run, "whatif.nc", out)
    if wi_path is not None:
        def whatif() -> Any:
            ds = open_netcdf(wi_path)
            names = field_names(ds, [str(v)[: -len("_response")] for v in ds.data_vars
                                     if str(v).endswith("_response")], "_response")
            if not names:
                raise ConfigError(f"{wi_path.name}: no <variable>_response in the file")
            var = pn.widgets.Select(name="variable", options=names, value="tas" if "tas" in names else names[0])
            text = ds.attrs.get("title", "") or ds.attrs.get("comment", "")
            proj = projection()
            return pn.Column(f"### What-if response ({wi_path.name})", pn.pane.Markdown(text), pn.Row(var, proj),
                             pn.bind(lambda v, p: show(whatif_maps(ds, v, projection=p)), var, proj))
        out.append(guard(wi_path.name, whatif))
    return out
