"""Scale-out on this machine's CPUs: pretraining throughput of one process against 2-process DDP
and FSDP (torchrun, gloo) at the same global batch, the scaling efficiency, and the pre-flight
planner's predicted against measured peak memory (see ``plan_memory.py``).

    .venv/bin/python benchmarks/scaling.py --steps 40 --config tiny

Each run is ``hfmi pretrain climate`` on the same generated data; throughput is the global
samples per second the training loop logs (the first logged interval, with start-up, is
dropped). One process gets one OpenMP thread per core it would have under torchrun, so
``efficiency = throughput(N) / (N x throughput(1 process, 1 thread))``; the 1-process run with
all cores' threads is printed too, since that is what a laptop user runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(data: Path, out: Path, *, nproc: int, threads: int, strategy: str, steps: int, batch: int,
        config: str) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "hfmi_kit.cli", "pretrain", "climate", "--data", str(data), "--out", str(out),
           "--steps", str(steps), "--batch-size", str(batch // nproc), "--config", config, "--nproc", str(nproc)]
    if nproc > 1:
        cmd += ["--strategy", strategy]
    t = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [x["samples_per_s"] for x in rows if x.get("split") == "train"][1:]
    # samples_per_s is per process (rank 0's micro-batches); the global rate is N times it
    return {"samples_per_s": nproc * sum(rates) / max(len(rates), 1), "wall_s": time.time() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16, help="global batch (split over the processes)")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--years", type=int, default=8)
    a = ap.parse_args()
    from hfmi_kit.domains.climate import GeneratorConfig, generate, write_dataset

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_dataset(generate(GeneratorConfig(years=a.years, spinup_years=2, seed=0)), root / "c.zarr")
        res = {}
        res["1 proc x 1 thread"] = run(data, root / "p1", nproc=1, threads=1, strategy="ddp", steps=a.steps,
                                       batch=a.batch, config=a.config)
        res[f"1 proc x {cores} threads"] = run(data, root / "p1t", nproc=1, threads=cores, strategy="ddp",
                                              steps=a.steps, batch=a.batch, config=a.config)
        for strat in ("ddp", "fsdp"):
            res[f"2 procs {strat}"] = run(data, root / f"p2{strat}", nproc=2, threads=1, strategy=strat,
                                          steps=a.steps, batch=a.batch, config=a.config)
    base = res["1 proc x 1 thread"]["samples_per_s"]
    print(f"climate pretraining, config {a.config}, global batch {a.batch}, {a.steps} steps, {cores} cores")
    print(f"{'run':22s} {'samples/s':>10s} {'efficiency':>11s} {'wall s':>8s}")
    for k, v in res.items():
        n = 2 if k.startswith("2 procs") else 1
        eff = v["samples_per_s"] / (n * base) if n > 1 else float("nan")
        print(f"{k:22s} {v['samples_per_s']:10.1f} {eff:11.2f} {v['wall_s']:8.1f}")
    sys.path.insert(0, str(Path(__file__).parent))
    from plan_memory import measure, parse_run

    print("\nhfmi plan: predicted vs measured peak memory per process (fp32 MAE training on this CPU)")
    for spec in ("tiny:8", "tiny:32", "base:4", "base:8", "base:2:foreach", "base:16:ac", "base:4:ddp2",
                 "base:4:fsdp2"):
        kw = parse_run(spec)
        r = measure(kw.pop("size"), **kw)
        print(f"  {spec:16s}: predicted {r['predicted'] / 2**20:7.1f} MiB, measured "
              f"{r['measured'] / 2**20:7.1f} MiB, ratio {r['ratio']:.2f}")

if __name__ == "__main__":
    main()
