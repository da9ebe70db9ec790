"""A small results directory made by short real runs of every domain: what
``hfmi dashboard --example`` shows, what the dashboard tests and the render benchmark open.

The runs are those of the small scorecard (:mod:`hfmi_kit.scorecard`, one seed): per domain a
pretraining and, at two label budgets, a fine-tuning from it and from scratch with the
baselines, all under ``root/runs/<domain>``, the data under ``root/data``. :func:`add_extras`
adds what the ``03_visualize`` notebooks write: a climate what-if experiment and the materials
candidates with the active-learning simulation. The models are tiny and barely trained: the
point is real files in the real formats.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hfmi_kit.errors import ConfigError

LOGGER = logging.getLogger(__name__)
DOMAINS = ("climate", "radiology", "carbon", "materials")


def add_extras(root: str | Path, seed: int = 0) -> list[Path]:
    """Next to the scorecard's runs in ``root``: ``runs/climate/whatif`` and
    ``runs/materials/discovery`` (for the domains whose runs are there)."""
    root = Path(root)
    made = []
    clim = root / "runs" / "climate" / f"pretrained_n1_s{seed}" / "model"
    if clim.is_dir():
        from hfmi_kit.domains.climate import whatif

        whatif(ckpt=clim, data=root / "data" / "climate.zarr", out=root / "runs" / "climate" / "whatif", months=6,
               members=2, average_from=2, seed=seed)
        made.append(root / "runs" / "climate" / "whatif")
    mat = sorted((root / "runs" / "materials").glob(f"pretrained_n*_s{seed}"))
    if mat:
        from hfmi_kit.domains.materials import load_property_csv
        from hfmi_kit.domains.materials.discover import (
            active_learning,
            discovery_features,
            generate_candidates,
            rank_candidates,
        )

        vis = root / "runs" / "materials" / "discovery"
        vis.mkdir(parents=True, exist_ok=True)
        table = load_property_csv(root / "data" / "expt.csv")
        ranked = rank_candidates(mat[-1] / "model", generate_candidates(), measured=table, seed=seed)
        tmp = vis / ".candidates.csv.tmp"
        ranked.to_csv(tmp, index=False)
        tmp.replace(vis / "candidates.csv")
        al = active_learning(discovery_features(root / "runs" / "materials" / "pretrain" / "model", table), table.y,
                             budget=40, repeats=1, trees=20, seed=seed)
        al.save(vis / "active_learning.json")
        made.append(vis)
    return made


def make_example_results(root: str | Path, domains: Sequence[str] = DOMAINS, *, seed: int = 0) -> dict[str, list[Path]]:
    """Run the small scorecard's jobs of ``domains`` (one seed) into ``root``, plus the extras;
    return the run directories per domain."""
    from hfmi_kit.scorecard import PLANS, run_domain

    unknown = [d for d in domains if d not in PLANS]
    if unknown:
        raise ConfigError(f"unknown domains {unknown}; available: {list(PLANS)}")
    root = Path(root)
    for dom in domains:
        LOGGER.info("example results: %s", dom)
        run_domain(dom, root, budget="small", seeds=(seed,))
    add_extras(root, seed)
    return {d: sorted(p for p in (root / "runs" / d).iterdir() if p.is_dir()) for d in domains}
