"""The pre-flight planner's memory estimate against the measured peak memory of real training.

    .venv/bin/python benchmarks/plan_memory.py                 # tiny and base, two batch sizes each
    .venv/bin/python benchmarks/plan_memory.py --runs base:16

Each measurement is a fresh process that trains an MAE (the core tokenizer, encoder and decoder)
with the real training loop for a few steps in fp32 and reports its peak resident memory above
the resident memory before the model was built (``VmHWM``; with ``--device cuda``,
``torch.cuda.max_memory_allocated`` above the allocation before the model, with flash attention
assumed and no overhead). The planner gets the same size, tokens, batch and
parameter count, ``attention="math"`` (the CPU's attention keeps the T x T softmax) and a fixed
CPU runtime overhead of 0.07 GB (read off the smallest run, as a CUDA context would be on a GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

CPU_RUNTIME_GB = 0.07  # what the first training step allocates beyond the model on this CPU (oneDNN/MKL
#                        caches, thread buffers): the smallest run's excess, like a CUDA context on a GPU
WORKER = r"""
import json, resource, sys
import torch
from torch import nn
from torch.utils.data import Dataset
from hfmi_kit.models import Backbone, GridTokenizer, get_size
from hfmi_kit.models.mae import MaskedAutoencoder
from hfmi_kit.models.tokenizers import patchify
from hfmi_kit.train import TrainConfig, Trainer

size, side, patch, groups, batch, steps, mask = sys.argv[1], *map(int, sys.argv[2:7]), float(sys.argv[7])
device = sys.argv[8]
names = [f"v{i}" for i in range(groups)]

class Fields(Dataset):
    def __len__(self): return 10_000
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {n: torch.randn(side, side, generator=g) for n in names}

class MAE(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = get_size(size)
        tok = GridTokenizer(groups=names, grid=(side, side), patch=(patch, patch), dim=cfg.dim)
        self.mae = MaskedAutoencoder(Backbone(tok, cfg), num_groups=groups, num_positions=tok.num_patches,
                                     patch_numel=patch * patch, mask_ratio=mask)
    def forward(self, batch):
        tb = self.mae.backbone.tokenizer(batch)
        tgt = torch.cat([patchify(batch[n], (patch, patch)) for n in names], dim=1)
        loss, _, _ = self.mae(tb, tgt)
        return {"loss": loss}

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

ds = Fields()
_ = ds[0]
cuda = device.startswith("cuda")
if cuda:
    torch.zeros(1, device=device)  # the CUDA context is not the model's
    torch.cuda.reset_peak_memory_stats()
before = torch.cuda.memory_allocated() if cuda else rss()
model = MAE()
n = sum(p.numel() for p in model.parameters())
tokens = groups * (side // patch) ** 2
cfg = TrainConfig(steps=steps, batch_size=batch, progress=False, log_every=10_000, precision="fp32", warmup_steps=1,
                  device=device)
Trainer(model, ds, config=cfg).fit()
def hwm():  # this process image's peak RSS (ru_maxrss would carry a big parent's over through fork + exec)
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))

peak = torch.cuda.max_memory_allocated() if cuda else hwm()
print(json.dumps({"params": n, "tokens": tokens, "measured": peak - before}))
"""


def measure(size: str, *, side: int = 64, patch: int = 4, groups: int = 2, batch: int = 8, steps: int = 3,
            mask_ratio: float = 0.75, device: str = "cpu") -> dict[str, Any]:
    """Measured peak memory of a real run and the planner's estimate for the same configuration."""
    from hfmi_kit.launch.plan import block_params, plan
    from hfmi_kit.models import get_size

    r = subprocess.run([sys.executable, "-c", WORKER, size, str(side), str(patch), str(groups), str(batch), str(steps),
                        str(mask_ratio), device], capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"measurement of {size} failed:\n{r.stderr[-3000:]}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    cfg = get_size(size)
    blocks = block_params(cfg)[2]
    p = plan(size, tokens=m["tokens"], batch_per_device=batch, devices=1, dtype="fp32", strategy="ddp",
             mask_ratio=mask_ratio, extra_params=m["params"] - blocks,
             attention="flash" if device.startswith("cuda") else "math",
             overhead_gb=0.0 if device.startswith("cuda") else CPU_RUNTIME_GB)
    return {"size": size, "batch": batch, "tokens": m["tokens"], "params": m["params"], "measured": m["measured"],
            "predicted": p.peak_memory, "ratio": p.peak_memory / m["measured"], "plan": p}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="tiny:8,tiny:32,base:4,base:8", help="size:batch pairs")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to measure torch.cuda.max_memory_allocated")
    a = ap.parse_args()
    print(f"{'size':6s} {'params':>10s} {'tokens':>7s} {'batch':>6s} {'measured MiB':>13s} {'predicted MiB':>14s} "
          f"{'pred/meas':>10s}")
    for run in a.runs.split(","):
        s, b = run.split(":")
        r = measure(s, batch=int(b), device=a.device)
        print(f"{s:6s} {r['params']:10d} {r['tokens']:7d} {r['batch']:6d} {r['measured'] / 2**20:13.1f} "
              f"{r['predicted'] / 2**20:14.1f} {r['ratio']:10.2f}")


if __name__ == "__main__":
    main()
