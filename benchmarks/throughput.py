"""Throughput and model FLOP utilisation (MFU) of the backbone and the full pretraining loop.

Prints, in one run:
1. the machine's measured matmul peak (fp32 and bf16, square GEMMs);
2. the bare encoder: forward + backward + AdamW step on random tokens;
3. the full climate pretraining loop through the engine (data loading, masking, MAE +
   next-step losses, optimiser, logging) on generated CF data;
for ``tiny`` and the mid-size ``small`` config, as samples/s and MFU against the measured fp32
peak. FLOPs are counted per step with ``torch.utils.flop_counter.FlopCounterMode`` (the actual
matmuls of forward and backward), so the loop's extra work (two encoder passes, decoder) is
counted as work, not as overhead. The bf16 autocast speed-up is reported for both.

    python benchmarks/throughput.py [--configs tiny,small] [--steps 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from hfmi_kit.models import get_size
from hfmi_kit.models.encoder import Encoder


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def bench_encoder(cfg_name: str, tokens: int, batch: int, steps: int, precision: str) -> tuple[float, float]:
    """samples/s and FLOP/s of fwd + bwd + AdamW on random tokens."""
    torch.manual_seed(0)
    enc = Encoder(get_size(cfg_name))
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-4)
    x = torch.randn(batch, tokens, enc.dim)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with ctx:
            loss = enc(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = count_flops(step)
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t) / steps
    return batch / dt, flops / dt


def bench_loop(cfg_name: str, data: Path, batch: int, steps: int, precision: str) -> tuple[float, float, int]:
    """samples/s and FLOP/s of the climate pretraining loop through the engine; tokens per sample."""
    from hfmi_kit.domains.climate import data as cdata
    from hfmi_kit.models import create_model
    from hfmi_kit.train import TrainConfig, Trainer

    d = cdata.load_climate(data)
    split = cdata.split_years(d)
    tens = cdata.to_tensors(d, cdata.Normaliser(cdata.compute_stats(data, d, time_index=split.train)))
    ds = cdata.ForecastWindows(tens, split.train, context=2)
    mk = {"variables": d.state_vars, "field_forcings": list(d.forcing), "scalar_forcings": list(d.scalars),
          "grid": [d.lat.size, d.lon.size], "patch": [4, 4], "context": 2, "lat": list(d.lat),
          "residual_scale": cdata.residual_scale(tens, split.train)}
    torch.manual_seed(0)
    model = create_model(f"climate_pretrainer.{cfg_name}", **mk)
    sample = torch.utils.data.default_collate([ds[i] for i in range(batch)])
    ntok = model.tokenize(sample["inputs"], sample["forcing"][:, 0], sample["scalars"][:, 0]).tokens.shape[1]

    def one() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(sample)
        out["loss"].backward()

    flops = count_flops(one) + 0.0  # forward + backward matmuls of one step
    model.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(steps=steps + 2, batch_size=batch, progress=False, log_every=1, precision=precision,
                          warmup_steps=1)
        tr = Trainer(model, ds, config=cfg, out_dir=tmp)
        tr.fit(until=2)  # warm-up steps
        t = time.perf_counter()
        tr.fit(resume=True)
        dt = (time.perf_counter() - t) / steps
    return batch / dt, flops / dt, ntok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"measured matmul peak: fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s")
    from hfmi_kit.domains.climate import GeneratorConfig, generate, write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(generate(GeneratorConfig(years=6, spinup_years=4)), Path(tmp) / "c.zarr")
        for name in a.configs.split(","):
            cfg = get_size(name)
            print(f"\n== {name}: dim {cfg.dim}, depth {cfg.depth}, {cfg.num_params() / 1e6:.1f} M encoder params")
            res = {}
            for prec in ("fp32", "bf16"):
                lsps, lfl, ntok = bench_loop(name, data, a.batch, a.steps, prec)
                esps, efl = bench_encoder(name, ntok, a.batch, a.steps, prec)
                res[prec] = (esps, efl, lsps, lfl)
                print(f"[{prec}] bare encoder ({ntok} tokens): {esps:7.1f} samples/s, {efl / 1e9:6.1f} GFLOP/s, "
                      f"MFU {efl / peak32:5.1%} of fp32 peak")
                print(f"[{prec}] full pretraining loop:      {lsps:7.1f} samples/s, {lfl / 1e9:6.1f} GFLOP/s, "
                      f"MFU {lfl / peak32:5.1%} of fp32 peak; loop/encoder FLOP rate {lfl / efl:5.1%}")
            print(f"bf16 autocast speed-up: encoder {res['bf16'][0] / res['fp32'][0]:.2f}x, "
                  f"loop {res['bf16'][2] / res['fp32'][2]:.2f}x")


if __name__ == "__main__":
    main()
