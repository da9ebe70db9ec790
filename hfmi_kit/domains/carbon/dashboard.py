"""Carbon runs on the dashboard (biomass and interval-width maps per epoch, the change map, the
regional budget), drawn by the functions the ``03_visualize`` notebook uses; files are read
through ``run.file`` (inside the results folder)."""

from __future__ import annotations

from typing import Any

from hfmi_kit.errors import ConfigError
from hfmi_kit.viz.dashboard import guard, panel, published, show
from hfmi_kit.viz.results import Run


def section(run: Run) -> list[Any]:
    """Biomass and interval-width maps per epoch, the change map, the budget table and plot."""
    import pandas as pd

    from hfmi_kit.domains.carbon.plots import biomass_maps, budget_plot, change_map, map_set

    pn = panel()
    out: list[Any] = []
    nc = published(run, "maps/carbon.nc", out)
    if nc is not None:
        def maps() -> Any:
            ms = map_set(nc)
            epoch = pn.widgets.Select(name="epoch", options={e: i for i, e in enumerate(ms.epochs)},
                                      value=len(ms.epochs) - 1)
            items = ["### Biomass", epoch, pn.bind(lambda i: show(biomass_maps(nc, epoch=i)), epoch)]
            if len(ms.epochs) > 1:
                items += ["### Change", show(change_map(nc))]
            return pn.Column(*items)
        out.append(guard("maps/carbon.nc", maps))
    bf = published(run, "budget.csv", out)
    if bf is not None:
        def budget() -> Any:
            rows = pd.read_csv(bf)
            missing = {"quantity", "value", "lower_90", "upper_90"} - set(rows.columns)
            if missing:
                raise ConfigError(f"budget.csv lacks columns {sorted(missing)}")
            return pn.Column("### Regional carbon budget", pn.pane.DataFrame(rows.round(1), index=False, name="budget"),
                             show(budget_plot(rows.to_dict("records"))))
        out.append(guard("budget.csv", budget))
    return out
