"""The pre-flight planner's memory estimate against the measured peak memory of real training.

    .venv/bin/python benchmarks/plan_memory.py                 # 13 runs: tiny and base, batches, AC, DDP, FSDP
    .venv/bin/python benchmarks/plan_memory.py --runs base:2,base:4:ac,base:4:fsdp2 --optimizer foreach
    .venv/bin/python benchmarks/plan_memory.py --device cuda   # on a GPU

Each measurement is a fresh process that trains an MAE (the core tokenizer, encoder and decoder)
with the real training loop for a few steps in fp32 and reports its peak memory above the
memory before the model was built. On the CPU that is the peak resident set (``VmHWM``) with
glibc told to serve every block over 128 KiB by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so a freed
tensor leaves the resident set at once and the peak follows the live tensors, as the GPU
allocator's ``torch.cuda.max_memory_allocated`` does (with glibc's default, freed activations stay
in its heap and the peak RSS was 10-30 % higher here: ``--glibc-default`` shows it). On a GPU, the
cuBLAS workspaces are allocated by a warm-up product before the baseline (runtime, like the CUDA
context) and ``max_memory_reserved`` is printed too (what the caching allocator held: the planner's
``overhead_gb`` is there for it).

The planner gets the same size, tokens, batch and parameter count, flash attention (PyTorch runs a
flash kernel on the CPU as on the GPU; no T x T scores are kept), the optimiser update AdamW uses
(``loop`` on the CPU by default; ``--optimizer foreach`` forces the GPU's default multi-tensor
update, whose step temporaries the planner counts) and a fixed CPU runtime overhead of 0.1 GB
(read off the smallest run, as a CUDA context would be on a GPU; 0 on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CPU_RUNTIME_GB = 0.1  # what the first training step allocates beyond the model on this CPU (oneDNN/MKL
#                        caches, thread buffers): the smallest run's excess, like a CUDA context on a GPU
WORKER = r"""
import json, os, resource, sys
import torch
from torch import nn
from torch.utils.data import Dataset
from hfmi_kit.models import Backbone, GridTokenizer, get_size
from hfmi_kit.models.mae import MaskedAutoencoder
from hfmi_kit.models.tokenizers import patchify
from hfmi_kit.train import TrainConfig, Trainer

size, side, patch, groups, batch, steps, mask = sys.argv[1], *map(int, sys.argv[2:7]), float(sys.argv[7])
device, foreach, strategy, ac = sys.argv[8], sys.argv[9] == "foreach", sys.argv[10], sys.argv[11] == "ac"
if foreach:  # what AdamW does by default on a GPU: one update over all tensors of a group at once
    _init = torch.optim.AdamW.__init__
    torch.optim.AdamW.__init__ = lambda self, *a, **k: _init(self, *a, **{**k, "foreach": True})
names = [f"v{i}" for i in range(groups)]

class Fields(Dataset):
    def __len__(self): return 10_000
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {n: torch.randn(side, side, generator=g) for n in names}

class MAE(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = get_size(size, activation_checkpointing=ac)
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
if cuda:  # the CUDA context and the cuBLAS workspaces are the runtime's, not the model's
    w = torch.zeros(8, 8, device=device, requires_grad=True)
    (w @ w).sum().backward()
    del w
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
before = torch.cuda.memory_allocated() if cuda else rss()
model = MAE()
n = sum(p.numel() for p in model.parameters())
tokens = groups * (side // patch) ** 2
cfg = TrainConfig(steps=steps, batch_size=batch, progress=False, log_every=10_000, precision="fp32", warmup_steps=1,
                  device=device, strategy=strategy)
Trainer(model, ds, config=cfg).fit()
def hwm():  # this process image's peak RSS (ru_maxrss would carry a big parent's over through fork + exec)
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))

peak = torch.cuda.max_memory_allocated() if cuda else hwm()
reserved = torch.cuda.max_memory_reserved() - before if cuda else None
with open(f"peak-{os.environ.get('RANK', '0')}.json", "w") as f:  # in the measuring process's own folder
    json.dump({"params": n, "tokens": tokens, "measured": peak - before, "reserved": reserved}, f)
"""


def measure(size: str, *, side: int = 64, patch: int = 4, groups: int = 2, batch: int = 8, steps: int = 3,
            mask_ratio: float = 0.75, device: str = "cpu", optimizer: str | None = None,
            glibc_default: bool = False, nproc: int = 1, strategy: str = "ddp",
            activation_checkpointing: bool = False) -> dict[str, Any]:
    """Measured peak memory of a real run and the planner's estimate for the same configuration.

    ``optimizer``: ``foreach`` forces AdamW's multi-tensor update; None keeps PyTorch's default
    for the device (``foreach`` on a GPU, ``loop`` on the CPU)."""
    from hfmi_kit.launch.plan import block_params, plan
    from hfmi_kit.models import get_size

    cuda = device.startswith("cuda")
    optimizer = optimizer or ("foreach" if cuda else "loop")
    if optimizer not in ("foreach", "loop"):
        raise ValueError(f"optimizer must be foreach or loop, got {optimizer!r}")
    env = dict(os.environ)
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    args = [size, str(side), str(patch), str(groups), str(batch), str(steps), str(mask_ratio), device, optimizer,
            strategy, "ac" if activation_checkpointing else "-"]
    with tempfile.TemporaryDirectory() as tmp:
        if nproc == 1:
            cmd = [sys.executable, "-c", WORKER, *args]
        else:  # every process measures its own peak; the largest counts
            (Path(tmp) / "worker.py").write_text(WORKER, encoding="utf-8")
            env["OMP_NUM_THREADS"] = "1"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   str(Path(tmp) / "worker.py"), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=tmp)
        if r.returncode:
            raise RuntimeError(f"measurement of {size} failed:\n{r.stderr[-3000:]}")
        ranks = [json.loads(f.read_text(encoding="utf-8")) for f in sorted(Path(tmp).glob("peak-*.json"))]
    if len(ranks) != nproc:
        raise RuntimeError(f"measurement of {size}: {len(ranks)} of {nproc} processes reported")
    m = max(ranks, key=lambda x: x["measured"])
    cfg = get_size(size)
    blocks = block_params(cfg)[2]
    p = plan(size, tokens=m["tokens"], batch_per_device=batch, devices=nproc, dtype="fp32", strategy=strategy,
             mask_ratio=mask_ratio, extra_params=m["params"] - blocks,
             activation_checkpointing=activation_checkpointing, attention="flash", optimizer=optimizer,
             overhead_gb=0.0 if cuda else CPU_RUNTIME_GB)
    return {"size": size, "batch": batch, "tokens": m["tokens"], "params": m["params"], "measured": m["measured"],
            "reserved": m["reserved"], "optimizer": optimizer, "predicted": p.peak_memory,
            "ratio": p.peak_memory / m["measured"], "plan": p}


DEFAULT_RUNS = ("tiny:8,tiny:32,base:2,base:4,base:8,base:2:foreach,base:8:ac,base:16:ac,tiny:8:ddp2,"
                "base:4:ddp2,base:4:fsdp2,base:4:fsdp2:ac,base:2:tokens2048")


def parse_run(run: str) -> dict[str, Any]:
    """``size:batch[:opt]...`` with opts ``foreach``, ``loop``, ``ac``, ``ddpN``, ``fsdpN``, ``tokensN``."""
    size, batch, *opts = run.split(":")
    kw: dict[str, Any] = {"size": size, "batch": int(batch)}
    for o in opts:
        if o in ("foreach", "loop"):
            kw["optimizer"] = o
        elif o == "ac":
            kw["activation_checkpointing"] = True
        elif o.startswith(("ddp", "fsdp")):
            kw["strategy"] = o.rstrip("0123456789")
            kw["nproc"] = int(o[len(kw["strategy"]):] or 2)
        elif o.startswith("tokens"):  # 2 groups of (side / 4)^2 patches
            kw["side"] = 4 * int((int(o[6:]) // 2) ** 0.5)
        else:
            raise SystemExit(f"unknown option {o!r} in run {run!r}")
    return kw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=DEFAULT_RUNS,
                    help="comma-separated size:batch[:foreach|loop][:ac][:ddpN|fsdpN][:tokensN] "
                         "(ac: activation checkpointing; ddpN/fsdpN: N processes, gloo on the CPU)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to measure torch.cuda.max_memory_allocated")
    ap.add_argument("--optimizer", choices=["foreach", "loop"],
                    help="AdamW's update (default: PyTorch's for the device, foreach on a GPU, loop on the CPU)")
    ap.add_argument("--glibc-default", action="store_true",
                    help="CPU: leave glibc's allocator as it is (freed memory may stay resident)")
    a = ap.parse_args()
    gpu = a.device != "cpu"
    print(f"{'run':22s} {'params':>10s} {'tokens':>7s} {'optimizer':>9s} {'measured MiB':>13s} "
          f"{'predicted MiB':>14s} {'pred/meas':>10s}" + (f" {'reserved MiB':>13s}" if gpu else ""))
    for run in a.runs.split(","):
        kw = {"optimizer": a.optimizer, **parse_run(run)}
        r = measure(kw.pop("size"), device=a.device, glibc_default=a.glibc_default, **kw)
        print(f"{run:22s} {r['params']:10d} {r['tokens']:7d} {r['optimizer']:>9s} "
              f"{r['measured'] / 2**20:13.1f} {r['predicted'] / 2**20:14.1f} {r['ratio']:10.2f}"
              + (f" {r['reserved'] / 2**20:13.1f}" if r["reserved"] is not None else ""), flush=True)


if __name__ == "__main__":
    main()
