"""The label-efficiency scorecard: for each domain, the pretrained model against the same model
from scratch and the domain's classical baselines, at each label budget, on the same split,
over several seeds, with the field's metric.

    hfmi scorecard [--domains climate,radiology,...] [--budget small|full] --out DIR

writes ``DIR/scorecard.csv`` (domain, task, label_budget, method, seed, metric, value),
``DIR/scorecard.md`` (mean ± standard deviation per budget and method, and whether the
pretrained model beats scratch beyond the spread), ``DIR/label_efficiency.html`` (the curves)
and every run under ``DIR/runs`` (the dashboard can show them). One pretraining per domain
(seed 0) serves every fine-tuning; each (budget, seed) fine-tunes once from the checkpoint and
once from scratch; the baselines are trained or computed on the same split inside those runs.
What a domain is scored on (its data, budgets, steps and baselines) is its
:meth:`~hfmi_kit.domains.Domain.scorecard_plan`: the scorecard covers every registered domain
that has one.

``small`` runs in minutes on a laptop CPU (tiny models, few steps: it checks the machinery and
gives rough numbers); ``full`` is sized for a cluster job.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hfmi_kit.errors import ConfigError
from hfmi_kit.train.budget import LabelBudget

LOGGER = logging.getLogger(__name__)
COLUMNS = ("domain", "task", "label_budget", "method", "seed", "metric", "value")
BUDGETS = ("small", "full")


@dataclass
class DomainPlan:
    """How one domain is scored."""

    data: Callable[[Path, str], dict[str, Any]]  # (data dir, budget) -> data kwargs for pretrain / finetune
    budgets: dict[str, list[LabelBudget]]  # scorecard budget (small, full) -> the label budgets scored
    pretrain_kw: dict[str, dict[str, Any]]  # budget -> pretrain keywords
    finetune_kw: dict[str, dict[str, Any]]  # budget -> finetune keywords (both methods)
    scratch_separately: bool = False  # finetune has no ``baselines`` option: run ckpt=None too
    baselines: Sequence[str] = ()  # what finetune(baselines=...) trains
    #: baselines that do not depend on the label budget (trained on every labelled case): trained
    #: once per seed, at the first budget, and their rows repeated at the others
    budget_independent: Sequence[str] = ()
    extra_methods: Sequence[str] = field(default_factory=tuple)  # metric suffixes computed in every run
    method_names: dict[str, str] = field(default_factory=dict)  # metric suffix -> method name in the table
    note: str = ""  # a sentence the summary prints under the domain's table (what a method means)


def plan_of(domain: str) -> DomainPlan:
    """The scorecard plan of registered ``domain`` (:meth:`Domain.scorecard_plan`)."""
    from hfmi_kit.domains import get_domain

    plan = get_domain(domain).scorecard_plan()
    if plan is None:
        raise ConfigError(f"the {domain} domain defines no scorecard plan")
    return plan


def scored_domains() -> list[str]:
    """The registered domains that define a scorecard plan (those whose extras are installed)."""
    from hfmi_kit.domains import get_domain, list_domains

    out = []
    for name in list_domains():
        try:
            dom = get_domain(name)
        except ImportError:
            continue
        if dom.scorecard_plan() is not None:
            out.append(name)
    return out


def _rows(domain: str, task: str, budget: float, seed: int, metrics: dict[str, float], metric: str,
          methods: dict[str, str]) -> list[dict[str, Any]]:
    return [{"domain": domain, "task": task, "label_budget": budget, "method": method, "seed": seed, "metric": metric,
             "value": float(metrics[key])} for method, key in methods.items() if key in metrics]


def run_domain(domain: str, out: Path, *, budget: str = "small", seeds: Sequence[int] = (0, 1, 2),
               progress: bool = True) -> list[dict]:
    """Pretrain once, fine-tune at every label budget and seed with the baselines; the rows. With
    ``progress``, a status line per run and at least every 10 s (:class:`~hfmi_kit.train.progress.Status`)."""
    from hfmi_kit.domains import get_domain
    from hfmi_kit.train.progress import Status

    plan, dom = plan_of(domain), get_domain(domain)
    data = plan.data(out / "data", budget)
    runs = out / "runs" / domain
    pkw = {**plan.pretrain_kw[budget]}
    if "exclude" in data:
        pkw["exclude"] = data["exclude"]
    metric, task = dom.primary_metric, dom.tasks[0]
    runs_total = 1 + len(plan.budgets[budget]) * len(seeds) * (1 + plan.scratch_separately)
    with Status(f"scorecard {domain}", runs_total, enabled=progress) as status:
        t0 = time.time()
        with status.part("pretraining"):
            pre = dom.pretrain(data=data.get("pretrain_data", data["data"]), out=runs / "pretrain", seed=0,
                               progress=False, **pkw)
        LOGGER.info("scorecard %s: pretrained in %.0f s", domain, time.time() - t0)
        rows: list[dict[str, Any]] = []
        once: dict[int, dict[str, float]] = {}  # seed -> metrics of the budget-independent baselines
        for i, b in enumerate(plan.budgets[budget]):
            x = b.count if b.count is not None else b.value  # the label-budget column: 10 plots, 0.25 of the years
            for seed in seeds:
                kw = {**plan.finetune_kw[budget], **b.options(), "seed": seed, "progress": False}
                tag = f"n{b.value:g}_s{seed}"
                wanted = [x for x in plan.baselines if i == 0 or x not in plan.budget_independent]
                if wanted:
                    kw["baselines"] = wanted
                with status.part(f"fine-tuning at {b.value:g} label(s), seed {seed}"
                                 + (f" with {', '.join(wanted)}" if wanted else "")):
                    m = dom.finetune(ckpt=pre, data=data["data"], out=runs / f"pretrained_{tag}", **kw)
                if i == 0:
                    keys = [f"{metric}_{x}" for x in plan.budget_independent]
                    once[seed] = {k: m[k] for k in keys if k in m}
                m = {**once.get(seed, {}), **m}
                methods = {"pretrained": metric, **{plan.method_names.get(x, x): f"{metric}_{x}"
                                                    for x in (*plan.baselines, *plan.extra_methods)}}
                rows += _rows(domain, task, x, seed, m, metric, methods)
                if plan.scratch_separately:
                    with status.part(f"from scratch at {b.value:g} label(s), seed {seed}"):
                        ms = dom.finetune(ckpt=None, data=data["data"], out=runs / f"scratch_{tag}", config="tiny",
                                          **{k: v for k, v in kw.items() if k != "baselines"})
                    rows += _rows(domain, task, x, seed, ms, metric, {"scratch": metric})
        return rows


def summarise(rows: Sequence[dict[str, Any]], budget: str = "") -> str:
    """Markdown: per domain, mean ± std (n) per label budget and method; and whether the
    pretrained model beats scratch by more than their combined spread."""
    from hfmi_kit.domains import get_domain

    lines = ["# Label-efficiency scorecard", ""]
    if budget == "small":
        lines += ["Budget `small`: tiny models trained for a few steps. It checks the whole comparison "
                  "(same splits, seeds, baselines) in minutes; its numbers are not the foundation-model claim "
                  "(run `--budget full` on a cluster for that).", ""]
    for domain in sorted({r["domain"] for r in rows}):
        dom = get_domain(domain)
        dr = [r for r in rows if r["domain"] == domain]
        methods = list(dict.fromkeys(r["method"] for r in dr))
        budgets = sorted({r["label_budget"] for r in dr})
        better = "higher" if dom.higher_is_better else "lower"
        lines += [f"## {domain}: {dr[0]['task']} ({dr[0]['metric']}, {better} is better; label budget = "
                  f"{dom.label_key})", "", "| label budget | " + " | ".join(methods) + " | pretrained vs scratch |",
                  "| --- |" + " --- |" * (len(methods) + 1)]
        for b in budgets:
            stats = {}
            for meth in methods:
                v = np.array([r["value"] for r in dr if r["label_budget"] == b and r["method"] == meth])
                stats[meth] = (v.mean(), v.std(ddof=1) if len(v) > 1 else 0.0, len(v)) if len(v) else None
            cells = [f"{s[0]:.4g} ± {s[1]:.2g} ({s[2]})" if s else "" for s in stats.values()]
            verdict = ""
            if stats.get("pretrained") and stats.get("scratch"):
                (mp, sp, _), (ms, ss, _) = stats["pretrained"], stats["scratch"]
                gain = (mp - ms) if dom.higher_is_better else (ms - mp)
                verdict = ("better" if gain > sp + ss else "worse" if -gain > sp + ss else "within spread") + \
                    f" ({gain:+.3g})"
            lines.append(f"| {b:g} | " + " | ".join(cells) + f" | {verdict} |")
        plan = dom.scorecard_plan()
        lines += ["", plan.note, ""] if plan is not None and plan.note else [""]
    lines.append("Mean ± sample standard deviation over seeds (n). 'better' / 'worse': the difference of "
                 "the means exceeds the sum of the two standard deviations.")
    return "\n".join(lines) + "\n"


def curves_html(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The label-efficiency curves (mean over seeds) per domain as one standalone HTML file."""
    import holoviews as hv
    from bokeh.resources import INLINE

    from hfmi_kit.domains import get_domain
    from hfmi_kit.viz.core import label_efficiency

    plots = []
    for domain in sorted({r["domain"] for r in rows}):
        dr = [r for r in rows if r["domain"] == domain]
        mean_rows = []
        for b in sorted({r["label_budget"] for r in dr}):
            for meth in dict.fromkeys(r["method"] for r in dr):
                v = [r["value"] for r in dr if r["label_budget"] == b and r["method"] == meth]
                if v:
                    mean_rows.append({"labels": b, "method": meth, "value": float(np.mean(v))})
        dom = get_domain(domain)
        plots.append(label_efficiency(mean_rows, "value", xlabel=dom.label_title or dom.label_key,
                                      ylabel=dom.metric_title or dr[0]["metric"],
                                      title=f"{domain}: {dr[0]['metric']} (mean over seeds)"))
    hv.save(hv.Layout(plots).cols(2), str(path), resources=INLINE)
    return path


def run_scorecard(out: str | Path, *, domains: Sequence[str] | None = None, budget: str = "small",
                  seeds: Sequence[int] = (0, 1, 2)) -> list[dict[str, Any]]:
    """Score ``domains`` (default: every domain with a scorecard plan) into ``out``; return the
    rows of ``scorecard.csv``."""
    from hfmi_kit.config import atomic_write_text
    from hfmi_kit.viz import require_holoviews

    if budget not in BUDGETS:
        raise ConfigError(f"--budget must be one of {list(BUDGETS)}, got {budget!r}")
    covered = scored_domains()
    domains = list(covered if domains is None else domains)
    unknown = [d for d in domains if d not in covered]
    if unknown:
        raise ConfigError(f"unknown domains {unknown}; the scorecard covers {covered}")
    if len(set(seeds)) < 3:
        raise ConfigError(f"a scorecard needs at least 3 seeds, got {list(seeds)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for d in domains:
        t0 = time.time()
        rows += run_domain(d, out, budget=budget, seeds=seeds)
        LOGGER.info("scorecard %s done in %.0f s", d, time.time() - t0)
    tmp = out / ".scorecard.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "scorecard.csv")
    atomic_write_text(out / "scorecard.md", summarise(rows, budget))
    require_holoviews()
    curves_html(rows, out / "label_efficiency.html")
    return rows
