"""Benchmarks of issue 9 (trust), in one run:

1. the machine's matmul peak (fp32);
2. MFU of pretraining per domain, through each domain's real ``pretrain`` on the small
   scorecard's data: FLOPs per optimiser step = FLOPs(2 steps) - FLOPs(1 step) (every matmul of
   the run, counted by ``FlopCounterMode``), time per step from two longer runs the same way, so
   data preparation and checkpoint writing cancel out;
3. the radiology encoder's training step against a MONAI ViT of the same width, depth, heads,
   patch and crop on the same input (B, M, c, c, c);
4. loader throughput against the raw read of each format (``loaders.py``);
5. inference time per sample of the fine-tuned model against the classical baseline
   (``inference.py``, fine-tuning from the checkpoints of 2).

    python benchmarks/trust.py [--domains climate,radiology,carbon,materials] [--steps 6,18]
        [--skip mfu,vit,loaders,inference]

Larger loader studies: ``climate_loader.py`` (chunking, node-local copy), ``radiology_loader.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
import inference
import loaders
from throughput import matmul_peak


def _pretrain(domain: str, root: Path, steps: int, tag: str, flops: bool) -> tuple[float, float]:
    """(seconds, FLOPs or 0) of the domain's small-budget pretraining with ``steps`` steps."""
    from hfmi_kit.domains import get_domain
    from hfmi_kit.scorecard import plan_of

    plan, dom = plan_of(domain), get_domain(domain)
    data = plan.data(root / "data", "small")
    kw = {**plan.pretrain_kw["small"], "steps": steps}
    if "exclude" in data:
        kw["exclude"] = data["exclude"]
    if domain == "materials":
        kw["supervised_steps"] = steps
    t = time.perf_counter()
    if flops:
        with FlopCounterMode(display=False) as fc:
            dom.pretrain(data=data.get("pretrain_data", data["data"]), out=root / f"{domain}_{tag}", seed=0,
                         progress=False, **kw)
        return time.perf_counter() - t, float(fc.get_total_flops())
    dom.pretrain(data=data.get("pretrain_data", data["data"]), out=root / f"{domain}_{tag}", seed=0, progress=False,
                 **kw)
    return time.perf_counter() - t, 0.0


def vit_comparison(root: Path, reps: int = 5) -> None:
    from monai.networks.nets import ViT

    from hfmi_kit.train import load_pretrained

    model = load_pretrained(root / "radiology_a" / "model")
    cfg, M, c, p = model.backbone.cfg, len(model.modalities), model.crop, model.patch
    x = torch.randn(2, M, c, c, c)
    vit = ViT(in_channels=M, img_size=(c, c, c), patch_size=(p, p, p), hidden_size=cfg.dim,
              mlp_dim=int(cfg.dim * cfg.mlp_ratio), num_layers=cfg.depth, num_heads=cfg.heads, classification=False)
    ids = list(range(M))

    def ours() -> torch.Tensor:
        return model.backbone.encode(model.multi_tokens(x, ids)).float().pow(2).mean()

    def monai() -> torch.Tensor:
        return vit(x)[0].float().pow(2).mean()

    for name, fn, net in (("hfmi radiology encoder", ours, model), ("MONAI ViT (same size)", monai, vit)):
        fn().backward()
        t = time.perf_counter()
        for _ in range(reps):
            fn().backward()
            net.zero_grad(set_to_none=True)
        n = sum(q.numel() for q in net.parameters())
        print(f"  {name:26s} {1e3 * (time.perf_counter() - t) / reps:8.1f} ms per fwd+bwd step "
              f"(batch 2, {M} modalities, {c}^3 crop, patch {p}; {n / 1e6:.2f} M parameters)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", default="climate,radiology,carbon,materials")
    ap.add_argument("--steps", default="6,18", help="the two step counts timed (their difference is measured)")
    ap.add_argument("--skip", default="", help="parts to leave out: mfu, vit, loaders, inference")
    a = ap.parse_args()
    s1, s2 = (int(x) for x in a.steps.split(","))
    domains, skip = a.domains.split(","), set(filter(None, a.skip.split(",")))
    torch.manual_seed(0)
    peak = matmul_peak(torch.float32)
    print(f"matmul peak fp32: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "mfu" not in skip:
            print("pretraining (small scorecard data), per optimiser step:")
            for d in domains:
                _, f1 = _pretrain(d, root, 1, "f1", True)
                _, f2 = _pretrain(d, root, 2, "f2", True)
                t1, _ = _pretrain(d, root, s1, "a", False)
                t2, _ = _pretrain(d, root, s2, "b", False)
                steps = (s2 - s1) * (2 if d == "materials" else 1)  # materials: masked + supervised stages
                per_step = (t2 - t1) / steps
                flops = (f2 - f1) / (2 if d == "materials" else 1)
                print(f"  {d:10s} {1e3 * per_step:8.1f} ms/step  {flops / 1e9:8.3f} GFLOP/step  "
                      f"{flops / per_step / 1e9:7.2f} GFLOP/s  MFU {100 * flops / per_step / peak:5.1f} %")
        if "radiology" in domains and "vit" not in skip:
            print("radiology encoder against MONAI's ViT on the same input:")
            if not (root / "radiology_a" / "model").exists():
                _pretrain("radiology", root, s1, "a", False)
            vit_comparison(root)
        if "loaders" not in skip:
            loaders.run(domains, root / "data")
        if "inference" not in skip:
            inference.run(domains, root)


if __name__ == "__main__":
    main()
