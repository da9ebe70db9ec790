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

import html
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hfmi_kit.errors import ConfigError, HfmiError
from hfmi_kit.viz import require_holoviews
from hfmi_kit.viz.results import AccessRefusedError, Run, _internal, label_rows, load_run, resolve_under, scan_results

LOGGER = logging.getLogger(__name__)
TITLE = "hfmi_kit results"


def panel() -> Any:
    try:
        import panel as pn
    except ImportError as e:
        raise ImportError("the dashboard needs panel; install it with `pip install hfmi_kit[viz]`") from e
    return pn


def guard(what: str, build: Callable[[], Any]) -> Any:
    """Build one section; a bad or half-written file becomes a visible message, not a crash."""
    pn = panel()
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
    pn = panel()
    if isinstance(obj, hv.Layout) and not any(isinstance(o, (hv.DynamicMap, hv.HoloMap)) for o in obj):
        cols = getattr(obj, "_max_cols", None) or len(obj)
        items = [pn.pane.HoloViews(o) for o in obj]
        return pn.Column(*[pn.Row(*items[i: i + cols]) for i in range(0, len(items), cols)])
    return pn.panel(obj, widget_location="top_left")


def _metrics_table(run: Run) -> Any:
    import pandas as pd

    from hfmi_kit.domains import get_domain

    pn = panel()
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
    pn = panel()
    if not run.files:
        return pn.pane.Markdown("*no published files*")
    base = f"files/{quote(run.rel)}/" if run.rel else "files/"
    shown = run.files[:60]
    lines = [f"- [{f}]({base}{quote(f)})" for f in shown]
    if len(run.files) > len(shown):
        lines.append(f"- ... and {len(run.files) - len(shown)} more")
    return pn.pane.Markdown("\n".join(lines))


# ---------------------------------------------------------------- helpers the domains' sections use


def published(run: Run, name: str, notes: list[Any]) -> Path | None:
    """The run's file ``name`` resolved inside the results directory, or None when absent; a file
    that resolves outside is not read: a refusal is added to ``notes`` instead."""
    try:
        return run.file(name)
    except AccessRefusedError as e:
        notes.append(panel().pane.Alert(f"**{name}** is not shown: {e}", alert_type="danger", name="refused"))
        return None


def open_netcdf(path: Path) -> Any:
    """A NetCDF file of a run, opened after the checks every data file passes (no external
    storage or links in HDF5, see :func:`hfmi_kit.data.safety.check_netcdf`)."""
    from hfmi_kit.data.cf import open_cf

    return open_cf(path)


# ---------------------------------------------------------------- pages


def run_page(root: Path, run: Run) -> Any:
    """Everything about one run."""
    pn = panel()
    head = f"## {run.name}\n\n**domain** {run.domain or '?'} · **kind** {run.kind} · **status** {run.status}"
    items: list[Any] = [pn.pane.Markdown(head, name="run header")]
    if run.problems:
        items.append(pn.pane.Alert("**" + run.status + "**: " + "; ".join(run.problems),
                                   alert_type="warning" if run.status == "in progress" else "danger",
                                   name="run status"))
    if run.status == "ok" and run.domain:
        items.extend(guard(f"{run.domain} plots", lambda: _domain_section(run)))
    if run.status != "malformed" and (run.kind == "pretrain" or len(items) == 1):
        # a run with nothing else to show (a pretraining) shows how its loss went down
        curve = guard("training curve", lambda: _training_curve(run))
        if curve is not None:
            items.append(curve)
    side = [pn.pane.Markdown("### Metrics"), _metrics_table(run), pn.pane.Markdown("### Files"), _files(run)]
    side.append(pn.Card(_card_sections(run), title="Model card", collapsed=False, max_height=900, scroll=True))
    return pn.Row(pn.Column(*items, sizing_mode="stretch_width"), pn.Column(*side, width=420),
                  sizing_mode="stretch_width")


def _training_curve(run: Run) -> Any:
    """The loss against step from the run's training logs (``metrics.jsonl``, and one level down
    for a run trained in stages), read through ``run.file``; None without a log."""
    from hfmi_kit.viz.core import loss_curve

    names = ["metrics.jsonl"] if run.has("metrics.jsonl") else []
    names += sorted(str(p.relative_to(run.path)) for p in run.path.glob("*/metrics.jsonl")
                    if p.parent.name != "checkpoints")
    logs = {}
    for n in names:
        f = run.file(n)  # refused when it leads outside the results directory
        if f is not None:
            logs["" if n == "metrics.jsonl" else n.split("/", 1)[0]] = f
    if not logs:
        return None
    return panel().pane.HoloViews(loss_curve(logs), name="training curve")


def shorten(value: Any, *, items: int = 8, keys: int = 24) -> Any:
    """``value`` with every list longer than ``items`` cut to its first three and last value and a
    count (``[-84.4, -73.1, -61.9, "... 11 more ...", 84.4]``) and every mapping longer than
    ``keys`` cut likewise: a model card's every latitude, training year and element, summarised."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
        out = {k: shorten(v, items=items, keys=keys) for k, v in pairs[:keys]}
        if len(pairs) > keys:
            out["..."] = f"{len(pairs) - keys} more"
        return out
    if isinstance(value, (list, tuple)):
        vals = [shorten(v, items=items, keys=keys) for v in value]
        return vals if len(vals) <= items else [*vals[:3], f"... {len(vals) - 4} more ...", vals[-1]]
    return value


def _card_sections(run: Run) -> Any:
    """The model card in sections (overview and metrics open, the rest folded in ``<details>``),
    rendered from the checkpoint's config with long lists summarised (:func:`shorten`); the
    run's ``MODEL_CARD.md`` as it is when there is no config. One Markdown pane: sections as
    Panel cards would each be a model sent to the browser."""
    import re

    from hfmi_kit.train.pretrained import render_model_card

    pn = panel()
    if run.config:
        text = render_model_card(shorten(run.config))
    elif run.card:
        text = run.card
    else:
        return pn.pane.Markdown("*no model card*", name="model card")
    head, *sections = re.split(r"(?m)^## ", text)
    out = [head]
    for sec in sections:
        title, _, body = sec.partition("\n")
        title = title.strip()
        opened = " open" if title in ("Overview", "Metrics") else ""
        out.append(f"<details{opened}><summary><b>{html.escape(title)}</b></summary>\n\n{body.strip()}\n\n</details>\n")
    return pn.pane.Markdown("\n".join(out), name="model card", sizing_mode="stretch_width")


def _domain_section(run: Run) -> list[Any]:
    """The run's domain's own components (:meth:`Domain.dashboard_section`); none for an unknown domain."""
    from hfmi_kit.domains import get_domain

    try:
        dom = get_domain(str(run.domain))
    except (HfmiError, ImportError):
        return []
    return list(dom.dashboard_section(run))


def overview_page(runs: list[Run]) -> Any:
    """The runs under the directory: domain, kind, status, headline score, labels."""
    from hfmi_kit.domains import get_domain

    pn = panel()
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

    pn = panel()
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
                      show(label_efficiency(dr, dom.primary_metric, xlabel=dom.label_title or dom.label_key,
                                            ylabel=dom.metric_title or dom.primary_metric))]
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
    pn = panel()
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
    pn = panel()
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
