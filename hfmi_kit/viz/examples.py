"""A small results directory made by short real runs of every domain: what
``hfmi dashboard --example`` shows, what the dashboard tests and the render benchmark open.

Each domain generates (or copies its bundled) data under ``root/data``, pretrains briefly,
fine-tunes from the checkpoint and from scratch, and writes the files its notebooks write.
The models are tiny and barely trained: the point is real files in the real formats.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hfmi_kit.errors import ConfigError

LOGGER = logging.getLogger(__name__)
DOMAINS = ("climate", "radiology", "carbon", "materials")


def _climate(root: Path, seed: int) -> list[Path]:
    from hfmi_kit.domains.climate import GeneratorConfig, finetune, generate, pretrain, whatif, write_dataset

    data = write_dataset(generate(GeneratorConfig(years=10, spinup_years=8, seed=seed)),
                         root / "data" / "climate.zarr")
    out = root / "climate"
    pre = pretrain(data=data, out=out / "pretrain", steps=20, seed=seed, progress=False)
    runs = [out / "pretrain"]
    for frac in (0.5, 1.0):
        for name, ckpt in (("pretrained", pre), ("scratch", None)):
            d = out / f"{name}_{frac:g}"
            finetune(ckpt=ckpt, data=data, out=d, label_fraction=frac, steps=20, rollout_train=2, seed=seed,
                     config=None if ckpt else "tiny", progress=False)
            runs.append(d)
    whatif(ckpt=out / "pretrained_1" / "model", data=data, out=out / "whatif", months=6, members=2, average_from=2,
           seed=seed)
    return [*runs, out / "whatif"]


def _radiology(root: Path, seed: int) -> list[Path]:
    from hfmi_kit.domains.radiology import StudyConfig, finetune, generate_study, pretrain

    study = generate_study(root / "data" / "radiology_study",
                           StudyConfig(unlabelled=2, labelled=5, spacing_scale=1.6, seed=seed + 3))
    out = root / "radiology"
    pre = pretrain(data=study, out=out / "pretrain", steps=6, batch_size=2, seed=seed, progress=False)
    finetune(ckpt=pre, data=study, out=out / "finetune_n2", labels=2, steps=6, batch_size=2, baselines=["scratch"],
             seed=seed, progress=False)
    return [out / "pretrain", out / "finetune_n2"]


def _carbon(root: Path, seed: int) -> list[Path]:
    from hfmi_kit.domains.carbon import LandscapeConfig, finetune, generate_region, pretrain

    region = generate_region(root / "data" / "carbon_region", LandscapeConfig(size=64, plots=60, seed=seed + 2))
    out = root / "carbon"
    pre = pretrain(data=region, out=out / "pretrain", steps=20, batch_size=8, seed=seed, progress=False)
    finetune(ckpt=pre, data=region, out=out / "finetune_n20", labels=20, steps=40, calibration_folds=2,
             baselines=["rf"], seed=seed, progress=False)
    return [out / "pretrain", out / "finetune_n20"]


def _materials(root: Path, seed: int) -> list[Path]:
    import pandas as pd

    from hfmi_kit.domains.materials import finetune, load_property_csv, pretrain
    from hfmi_kit.domains.materials.discover import (
        active_learning,
        discovery_features,
        generate_candidates,
        rank_candidates,
    )
    from hfmi_kit.domains.materials.tables import bundled_path

    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    pd.read_csv(bundled_path("mp_gap")).sample(3000, random_state=seed).to_csv(d / "dft.csv", index=False)
    pd.read_csv(bundled_path("expt_gap")).sample(400, random_state=seed).to_csv(d / "expt.csv", index=False)
    out = root / "materials"
    pre = pretrain(data=d / "dft.csv", out=out / "pretrain", steps=40, supervised_steps=60, exclude=d / "expt.csv",
                   seed=seed, progress=False)
    finetune(ckpt=pre, data=d / "expt.csv", out=out / "finetune_n100", labels=100, folds=2, members=1, steps=40,
             baselines=["rf", "dummy"], seed=seed, progress=False)
    vis = out / "discovery"
    vis.mkdir(parents=True, exist_ok=True)
    table = load_property_csv(d / "expt.csv")
    ranked = rank_candidates(out / "finetune_n100" / "model", generate_candidates(), measured=table, seed=seed)
    tmp = vis / ".candidates.csv.tmp"
    ranked.to_csv(tmp, index=False)
    tmp.replace(vis / "candidates.csv")
    al = active_learning(discovery_features(pre, table), table.y, budget=40, repeats=1, trees=20, seed=seed)
    al.save(vis / "active_learning.json")
    return [out / "pretrain", out / "finetune_n100", vis]


_MAKERS = {"climate": _climate, "radiology": _radiology, "carbon": _carbon, "materials": _materials}


def make_example_results(root: str | Path, domains: Sequence[str] = DOMAINS, *, seed: int = 0) -> dict[str, list[Path]]:
    """Run the short example jobs of ``domains`` into ``root``; return the run directories."""
    unknown = [d for d in domains if d not in _MAKERS]
    if unknown:
        raise ConfigError(f"unknown domains {unknown}; available: {list(_MAKERS)}")
    root = Path(root)
    out = {}
    for dom in domains:
        LOGGER.info("example results: %s", dom)
        out[dom] = _MAKERS[dom](root, seed)
    return out
