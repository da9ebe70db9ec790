"""Materials runs on the dashboard (out-of-fold parity and error by chemistry, the filterable
candidate table, active learning), drawn by the functions the ``03_visualize`` notebook uses;
files are read through ``run.file`` (inside the results folder)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hfmi_kit.errors import ConfigError
from hfmi_kit.viz.dashboard import guard, panel, published, show
from hfmi_kit.viz.results import Run


def candidate_filters(frame: Any) -> tuple[list[Any], Callable[..., Any]]:
    """Widgets over a candidates table and the function that applies them."""
    pn = panel()
    fams = sorted(str(f) for f in frame["family"].dropna().unique()) if "family" in frame else []
    family = pn.widgets.MultiChoice(name="family", options=fams, value=[])
    lo, hi = float(frame["prediction_ev"].min()), float(frame["prediction_ev"].max())
    gap = pn.widgets.RangeSlider(name="predicted gap [eV]", start=round(lo, 2) - 0.01, end=round(hi, 2) + 0.01,
                                 value=(round(lo, 2) - 0.01, round(hi, 2) + 0.01), step=0.05)
    known = pn.widgets.Select(name="measured before", options=["all", "new only", "known only"], value="all")
    sq = pn.widgets.FloatSlider(name="min expected SQ [%]", start=0.0,
                                end=float(frame["expected_sq_pct"].max()) if "expected_sq_pct" in frame else 40.0,
                                value=0.0, step=0.5)

    def apply(fam: list[str], g: tuple[float, float], k: str, s: float) -> Any:
        f = frame
        if fam:
            f = f[f["family"].astype(str).isin(fam)]
        f = f[(f["prediction_ev"] >= g[0]) & (f["prediction_ev"] <= g[1])]
        if k != "all" and "known" in f:
            f = f[f["known"].astype(bool) == (k == "known only")]
        if "expected_sq_pct" in f:
            f = f[f["expected_sq_pct"] >= s]
        return f

    return [family, gap, known, sq], apply


def section(run: Run) -> list[Any]:
    """Parity and error by chemistry of the cross-validated predictions, the candidate table with
    filters and the SQ plot, the active-learning curve."""
    import pandas as pd

    from hfmi_kit.domains.materials.discover import ALResult
    from hfmi_kit.domains.materials.plots import active_learning_curve, error_by_chemistry, parity, sq_curve

    pn = panel()
    out: list[Any] = []
    cv = published(run, "cv_predictions.csv", out)
    if cv is not None:
        def cvplots() -> Any:
            f = pd.read_csv(cv)  # every baseline's column (prediction_<baseline>_ev) is drawn
            return pn.Column("### Out-of-fold predictions", pn.Row(show(parity(f))), show(error_by_chemistry(f)))
        out.append(guard(cv.name, cvplots))
    cand = published(run, "candidates.csv", out)
    if cand is not None:
        def candidates() -> Any:
            frame = pd.read_csv(cand)
            missing = {"formula", "prediction_ev"} - set(frame.columns)
            if missing:
                raise ConfigError(f"candidates.csv lacks columns {sorted(missing)}")
            widgets, apply = candidate_filters(frame)
            cols = [c for c in ("formula", "family", "prediction_ev", "uncertainty_ev", "expected_sq_pct",
                                "p_target_window", "known", "measured_ev") if c in frame]
            table = pn.widgets.Tabulator(frame[cols].round(3), pagination="local", page_size=15, disabled=True,
                                         show_index=False, name="candidates", sizing_mode="stretch_width")
            count = pn.pane.Markdown(f"{len(frame)} of {len(frame)} candidates", name="candidate count")

            def update(*values: Any) -> Any:
                f = apply(*values)
                table.value = f[cols].round(3)
                count.object = f"{len(f)} of {len(frame)} candidates"
                return show(sq_curve(f))

            return pn.Column("### Candidates", pn.Row(*widgets), count, table, pn.bind(update, *widgets))
        out.append(guard(cand.name, candidates))
    al = published(run, "active_learning.json", out)
    if al is not None:
        out.append(guard(al.name, lambda: pn.Column("### Active learning", show(
            active_learning_curve(ALResult.load(al))))))
    return out
