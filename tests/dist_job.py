"""A small deterministic training job for the scale-out tests, run by plain python or torchrun.

    python tests/dist_job.py train OUT          # env: STEPS, BS, CKPT_EVERY, RESUME, UNTIL, SLOW, STALL_ON_SAVE
    python tests/dist_job.py convert OUT STEP   # a sharded step checkpoint -> single-file checkpoint

The model has a real transformer block (what FSDP shards) and no randomness, so one process,
DDP and FSDP see the same global batches (the sampler shards each batch across ranks) and must
reach the same losses. Exit code 85 means pre-empted after a checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from hfmi_kit.errors import REQUEUE_EXIT_CODE, PreemptedError
from hfmi_kit.models.encoder import Block
from hfmi_kit.models.registry import register_model


class Toy(nn.Module):
    def __init__(self, *, dim: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.block = Block(dim, 2)
        self.out = nn.Linear(dim, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.out(self.block(self.inp(batch["x"]))).mean(1).squeeze(-1)
        return {"loss": ((pred - batch["y"]) ** 2).mean()}


@register_model("toy_net")
def _toy(*, size: Any, **kw: Any) -> nn.Module:
    return Toy(**kw)


class Data(Dataset):
    def __init__(self, n: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, 4, generator=g)
        self.y = self.x.mean(1) @ torch.tensor([1.0, -2.0, 0.5, 1.0])  # learnable in a few dozen steps
        self.slow = float(os.environ.get("SLOW", "0"))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.slow:
            time.sleep(self.slow)
        return {"x": self.x[i], "y": self.y[i]}


def _stall_on_save(n: int, marker: Path) -> None:
    """Make the n-th single-file checkpoint write hang after its weights are on disk (kill -9 test)."""
    import hfmi_kit.train.pretrained as P

    real, calls = P.save_file, [0]

    def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        real(tensors, filename, metadata=metadata)
        calls[0] += 1
        if calls[0] == n:
            marker.write_text(filename)
            time.sleep(600)

    P.save_file = save_file


def main() -> int:
    from hfmi_kit.train import TrainConfig, Trainer, save_pretrained

    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "convert":
        from hfmi_kit.train.sharded import convert_sharded

        convert_sharded(sys.argv[3], out)
        return 0
    if os.environ.get("STALL_ON_SAVE"):
        _stall_on_save(int(os.environ["STALL_ON_SAVE"]), out.parent / f"{out.name}.stalled")
    torch.manual_seed(0)
    model = Toy()
    mc = {"model_type": "toy_net.tiny", "model_kwargs": {}}
    cfg = TrainConfig(steps=int(os.environ.get("STEPS", "40")), batch_size=int(os.environ.get("BS", "16")), lr=3e-3,
                      warmup_steps=2, checkpoint_every=int(os.environ.get("CKPT_EVERY", "10")), progress=False,
                      log_every=1, keep_checkpoints=10)
    tr = Trainer(model, Data(), config=cfg, out_dir=out, model_config=mc)
    until = int(os.environ["UNTIL"]) if os.environ.get("UNTIL") else None
    try:
        res = tr.fit(resume=os.environ.get("RESUME") == "1", until=until)
    except PreemptedError as e:
        print(f"pre-empted: {e}", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    if until is not None and res.step < cfg.steps:  # stopped part-way with a checkpoint, as a job at its limit
        return 0
    save_pretrained(model, out / "model", config=mc)
    data = Data()
    with torch.no_grad():  # the final model on every sample (under FSDP the forward gathers the shards)
        full = float(model({"x": data.x, "y": data.y})["loss"])
    if tr.dist.is_main:
        losses = [h["loss"] for h in res.history if h.get("split") == "train"]
        (out / "losses.json").write_text(json.dumps({"losses": losses, "final_loss": full,
                                                     "world_size": tr.dist.world_size, "sharded": tr.sharded}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
