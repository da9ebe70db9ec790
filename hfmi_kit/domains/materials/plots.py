"""Materials plots (HoloViews): parity, error by chemistry, the SQ curve with candidates, the
active-learning curve. Label-efficiency curves use :func:`hfmi_kit.viz.core.label_efficiency`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from hfmi_kit.domains.materials.pv import sq_limit
from hfmi_kit.viz import require_holoviews
from hfmi_kit.viz.core import curves, method_name

BASELINE_NAMES = {"rf": "random forest (Magpie)"}  # the others: viz.core.method_name


def parity(frame: Any, *, pred: str = "prediction_ev", title: str = "", size: int = 360) -> Any:
    """Measured against predicted gap (out-of-fold), coloured by uncertainty, with the y = x line."""
    hv = require_holoviews()
    hi = float(max(frame["target_ev"].max(), frame[pred].max())) * 1.05
    pts = hv.Scatter(frame, "target_ev", [pred, "uncertainty_ev", "formula"]).opts(
        color="uncertainty_ev", cmap="viridis", colorbar=True, size=4, alpha=0.6, tools=["hover"],
        xlabel="measured gap [eV]", ylabel="predicted gap [eV]")
    mae = float(np.abs(frame[pred] - frame["target_ev"]).mean())
    line = hv.Curve([(0, 0), (hi, hi)]).opts(color="black", line_dash="dashed")
    return (pts * line).opts(title=title or f"parity (MAE {mae:.3f} eV)", width=size + 60, height=size)


def error_by_chemistry(frame: Any, *, methods: Mapping[str, str] | None = None) -> Any:
    """Mean absolute error per chemical family, one bar group per method (column of predictions;
    default: the model and every baseline the frame holds, ``prediction_<baseline>_ev``)."""
    hv = require_holoviews()
    if methods is None:
        methods = {"model": "prediction_ev"}
        for col in frame.columns:
            if col.startswith("prediction_") and col.endswith("_ev") and col != "prediction_ev":
                base = col[len("prediction_"):-len("_ev")]
                methods[BASELINE_NAMES.get(base) or method_name(base)] = col
    methods = dict(methods)
    rows = []
    for fam, g in frame.groupby("chemistry"):
        for name, col in methods.items():
            if col in g:
                rows.append((str(fam), name, float(np.abs(g[col] - g["target_ev"]).mean())))
    return hv.Bars(rows, ["chemistry", "method"], "MAE [eV]").opts(
        width=720, height=320, xrotation=45, tools=["hover"], title="error by chemistry (out-of-fold)")


def sq_curve(candidates: Any | None = None, *, top: int = 15) -> Any:
    """The Shockley–Queisser limit against band gap, with the ``top`` ranked candidates at their
    predicted gap and their expected SQ efficiency over the gap's uncertainty (the value they are
    ranked by: below the curve where the uncertainty spans its peak). Error bars: the gap's
    uncertainty (cut at 0 eV) and the spread of the SQ efficiency."""
    hv = require_holoviews()
    g = np.linspace(0.3, 3.5, 321)
    plot = hv.Curve((g, 100 * sq_limit(g)), "band gap [eV]", "SQ limit [%]", label="AM1.5G, 300 K")
    if candidates is not None and len(candidates):
        c = candidates.head(top).copy()
        y = "expected_sq_pct" if "expected_sq_pct" in c else "sq_limit_pct"  # files written before it
        gap, unc = c["prediction_ev"].to_numpy(float), c["uncertainty_ev"].to_numpy(float)
        pts = hv.Scatter(c, "prediction_ev", [y, "formula", "uncertainty_ev", "sq_limit_pct"],
                         label=f"top {len(c)} candidates (expected SQ)").opts(size=7, tools=["hover"],
                                                                              color="firebrick")
        xerr = hv.ErrorBars((gap, c[y], np.minimum(unc, np.clip(gap, 0, None)), unc),
                            vdims=[y, "gap_minus", "gap_plus"], horizontal=True)
        plot = plot * xerr.opts(color="firebrick", alpha=0.5)
        if "sq_std_pct" in c:
            plot = plot * hv.ErrorBars((gap, c[y], c["sq_std_pct"]), vdims=[y, "sq_std"]).opts(
                color="firebrick", alpha=0.5)
        plot = plot * pts
    return plot.opts(width=560, height=340, title="single-junction efficiency limit")


def active_learning_curve(result: Any) -> Any:
    """Targets found against measurements made, mean over repeats, one curve per strategy."""
    series = {k: (list(x), list(y)) for k, (x, y) in result.curves().items()}
    return curves(series, xlabel="measurements", ylabel="absorbers found (1.1-1.6 eV)",
                  title=f"active learning on {result.pool} measured materials ({result.targets} targets)")


def element_map(model: Any, *, size: int = 520) -> Any:
    """The learned element embeddings projected on their first two principal components, coloured
    by periodic-table group: chemistry the pretraining found without being told."""
    from pymatgen.core import Element

    from hfmi_kit.domains.materials.chem import element_symbols

    hv = require_holoviews()
    syms = element_symbols()[:86]  # H..Rn: the elements with enough data to place
    w = model.backbone.tokenizer.element_embed.weight.detach().cpu().numpy()[: len(syms)]
    w = w - w.mean(0)
    u, sv, _ = np.linalg.svd(w, full_matrices=False)
    xy = u[:, :2] * sv[:2]
    data = [(float(x), float(y), s, int(Element(s).group)) for (x, y), s in zip(xy, syms)]
    pts = hv.Points(data, ["pc1", "pc2"], ["symbol", "group"]).opts(
        color="group", cmap="Category20", size=9, colorbar=True, tools=["hover"])
    return (pts * hv.Labels(data, ["pc1", "pc2"], "symbol").opts(text_font_size="8pt", yoffset=0.02)).opts(
        width=size + 80, height=size, title="learned element embeddings (PCA)")
