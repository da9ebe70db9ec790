"""The engine runs unchanged under torchrun (2 CPU processes, gloo): DDP, rank-0 checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_engine import Fields, Regressor, MCFG
    from hfmi_kit.models import get_size
    from hfmi_kit.train import TrainConfig, Trainer
    torch.manual_seed(0)
    cfg = TrainConfig(steps=12, batch_size=8, progress=False, log_every=4, seed=1)
    tr = Trainer(Regressor(size=get_size("tiny")), Fields(), config=cfg, out_dir={out!r}, model_config=MCFG)
    res = tr.fit()
    w = tr.model.backbone.encoder.blocks[0].attn.qkv.weight.detach().clone()
    gathered = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, w)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "replicas diverged"
    sys.stdout.write(f"RANK {{dist.get_rank()}} WORLD {{dist.get_world_size()}} STEP {{res.step}}\\n")
    sys.stdout.flush()
    dist.destroy_process_group()
''')


def test_engine_under_torchrun_ddp(tmp_path):
    from pathlib import Path

    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "run")))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29517", str(script)], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "RANK 0 WORLD 2 STEP 12" in r.stdout and "RANK 1 WORLD 2 STEP 12" in r.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"] == [4, 8, 12]  # rank 0 alone writes
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-00000012"
