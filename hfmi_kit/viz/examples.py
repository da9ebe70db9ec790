"""A small results directory made by short real runs of every domain: what
``hfmi dashboard --example`` shows, what the dashboard tests and the render benchmark open.

The runs are those of the small scorecard (:mod:`hfmi_kit.scorecard`, one seed): per domain a
pretraining and, at two label budgets, a fine-tuning from it and from scratch with the
baselines, all under ``root/runs/<domain>``, the data under ``root/data``. :func:`add_extras`
adds what each domain's ``03_visualize`` notebook writes (:meth:`Domain.example_extras`: the
climate what-if experiment, the materials candidates with the active-learning simulation). The
models are tiny and barely trained: the point is real files in the real formats.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hfmi_kit.errors import ConfigError

LOGGER = logging.getLogger(__name__)


def add_extras(root: str | Path, seed: int = 0, domains: Sequence[str] | None = None) -> list[Path]:
    """Next to the scorecard's runs in ``root``: each domain's :meth:`Domain.example_extras`
    (for the domains whose runs are there)."""
    from hfmi_kit.domains import get_domain
    from hfmi_kit.scorecard import scored_domains

    root = Path(root)
    made: list[Path] = []
    for name in domains if domains is not None else scored_domains():
        if (root / "runs" / name).is_dir():
            made += get_domain(name).example_extras(root, seed)
    return made


def make_example_results(root: str | Path, domains: Sequence[str] | None = None, *,
                         seed: int = 0) -> dict[str, list[Path]]:
    """Run the small scorecard's jobs of ``domains`` (default: every domain with a scorecard
    plan; one seed) into ``root``, plus the extras; return the run directories per domain."""
    from hfmi_kit.scorecard import run_domain, scored_domains

    covered = scored_domains()
    domains = list(covered if domains is None else domains)
    unknown = [d for d in domains if d not in covered]
    if unknown:
        raise ConfigError(f"unknown domains {unknown}; available: {covered}")
    root = Path(root)
    for dom in domains:
        LOGGER.info("example results: %s", dom)
        run_domain(dom, root, budget="small", seeds=(seed,))
    add_extras(root, seed, domains)
    return {d: sorted(p for p in (root / "runs" / d).iterdir() if p.is_dir()) for d in domains}
