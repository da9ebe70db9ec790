"""Inference time per sample: the fine-tuned foundation model against the domain's classical
baseline, on the same input (part of issue 9's benchmark entry point).

Each domain's model is pretrained and fine-tuned with the small scorecard's settings (or the
pretrained checkpoints of ``trust.py`` are reused), then timed on held-out data after one warm-up:

  climate    one forecast step of one initial state (batch of 32)  vs damped anomaly persistence
  radiology  one whole volume, sliding windows (model grid 3 mm)     vs the nnU-Net-style DynUNet
  carbon     one pixel of the biomass map (whole region, 90 % band)  vs the random forest on pixels
  materials  one composition (encoding + ensemble)                  vs RF on Magpie features (+ featurising)

The U-Net is timed with its initial weights (time does not depend on their values); the other
baselines are fitted on the training labels as in fine-tuning.

    python benchmarks/inference.py [--domains climate,radiology,carbon,materials]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def per_call(fn: Callable[[], object], repeats: int = 3) -> float:
    """Seconds of the fastest of ``repeats`` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def report(domain: str, sample: str, model_s: float, base_s: float, baseline: str) -> None:
    def fmt(s: float) -> str:
        return f"{s * 1e3:9.3f} ms" if s >= 1e-3 else f"{s * 1e6:9.2f} us"

    print(f"  {domain:9s} per {sample:12s} model {fmt(model_s)} | {baseline:24s} {fmt(base_s)} "
          f"| model / baseline {model_s / base_s:9.1f}")


def finetuned(domain: str, root: Path, data: dict[str, Any]) -> Path:
    """The small-scorecard fine-tuned checkpoint of ``domain`` (pretraining first when ``root``
    holds no pretrained one from trust.py)."""
    from hfmi_kit.domains import get_domain
    from hfmi_kit.scorecard import plan_of

    plan, dom = plan_of(domain), get_domain(domain)
    pre = root / f"{domain}_a" / "model"
    if not pre.exists():
        kw = {**plan.pretrain_kw["small"]}
        if "exclude" in data:
            kw["exclude"] = data["exclude"]
        pre = dom.pretrain(data=data.get("pretrain_data", data["data"]), out=root / f"{domain}_a", seed=0,
                           progress=False, **kw)
    out = root / f"{domain}_ft"
    kw = {**plan.finetune_kw["small"], plan.label_arg: plan.budgets["small"][-1], "seed": 0, "progress": False}
    dom.finetune(ckpt=pre, data=data["data"], out=out, **kw)
    if not (out / "model").exists():
        raise RuntimeError(f"{domain}: fine-tuning wrote no model under {out}")
    return out / "model"


@torch.no_grad()
def climate(ckpt: Path, data: dict[str, Any], repeats: int) -> None:
    from hfmi_kit.domains.climate import data as cdata
    from hfmi_kit.domains.climate.tasks import load_with_geometry, predictor
    from hfmi_kit.train import load_pretrained
    from hfmi_kit.train.infer import collate

    cfg, d = load_with_geometry(ckpt, data["data"])
    pred = predictor(load_pretrained(ckpt), cfg)
    model, tens = pred.model, pred.pre(d)
    test_years = cfg["geometry"]["split"]["test_years"]
    train_years = cfg["geometry"]["split"]["train_years"]
    win = cdata.ForecastWindows(tens, np.flatnonzero(np.isin(d.years, test_years)),
                                context=int(cfg["model_kwargs"]["context"]))
    items = [win[j] for j in range(min(32, len(win)))]
    b = collate(items)
    n = len(items)
    clim = model.climatology.cpu()
    damping = cdata.anomaly_damping(tens, np.flatnonzero(np.isin(d.years, train_years)), clim)
    prev = (b["phase"] - 1) % model.phases

    def dp() -> torch.Tensor:  # climatology + damped initial anomaly
        return clim[b["phase"]] + damping * (b["inputs"][:, -1] - clim[prev])

    t_model = per_call(lambda: model.rollout(b["inputs"], b["forcing"], b["scalars"], b["mask"], b["phase"],
                                             steps=1), repeats)
    grid = "x".join(str(s) for s in b["inputs"].shape[-2:])
    report("climate", f"state {grid}", t_model / n, per_call(dp, repeats) / n, "damped persistence")


@torch.no_grad()
def radiology(ckpt: Path, data: dict[str, Any], repeats: int) -> None:
    from hfmi_kit.domains.radiology import data as rdata
    from hfmi_kit.domains.radiology.tasks import predict_case
    from hfmi_kit.models import create_model
    from hfmi_kit.train import load_pretrained, read_config

    cfg = read_config(ckpt)
    model = load_pretrained(ckpt).eval()
    kw = dict(cfg["model_kwargs"])
    kw["modalities"] = list(kw["input_modalities"])
    unet = create_model(f"radiology_unet.{cfg['model_type'].split('.')[-1]}", **kw).eval()
    trained = set(cfg.get("training", {}).get("cases", []))
    subjects = [s for s in rdata.discover(data["data"]) if s.label and s.id not in trained]
    geom = cfg["geometry"]
    case = rdata.prepare(subjects[0], geom["modalities"], float(geom["spacing_mm"]), with_label=False)
    shape = "x".join(str(s) for s in case.image.shape[1:])
    report("radiology", f"volume {shape}", per_call(lambda: predict_case(model, case), repeats),
           per_call(lambda: predict_case(unet, case), repeats), "U-Net (DynUNet)")


def carbon(ckpt: Path, data: dict[str, Any], repeats: int) -> None:
    from hfmi_kit.domains.carbon.tasks import feature_blocks, predict_map, prepare, random_forest, split_plots
    from hfmi_kit.train import load_pretrained

    model = load_pretrained(ckpt).eval()
    prep = prepare(data["data"], tile=model.tile, groups=model.groups)
    pool, _ = split_plots(prep)
    rf = random_forest(prep, set(pool), 0)
    n = prep.shape[0] * prep.shape[1]
    t_model = per_call(lambda: predict_map(model, prep.fields[0], prep.shape), repeats)
    x = feature_blocks(prep)(0, 0, 0, *prep.shape)
    t_rf = per_call(lambda: rf.predict(x.reshape(x.shape[0], -1).T), repeats)
    report("carbon", "pixel", t_model / n, t_rf / n, f"random forest ({rf.n_estimators})")


def materials(ckpt: Path, data: dict[str, Any], repeats: int) -> None:
    from hfmi_kit.domains.materials import chem
    from hfmi_kit.domains.materials.tables import load_property_csv
    from hfmi_kit.domains.materials.tasks import load_ensemble, predict_arrays, random_forest

    model, _ = load_ensemble(ckpt)
    table = load_property_csv(data["data"], duplicates="mean")
    rf = random_forest(chem.magpie_features(table.parsed), table.y, seed=0)
    parsed = table.parsed  # timing only: every composition of the table
    t_model = per_call(lambda: predict_arrays(model, chem.encode(parsed)), repeats)
    t_rf = per_call(lambda: rf.predict(chem.magpie_features(parsed)), repeats)
    report("materials", "composition", t_model / len(parsed), t_rf / len(parsed),
           f"RF-Magpie ({rf.n_estimators})")


def run(domains: Sequence[str], root: Path, repeats: int = 3) -> None:
    """Fine-tune (small scorecard settings) and print the inference figures of ``domains``."""
    from hfmi_kit.scorecard import plan_of

    print(f"inference time per sample, fine-tuned model against the classical baseline "
          f"({torch.get_num_threads()} threads, best of {repeats}):")
    fns = {"climate": climate, "radiology": radiology, "carbon": carbon, "materials": materials}
    for d in domains:
        data = plan_of(d).data(root / "data", "small")
        fns[d](finetuned(d, root, data), data, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", default="climate,radiology,carbon,materials")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        run(a.domains.split(","), Path(tmp), a.repeats)


if __name__ == "__main__":
    main()
