"""Climate skill, label efficiency and what-if figures on generator data (prints a report).

Pretrains once, then fine-tunes the forecaster from the pretrained backbone and from scratch on
5 %, 25 % and 100 % of the training years (same split, same seed), evaluates on held-out years
against persistence and climatology, and runs the CO2 what-if against the generator's truth.

    python benchmarks/climate_skill.py --years 40 --pretrain-steps 1500 --finetune-steps 800
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hfmi_kit.domains.climate import GeneratorConfig, finetune, generate, pretrain, whatif, write_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/climate_skill")
    ap.add_argument("--years", type=int, default=40)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--finetune-steps", type=int, default=800)
    ap.add_argument("--fractions", default="0.05,0.25,1.0")
    ap.add_argument("--leads", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rollout-train", type=int, default=6, help="lead times in the fine-tuning loss")
    ap.add_argument("--base-ppm", type=float, default=420.0, help="what-if baseline CO2 (doubled)")
    ap.add_argument("--no-scratch", action="store_true", help="fine-tune the pretrained model only")
    a = ap.parse_args()
    out = Path(a.out)
    t = time.time()
    data = write_dataset(generate(GeneratorConfig(years=a.years, seed=a.seed)), out / "climate.zarr")
    print(f"data: {data} ({time.time() - t:.0f} s)", flush=True)
    t = time.time()
    ck = pretrain(data=data, out=out / "pretrain", config=a.config, steps=a.pretrain_steps, seed=a.seed,
                  progress=False)
    print(f"pretrain: {a.pretrain_steps} steps in {time.time() - t:.0f} s", flush=True)
    modes = json.loads((Path(ck) / "config.json").read_text())["model_kwargs"].get("lim_modes", 0)
    print(f"skip path: {f'linear inverse model, {modes} EOF modes' if modes else 'per-cell regression'}", flush=True)
    rows = []
    for frac in [float(x) for x in a.fractions.split(",")]:
        for name, src in (("pretrained", ck), ("scratch", None))[: 1 if a.no_scratch else 2]:
            t = time.time()
            m = finetune(ckpt=src, data=data, out=out / f"ft_{name}_{frac}", steps=a.finetune_steps,
                         label_fraction=frac, seed=a.seed, leads=a.leads, config=a.config, progress=False,
                         rollout_train=a.rollout_train)
            rows.append((frac, name, m))
            print(f"finetune {name:10s} frac={frac:<5} {time.time() - t:4.0f} s  rmse={m['rmse']:.3f} "
                  f"pers={m['rmse_persistence']:.3f} clim={m['rmse_climatology']:.3f} acc={m['acc']:.3f}",
                  flush=True)
    print("\nlead-by-lead tas RMSE [K] (pretrained, 100 %) vs persistence / climatology:")
    full = next(m for f, n, m in rows if n == "pretrained" and f == 1.0)
    for k in range(1, a.leads + 1):
        print(f"  lead {k}: model {full[f'rmse_tas_lead{k}']:.3f}  persistence "
              f"{full[f'rmse_persistence_tas_lead{k}']:.3f}  climatology {full[f'rmse_climatology_tas_lead{k}']:.3f}"
              f"  damped-pers {full[f'rmse_damped_persistence_tas_lead{k}']:.3f}"
              f"  skip path alone {full.get(f'rmse_skip_tas_lead{k}', float('nan')):.3f}"
              f"  acc {full[f'acc_tas_lead{k}']:.3f}")
    t = time.time()
    w = whatif(ckpt=out / "ft_pretrained_1.0" / "model", data=data, out=out / "whatif", co2_factor=2.0,
               base_ppm=a.base_ppm)
    print(f"\nwhat-if CO2 x2 ({time.time() - t:.0f} s): " + json.dumps({k: round(v, 3) for k, v in w.items()}))
    summary = {f"{n}_{f}": {k: v for k, v in m.items() if "lead" not in k} for f, n, m in rows}
    summary["whatif"] = w
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nsummary: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
