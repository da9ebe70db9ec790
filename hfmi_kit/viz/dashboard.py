"""The stakeholder dashboard: a Panel app over a results directory.

It reads what runs publish (``metrics.json``, the checkpoint's ``config.json`` and
``MODEL_CARD.md``, prediction files) and shows them with the same HoloViews functions the
``03_visualize`` notebooks call. Pages (query parameters, so every view has a URL):

- ``?`` the runs under the directory, with their status (ok, in progress, malformed);
- ``?run=REL`` one run: its domain's plots, headline metrics, files and model card;
- ``?page=compare`` runs side by side: metrics table and label-efficiency curves.

Large arrays stay on the server: sliders drive DynamicMaps, so a volume goes to the browser as
the slices shown and a map at display size. Files are downloadable under ``files/`` through a
handler that refuses anything outside the directory. :func:`serve` binds 127.0.0.1 by default.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hfmi_kit.errors import ConfigError, HfmiError
from hfmi_kit.viz import require_holoviews
from hfmi_kit.viz.results import AccessRefusedError, Run, _internal, label_rows, load_run, resolve_under, scan_results

LOGGER = logging.getLogger(__name__)
TITLE = "hfmi_kit results"


def _pn() -> Any:
    try:
        import panel as pn
    except ImportError as e:
        raise ImportError("the dashboard needs panel; install it with `pip install hfmi_kit[viz]`") from e
    return pn


def _guard(what: str, build: Callable[[], Any]) -> Any:
    """Build one section; a bad or half-written file becomes a visible message, not a crash."""
    pn = _pn()
    try:
        return build()
    except (HfmiError, OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError) as e:
        LOGGER.warning("dashboard: %s: %s", what, e)
        return pn.pane.Alert(f"**{what}** could not be shown: {e}", alert_type="danger")


def show(obj: Any) -> Any:
    """A HoloViews object as Panel components. A static Layout goes as one pane per plot (a
    Bokeh grid of plots with colour bars inside nested columns renders blank); objects with
    sliders keep Panel's widgets."""
    hv = require_holoviews()
    pn = _pn()
    if isinstance(obj, hv.Layout) and not any(isinstance(o, (hv.DynamicMap, hv.HoloMap)) for o in obj):
        cols = getattr(obj, "_max_cols", None) or len(obj)
        items = [pn.pane.HoloViews(o) for o in obj]
        return pn.Column(*[pn.Row(*items[i: i + cols]) for i in range(0, len(items), cols)])
    return pn.panel(obj, widget_location="top_left")


def _metrics_table(run: Run) -> Any:
    import pandas as pd

    from hfmi_kit.domains import get_domain

    pn = _pn()
    keys: list[str] = []
    if run.domain:
        try:
            keys = [k for k in get_domain(run.domain).headline_metrics if k in run.metrics]
        except (HfmiError, ImportError):
            keys = []
    keys = keys or [k for k in run.metrics if "lead" not in k][:24]
    if not keys:
        return pn.pane.Markdown("*no metrics*")
    frame = pd.DataFrame({"metric": keys, "value": [run.metrics[k] for k in keys]})
    return pn.pane.DataFrame(frame, index=False, float_format="{:.4g}".format, sizing_mode="stretch_width",
                             name="metrics")


def _files(run: Run) -> Any:
    pn = _pn()
    if not run.files:
        return pn.pane.Markdown("*no published files*")
    base = f"files/{quote(run.rel)}/" if run.rel else "files/"
    shown = run.files[:60]
    lines = [f"- [{f}]({base}{quote(f)})" for f in shown]
    if len(run.files) > len(shown):
        lines.append(f"- ... and {len(run.files) - len(shown)} more")
    return pn.pane.Markdown("\n".join(lines))


# ---------------------------------------------------------------- domain sections


def _published(run: Run, name: str, notes: list[Any]) -> Path | None:
    """The run's file ``name`` resolved inside the results directory, or None when absent; a file
    that resolves outside is not read: a refusal is added to ``notes`` instead."""
    try:
        return run.file(name)
    except AccessRefusedError as e:
        notes.append(_pn().pane.Alert(f"**{name}** is not shown: {e}", alert_type="danger", name="refused"))
        return None


def open_netcdf(path: Path) -> Any:
    """A NetCDF file of a run, opened after the checks every data file passes (no external
    storage or links in HDF5, see :func:`hfmi_kit.data.safety.check_netcdf`)."""
    from hfmi_kit.data.cf import open_cf

    return open_cf(path)


def climate_section(run: Run) -> list[Any]:
    """Forecast maps with a lead slider, skill against lead, and what-if response maps."""

    from hfmi_kit.domains.climate.plots import forecast_maps, skill_vs_lead, whatif_maps

    pn = _pn()
    out: list[Any] = []
    fc_path = _published(run, "forecast.nc", out)
    if fc_path is not None:
        def forecast() -> Any:
            ds = open_netcdf(fc_path)
            names = [str(v) for v in ds.data_vars if {"init_time", "lead"} <= set(ds[v].dims)]
            if not names:
                raise ConfigError(f"{fc_path.name}: no variable with init_time and lead dimensions")
            var = pn.widgets.Select(name="variable", options=names, value="tas" if "tas" in names else names[0])

            def maps(v: str) -> Any:
                return show(forecast_maps(ds, v, dynamic=True))

            def skill(v: str) -> Any:
                plots = [skill_vs_lead(run.metrics, v, m) for m in ("rmse", "acc")
                         if f"{m}_{v}_lead1" in run.metrics]
                return pn.Row(*[show(p) for p in plots]) if plots else pn.pane.Markdown(
                    f"*no per-lead scores of {v} in metrics.json*")

            return pn.Column(f"### Forecast ({fc_path.name})", var, pn.bind(maps, var), "### Skill against lead",
                             pn.bind(skill, var))
        out.append(_guard(fc_path.name, forecast))
    wi_path = _published(run, "whatif.nc", out)
    if wi_path is not None:
        def whatif() -> Any:
            ds = open_netcdf(wi_path)
            names = [str(v)[: -len("_response")] for v in ds.data_vars if str(v).endswith("_response")]
            if not names:
                raise ConfigError(f"{wi_path.name}: no <variable>_response in the file")
            var = pn.widgets.Select(name="variable", options=names, value="tas" if "tas" in names else names[0])
            text = ds.attrs.get("title", "") or ds.attrs.get("comment", "")
            return pn.Column(f"### What-if response ({wi_path.name})", pn.pane.Markdown(text), var,
                             pn.bind(lambda v: show(whatif_maps(ds, v)), var))
        out.append(_guard(wi_path.name, whatif))
    return out


def _radiology_case(root: Path, run: Run, case_id: str) -> Any:
    import nibabel as nib
    import numpy as np

    from hfmi_kit.domains.radiology import discover
    from hfmi_kit.domains.radiology.plots import orthoviews

    pn = _pn()

    def nifti(p: Path) -> Any:  # canonical (RAS) orientation, read only inside the results directory
        return nib.as_closest_canonical(nib.load(str(resolve_under(root, _rel(root, p)))))

    pred_file = run.file(f"predictions/{case_id}_pred.nii.gz")
    if pred_file is None:
        raise AccessRefusedError(f"refused: no prediction of {case_id!r} in the run")
    pred = np.asarray(nifti(pred_file).dataobj).astype(np.uint8)
    notes, image, masks = [], None, {"predicted": pred}
    data = ((run.config or {}).get("card", {}).get("data") or [{}])[0].get("path")
    if data:
        try:
            sub = {s.id: s for s in discover(resolve_under(root, _rel(root, Path(data))))}.get(case_id)
            mods = (run.config or {}).get("geometry", {}).get("modalities") or list(sub.images if sub else [])
            if sub is not None and mods and mods[0] in sub.images:
                img = nifti(Path(sub.images[mods[0]]))
                if img.shape[:3] == pred.shape:
                    image = np.asarray(img.dataobj, dtype=np.float32)
                if sub.label:
                    lab = nifti(Path(sub.label))
                    if lab.shape[:3] == pred.shape:
                        masks["true"] = np.asarray(lab.dataobj).astype(np.uint8)
                notes.append(f"image: {mods[0]} of {case_id}")
        except AccessRefusedError:
            notes.append("the input images lie outside the results directory: the prediction is shown alone")
    if image is None:
        image = (pred > 0).astype(np.float32)
    ref = masks.get("true", pred)
    centre = np.argwhere(ref > 0).mean(0).round().astype(int) if ref.any() else None
    plot = orthoviews(image, masks, title=case_id, centre=centre, positions=list(range(30, 71, 5)), size=220,
                      dynamic=True)
    return pn.Column(pn.pane.Markdown("; ".join(notes)), show(plot))


def _rel(root: Path, p: Path) -> str:
    """``p`` relative to ``root`` (resolved); ``..`` when outside, which :func:`resolve_under` refuses."""
    try:
        return str(Path(os.path.abspath(p)).resolve().relative_to(root.resolve()))
    except ValueError:
        return "../" + p.name


def radiology_section(root: Path, run: Run) -> list[Any]:
    """Per test case: orthogonal slices with the predicted (and true) label overlay, a slice slider."""
    import pandas as pd

    pn = _pn()
    out: list[Any] = []
    pred_dir = _published(run, "predictions", out)
    preds = sorted(pred_dir.glob("*_pred.nii.gz")) if pred_dir is not None else []
    if not preds:
        return out

    def build() -> Any:
        ids = [p.name[: -len("_pred.nii.gz")] for p in preds]
        case = pn.widgets.Select(name="test case", options=ids, value=ids[0])
        items = ["### Segmentation", case, pn.bind(lambda c: _guard(c, lambda: _radiology_case(root, run, c)), case)]
        cj = run.file("cases.json")
        if cj is not None:
            per = json.loads(cj.read_text(encoding="utf-8")).get("per_case", {}).get("model", [])
            if per:
                cols = [c for c in ("id", "dice", "hd95_mm", "centroid_error_mm", "volume_ml_pred", "volume_ml_true")
                        if c in per[0]]
                items += ["### Per-case scores", pn.pane.DataFrame(pd.DataFrame(per)[cols], index=False,
                                                                   float_format="{:.3g}".format)]
        return pn.Column(*items)

    return [*out, _guard("predictions", build)]


def carbon_section(run: Run) -> list[Any]:
    """Biomass and interval-width maps per epoch, the change map, the budget table and plot."""
    import pandas as pd

    from hfmi_kit.domains.carbon.plots import biomass_maps, budget_plot, change_map, map_set

    pn = _pn()
    out: list[Any] = []
    nc = _published(run, "maps/carbon.nc", out)
    if nc is not None:
        def maps() -> Any:
            ms = map_set(nc)
            epoch = pn.widgets.Select(name="epoch", options={e: i for i, e in enumerate(ms.epochs)},
                                      value=len(ms.epochs) - 1)
            items = ["### Biomass", epoch, pn.bind(lambda i: show(biomass_maps(nc, epoch=i)), epoch)]
            if len(ms.epochs) > 1:
                items += ["### Change", show(change_map(nc))]
            return pn.Column(*items)
        out.append(_guard("maps/carbon.nc", maps))
    bf = _published(run, "budget.csv", out)
    if bf is not None:
        def budget() -> Any:
            rows = pd.read_csv(bf)
            missing = {"quantity", "value", "lower_90", "upper_90"} - set(rows.columns)
            if missing:
                raise ConfigError(f"budget.csv lacks columns {sorted(missing)}")
            return pn.Column("### Regional carbon budget", pn.pane.DataFrame(rows.round(1), index=False, name="budget"),
                             show(budget_plot(rows.to_dict("records"))))
        out.append(_guard("budget.csv", budget))
    return out


def candidate_filters(frame: Any) -> tuple[list[Any], Callable[..., Any]]:
    """Widgets over a candidates table and the function that applies them."""
    pn = _pn()
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


def materials_section(run: Run) -> list[Any]:
    """Parity and error by chemistry of the cross-validated predictions, the candidate table with
    filters and the SQ plot, the active-learning curve."""
    import pandas as pd

    from hfmi_kit.domains.materials.discover import ALResult
    from hfmi_kit.domains.materials.plots import active_learning_curve, error_by_chemistry, parity, sq_curve

    pn = _pn()
    out: list[Any] = []
    cv = _published(run, "cv_predictions.csv", out)
    if cv is not None:
        def cvplots() -> Any:
            f = pd.read_csv(cv)
            methods = {"model": "prediction_ev", **{m: f"prediction_ev_{m}" for m in ("scratch", "rf", "dummy")
                                                    if f"prediction_ev_{m}" in f}}
            return pn.Column("### Out-of-fold predictions", pn.Row(show(parity(f))),
                             show(error_by_chemistry(f, methods=methods)))
        out.append(_guard(cv.name, cvplots))
    cand = _published(run, "candidates.csv", out)
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
        out.append(_guard(cand.name, candidates))
    al = _published(run, "active_learning.json", out)
    if al is not None:
        out.append(_guard(al.name, lambda: pn.Column("### Active learning", show(
            active_learning_curve(ALResult.load(al))))))
    return out


# ---------------------------------------------------------------- pages


def run_page(root: Path, run: Run) -> Any:
    """Everything about one run."""
    pn = _pn()
    head = f"## {run.name}\n\n**domain** {run.domain or '?'} · **kind** {run.kind} · **status** {run.status}"
    items: list[Any] = [pn.pane.Markdown(head, name="run header")]
    if run.problems:
        items.append(pn.pane.Alert("**" + run.status + "**: " + "; ".join(run.problems),
                                   alert_type="warning" if run.status == "in progress" else "danger",
                                   name="run status"))
    if run.status == "ok":
        sections = {"climate": lambda: climate_section(run), "radiology": lambda: radiology_section(root, run),
                    "carbon": lambda: carbon_section(run), "materials": lambda: materials_section(run)}
        if run.domain in sections:
            items.extend(_guard(f"{run.domain} plots", sections[run.domain]))
    side = [pn.pane.Markdown("### Metrics"), _metrics_table(run), pn.pane.Markdown("### Files"), _files(run)]
    card = pn.pane.Markdown(run.card or "*no model card*", name="model card", sizing_mode="stretch_width")
    side.append(pn.Card(card, title="Model card", collapsed=False, max_height=900, scroll=True))
    return pn.Row(pn.Column(*items, sizing_mode="stretch_width"), pn.Column(*side, width=420),
                  sizing_mode="stretch_width")


def overview_page(runs: list[Run]) -> Any:
    """The runs under the directory: domain, kind, status, headline score, labels."""
    from hfmi_kit.domains import get_domain

    pn = _pn()
    if not runs:
        return pn.pane.Markdown("No runs found. A run is a directory with `metrics.json`, `model/` or prediction "
                                "files (`hfmi finetune ... --out DIR`).")
    lines = ["| run | domain | kind | status | score | labels |", "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        score = labels = ""
        if r.domain:
            try:
                dom = get_domain(r.domain)
                if dom.primary_metric in r.metrics:
                    score = f"{dom.primary_metric} {r.metrics[dom.primary_metric]:.4g}"
                if dom.label_key in r.metrics:
                    labels = f"{r.metrics[dom.label_key]:g}"
            except (HfmiError, ImportError):
                pass
        status = r.status if not r.problems else f"{r.status}: {'; '.join(r.problems)[:120]}"
        lines.append(f"| [{r.name}](?run={quote(r.rel)}) | {r.domain or '?'} | {r.kind} | {status} | {score} | "
                     f"{labels} |")
    return pn.pane.Markdown("\n".join(lines), name="runs", sizing_mode="stretch_width")


def compare_page(runs: list[Run]) -> Any:
    """Runs side by side: a metrics table and, per domain, label-efficiency curves."""
    import pandas as pd

    from hfmi_kit.domains import get_domain
    from hfmi_kit.viz.core import label_efficiency

    pn = _pn()
    ok = [r for r in runs if r.status == "ok" and r.metrics]
    if not ok:
        return pn.pane.Markdown("*no finished runs with metrics to compare*")
    by_name = {r.name: r for r in ok}
    default = [r.name for r in ok if r.kind == "finetune"] or list(by_name)[:4]
    choose = pn.widgets.MultiChoice(name="runs", options=list(by_name), value=default, sizing_mode="stretch_width")

    def view(names: list[str]) -> Any:
        sel = [by_name[n] for n in names if n in by_name]
        if not sel:
            return pn.pane.Markdown("*choose runs*")
        keys: list[str] = []
        for r in sel:
            try:
                hm = get_domain(r.domain).headline_metrics if r.domain else ()
            except (HfmiError, ImportError):
                hm = ()
            keys += [k for k in hm if k in r.metrics and k not in keys]
        table = pd.DataFrame({r.name: [r.metrics.get(k) for k in keys] for r in sel}, index=keys)
        items: list[Any] = ["### Metrics", pn.pane.DataFrame(table, float_format="{:.4g}".format, na_rep="",
                                                            name="compare table", sizing_mode="stretch_width")]
        rows = label_rows(sel)
        for dom_name in sorted({r["domain"] for r in rows}):
            dom = get_domain(dom_name)
            dr = [r for r in rows if r["domain"] == dom_name]
            arrow = "higher is better" if dom.higher_is_better else "lower is better"
            items += [f"### Label efficiency: {dom_name} ({dom.primary_metric}, {arrow})",
                      show(label_efficiency(dr, dom.primary_metric, xlabel=dom.label_key))]
        return pn.Column(*items)

    return pn.Column("## Compare runs", choose, pn.bind(view, choose), sizing_mode="stretch_width")


def _arg(args: Mapping[str, Any], name: str) -> str | None:
    v = args.get(name)
    if not v:
        return None
    v = v[0] if isinstance(v, (list, tuple)) else v
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def build_app(results: str | Path, args: Mapping[str, Any] | None = None) -> Any:
    """The page for one request: ``args`` are the URL's query arguments (``run``, ``page``);
    in a server session they are read from the session."""
    pn = _pn()
    require_holoviews()
    pn.extension("tabulator", notifications=False)
    root = Path(results).resolve()
    if args is None:
        args = getattr(pn.state, "session_args", None) or {}
    nav = pn.pane.Markdown(f"[runs](?) · [compare](?page=compare) · results: `{root.name}`", name="nav")
    body: Any
    try:
        runs = scan_results(root)
        rel, page = _arg(args, "run"), _arg(args, "page")
        if rel is not None:
            body = run_page(root, load_run(root, rel))
        elif page == "compare":
            body = compare_page(runs)
        else:
            body = pn.Column("## Runs", overview_page(runs))
    except AccessRefusedError as e:
        body = pn.pane.Alert(str(e), alert_type="danger", name="refused")
    return pn.Column(pn.pane.Markdown(f"# {TITLE}"), nav, body, sizing_mode="stretch_width")


def file_handler(root: Path) -> Any:
    """A tornado handler class serving published files of ``root`` (``files/<run>/<file>``)."""
    from tornado.web import HTTPError, StaticFileHandler

    class ResultFileHandler(StaticFileHandler):
        def validate_absolute_path(self, _root: str, absolute_path: str) -> str | None:
            rel = self.path
            try:
                target = resolve_under(root, rel)
            except AccessRefusedError as e:
                raise HTTPError(403, str(e)) from None
            if target.is_dir() or _internal(target.relative_to(root.resolve())):
                raise HTTPError(403, "refused: not a published file")
            return str(target)

    return ResultFileHandler


def component_handler() -> Any:
    """Panel's component-resource route (``components/<module>/<class>/<attribute>/<path>``),
    answering 404 instead of importing a module that is not already loaded or failing with a 500
    on a malformed path (``..%2f..``): only modules the dashboard itself imported are looked at."""
    import re
    import sys

    from panel.io.server import ComponentResourceHandler
    from tornado.web import HTTPError

    dotted = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

    class SafeComponentHandler(ComponentResourceHandler):
        def parse_url_path(self, path: str) -> str:
            mod = path.split("/", 1)[0]
            if not dotted.match(mod) or mod not in sys.modules:
                raise HTTPError(404, "Module not found")
            try:
                return super().parse_url_path(path)
            except HTTPError:
                raise
            except Exception:  # anything else a crafted path provokes
                raise HTTPError(404, "Component resource not found") from None

    return SafeComponentHandler


def icon_handler() -> Any:
    """``favicon.ico`` under the prefix too (behind a proxy the browser asks for it there)."""
    from tornado.web import RequestHandler

    svg = (Path(__file__).with_name("static") / "hfmi.svg").read_bytes()

    class IconHandler(RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "image/svg+xml")
            self.write(svg)

    return IconHandler


def serve(results: str | Path, *, port: int = 5006, address: str = "127.0.0.1", prefix: str = "",
          websocket_origins: list[str] | None = None, show: bool = False, start: bool = True) -> Any:
    """Serve the dashboard of ``results`` (blocking when ``start``); returns the server."""
    pn = _pn()
    root = Path(results).resolve()
    if not root.is_dir():
        raise ConfigError(f"--results {results}: directory not found")
    if port <= 0 or port > 65535:
        raise ConfigError(f"--port must lie in 1..65535, got {port}")
    origins = websocket_origins or [f"{h}:{port}" for h in ("127.0.0.1", "localhost", address) if h]
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    return pn.serve(lambda: build_app(root), port=port, address=address, websocket_origin=origins,
                    show=show, start=start, title=TITLE, prefix=prefix, verbose=False,
                    extra_patterns=[(r"/files/(.*)", file_handler(root), {"path": str(root)}),
                                    (r"/components/(.*)", component_handler(), {}),
                                    (r"/favicon.ico", icon_handler())])
