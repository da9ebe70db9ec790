"""The engine: exact resume, NaN handling, checkpoints, load modes, schedules, fine-tune modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from hfmi_kit.config import from_dict
from hfmi_kit.errors import CheckpointError, ConfigError, NonFiniteLossError
from hfmi_kit.models import Backbone, GridTokenizer, PooledHead, get_size, register_model
from hfmi_kit.models.config import EncoderConfig
from hfmi_kit.train import TrainConfig, Trainer, load_pretrained, read_config, save_pretrained
from hfmi_kit.train.pretrained import SCHEMA_VERSION, transfer_weights


class Regressor(nn.Module):
    """Tiny backbone + pooled head predicting the mean of a field (with a random-mask input)."""

    def __init__(self, *, size: EncoderConfig, out_dim: int = 1) -> None:
        super().__init__()
        self.backbone = Backbone(GridTokenizer(groups=["x"], grid=(8, 8), patch=(4, 4), dim=size.dim), size)
        self.head = PooledHead(dim=size.dim, out_dim=out_dim)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["inputs"] * (torch.rand_like(batch["inputs"]) > 0.1)  # uses the global RNG
        tb = self.backbone.tokenizer({"x": x})
        pred = self.head(self.backbone.encode(tb), tb)[:, 0]
        return {"loss": ((pred - batch["target"]) ** 2).mean()}


register_model("test_regressor")(lambda *, size, **kw: Regressor(size=size, **kw))


class Fields(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, nan_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, 8, generator=g)
        self.y = self.x.mean(dim=(1, 2)) * 4
        if nan_at is not None:
            self.x[nan_at, 0, 0] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.x[i], "target": self.y[i]}


MCFG = {"domain": "", "model_type": "test_regressor.tiny", "model_kwargs": {}}


def make(tmp: Path, steps: int = 20, n: int = 64, evaluate=None, **kw) -> Trainer:
    torch.manual_seed(0)
    model = Regressor(size=get_size("tiny"))
    cfg = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=3, progress=False, seed=1,
                      log_every=5, **kw)
    return Trainer(model, Fields(n=n), config=cfg, out_dir=tmp, model_config=MCFG, evaluate=evaluate)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_at_the_end_of_an_epoch_drops_the_same_partial_batch(tmp_path):
    # 20 samples, batches of 8: two full batches an epoch, the last 4 dropped; a checkpoint after
    # step 2 sits at the end of epoch 0 (before, the resumed loader saw 4 samples left and, deciding
    # drop_last on them, trained on that partial batch)
    straight = make(tmp_path / "a", steps=6, n=20)
    straight.fit()
    make(tmp_path / "b", steps=6, n=20).fit(until=2)
    resumed = make(tmp_path / "b", steps=6, n=20)
    resumed.fit(resume=True)
    assert _same(straight.model, resumed.model)


def test_resumed_run_returns_the_same_best_weights(tmp_path):
    # the monitored loss grows with the distance from the initial weights, so the best model is the
    # first evaluated one (step 3): a run resumed at step 11 must end with those weights too (they
    # were kept only in memory before, so the resumed run returned its last step's weights)
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in Regressor(size=get_size("tiny")).state_dict().items()}

    def drift(model: torch.nn.Module) -> dict[str, float]:
        return {"val_loss": float(sum(((v.float() - init[k].float()) ** 2).sum() for k, v in model.state_dict().items()
                                      if v.is_floating_point()))}

    straight = make(tmp_path / "a", steps=20, evaluate=drift, eval_every=3)
    res = straight.fit()
    evals = [r for r in res.history if r["split"] == "eval"]
    assert evals[0]["step"] == 3 and res.best["val_loss"] == evals[0]["val_loss"] < evals[-1]["val_loss"]
    make(tmp_path / "b", steps=20, evaluate=drift, eval_every=3).fit(until=11)
    resumed = make(tmp_path / "b", steps=20, evaluate=drift, eval_every=3)
    resumed.fit(resume=True)
    assert _same(straight.model, resumed.model)


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    straight = make(tmp_path / "a", steps=20)
    straight.fit()
    first = make(tmp_path / "b", steps=20)
    first.fit(until=11)  # "interrupted" after step 11 (mid-epoch: 8 batches per epoch)
    resumed = make(tmp_path / "b", steps=20)
    resumed.fit(resume=True)
    assert resumed.step == 20
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_learning_happens_and_metrics_are_json_lines(tmp_path):
    tr = make(tmp_path, steps=60)
    res = tr.fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s"} <= set(train[0])
    assert res.checkpoint is not None and (res.checkpoint / "model.safetensors").is_file()


def test_nan_in_data_stops_training_and_last_checkpoint_still_loads(tmp_path):
    torch.manual_seed(0)
    model = Regressor(size=get_size("tiny"))
    cfg = TrainConfig(steps=40, batch_size=8, progress=False, checkpoint_every=5, seed=1)
    data = Fields()
    tr = Trainer(model, data, config=cfg, out_dir=tmp_path, model_config=MCFG)
    tr.fit(until=10)  # a good checkpoint exists
    good = tr.latest_checkpoint()
    data.x[:] = float("nan")  # the data goes bad
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 11.*Last good checkpoint"):
        tr.fit(resume=True)
    assert tr.latest_checkpoint() == good
    m = load_pretrained(good)
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_corrupt_or_truncated_checkpoint_names_the_file(tmp_path):
    m = Regressor(size=get_size("tiny"))
    ck = save_pretrained(m, tmp_path / "ck", config=MCFG)
    assert {p.name for p in ck.iterdir()} == {"model.safetensors", "config.json", "MODEL_CARD.md"}
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        load_pretrained(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: corrupt JSON"):
        load_pretrained(ck)
    (ck / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_pretrained(ck)


def test_truncated_train_state_is_reported(tmp_path):
    tr = make(tmp_path, steps=4)
    ck = tr.fit().checkpoint
    st = ck / "train_state.pt"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"train_state\.pt: corrupt"):
        make(tmp_path, steps=8).fit(resume=True)


def test_schema_versions_migrate_or_refuse(tmp_path):
    m = Regressor(size=get_size("tiny"))
    ck = save_pretrained(m, tmp_path / "ck", config={**MCFG, "geometry": {"grid": [8, 8]}})
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["schema_version"] == SCHEMA_VERSION and cfg["code_version"] and cfg["environment"]["torch"]
    old = {k: v for k, v in cfg.items() if k not in ("schema_version", "geometry")}
    old["data"] = {"grid": [8, 8]}
    (ck / "config.json").write_text(json.dumps(old))
    assert read_config(ck)["geometry"] == {"grid": [8, 8]}  # version 0 migrated
    assert load_pretrained(ck).hfmi_config["schema_version"] == SCHEMA_VERSION
    (ck / "config.json").write_text(json.dumps({**cfg, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(CheckpointError, match="newer than this hfmi_kit"):
        load_pretrained(ck)


def test_load_modes(tmp_path):
    src = Regressor(size=get_size("tiny"))
    ck = save_pretrained(src, tmp_path / "ck", config=MCFG)
    other = Regressor(size=get_size("tiny"), out_dim=3)  # a different head
    with pytest.raises(CheckpointError, match="use mode='transfer'"):
        load_pretrained(ck, model=other)
    got = load_pretrained(ck, mode="transfer", model=other)
    rep = got.hfmi_load_report
    assert "head.net.weight" in rep.skipped and "head.net.weight" in rep.reinitialised
    assert torch.equal(got.backbone.encoder.blocks[0].attn.qkv.weight, src.backbone.encoder.blocks[0].attn.qkv.weight)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["environment"]["torch"] = "0.0.1"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="torch 0.0.1"):
        load_pretrained(ck, mode="resume")
    assert transfer_weights(Regressor(size=get_size("tiny")), {}).loaded == []


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    m = Regressor(size=get_size("tiny"))
    ck = save_pretrained(m, tmp_path / "ck", config=MCFG)
    before = (ck / "model.safetensors").read_bytes()
    import hfmi_kit.train.pretrained as P

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(P, "render_model_card", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(Regressor(size=get_size("tiny")), ck, config=MCFG)
    assert (ck / "model.safetensors").read_bytes() == before  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary left behind


def test_schedule_warmup_then_cosine(tmp_path):
    tr = make(tmp_path, steps=100)
    f = [tr._lr_factor(s) for s in range(100)]
    assert f[0] < f[1] < f[2] and abs(f[2] - 1.0) < 1e-9
    assert all(a >= b for a, b in zip(f[3:], f[4:])) and f[-1] < 0.1


def test_frozen_mode_trains_only_the_head_and_layer_decay_scales_lr(tmp_path):
    tr = make(tmp_path, steps=5, mode="frozen")
    before = {k: v.clone() for k, v in tr.model.backbone.state_dict().items()}
    head_before = tr.model.head.net.weight.clone()
    tr.fit()
    for k, v in tr.model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(tr.model.head.net.weight, head_before)
    tr2 = make(tmp_path / "ld", steps=5, layer_decay=0.5)
    lrs = sorted({round(g["lr_scale"], 6) for g in tr2.optimizer.param_groups})
    assert lrs[0] == pytest.approx(0.5 ** (4 + 1)) and lrs[-1] == 1.0


def test_grad_accumulation_and_bf16_run(tmp_path):
    tr = make(tmp_path, steps=6, grad_accum=2, precision="bf16")
    res = tr.fit()
    assert res.step == 6 and torch.isfinite(torch.tensor(res.last_loss))


def test_early_stopping(tmp_path):
    calls = []

    def evaluate(model):
        calls.append(1)
        return {"val_loss": 1.0}  # never improves after the first

    torch.manual_seed(0)
    cfg = TrainConfig(steps=100, batch_size=8, progress=False, eval_every=5, early_stopping_patience=2)
    res = Trainer(Regressor(size=get_size("tiny")), Fields(), config=cfg, evaluate=evaluate).fit()
    assert res.stopped_early and res.step == 15 and len(calls) == 3


def test_config_checks_types():
    assert from_dict(TrainConfig, {"steps": 5, "lr": 1}).lr == 1.0
    with pytest.raises(ConfigError, match="TrainConfig.steps: expected an integer"):
        from_dict(TrainConfig, {"steps": "5"})
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(TrainConfig, {"stepz": 5})
    with pytest.raises(ConfigError, match="expected one of"):
        from_dict(TrainConfig, {"precision": "fp8"})
    with pytest.raises(ConfigError, match="steps, batch_size"):
        Trainer(Regressor(size=get_size("tiny")), Fields(), config=TrainConfig(steps=0))


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_results_take_the_users_umask(tmp_path, mask):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); what they publish must have the mode
    a plain write would: group-readable under umask 022 on a shared project directory."""
    import os
    import stat

    from hfmi_kit.config import atomic_write_json
    from hfmi_kit.train.pretrained import ModelConfig, save_pretrained

    old = os.umask(mask)
    try:
        ck = save_pretrained(torch.nn.Linear(2, 2), tmp_path / "model",
                             config=ModelConfig(domain="x", task="t", model_type="x.tiny"))
        atomic_write_json(tmp_path / "metrics.json", {"a": 1.0})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [ck, *ck.iterdir(), tmp_path / "metrics.json"]}
    assert modes == {"model": 0o777 & ~mask, **{n: 0o666 & ~mask for n in modes if n != "model"}}, modes
    assert {"config.json", "model.safetensors", "MODEL_CARD.md", "metrics.json"} <= set(modes)
