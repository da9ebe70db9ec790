"""The residual-encoder U-Net backbone: shapes, masking, weight transfer, runs through the CLI from a store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("zarr")

from hfmi_kit.cli import main
from hfmi_kit.domains.radiology import StudyConfig, generate_study
from hfmi_kit.domains.radiology import store as rstore
from hfmi_kit.domains.radiology.resenc import ResEncMAE, ResEncSegmenter
from hfmi_kit.models import get_size
from hfmi_kit.train.pretrained import transfer_weights


def test_segmenter_gives_voxel_logits_for_any_channel_set_and_takes_every_pretrained_weight_but_the_head():
    torch.manual_seed(0)
    mae = ResEncMAE(size=get_size("tiny"), modalities=["T1w", "T2w", "ct"], crop=16, patch=4, mask_ratio=0.75)
    seg = ResEncSegmenter(size=get_size("tiny"), modalities=["T1w", "T2w", "ct"], input_modalities=["T2w", "ct"],
                          crop=16, classes=3)
    x = torch.randn(2, 2, 16, 16, 16)
    assert seg.logits(x).shape == (2, 3, 16, 16, 16)
    report = transfer_weights(seg, mae.state_dict())
    assert report.reinitialised == ["seg_head.bias", "seg_head.weight"]
    assert sorted(report.skipped) == ["recon_head.bias", "recon_head.weight"]
    with pytest.raises(Exception, match="divisible"):
        ResEncSegmenter(size=get_size("tiny"), modalities=["ct"], crop=20)


def test_masking_hides_the_asked_share_of_whole_cubes_and_scores_only_them():
    torch.manual_seed(0)
    mae = ResEncMAE(size=get_size("tiny"), modalities=["ct"], crop=16, patch=4, mask_ratio=0.75)
    x = torch.randn(3, 1, 16, 16, 16)
    m = mae.mask(x)
    assert torch.all(m.mean((1, 2, 3, 4)) == round(0.75 * 64) / 64)
    cubes = m.reshape(3, 4, 4, 4, 4, 4, 4).permute(0, 1, 3, 5, 2, 4, 6).reshape(3, 64, 64)
    assert torch.all(cubes == cubes[..., :1])  # each 4-cube wholly hidden or wholly shown
    loss = mae({"inputs": x, "modality": torch.zeros(3, dtype=torch.long)})["loss"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert mae.stem.weight.grad is not None and mae.recon_head.weight.grad.abs().sum() > 0
    rec = mae.reconstruct(x[:, 0], torch.zeros(3, dtype=torch.long), seed=1)
    shown = rec["mask"] == 0
    assert torch.equal(rec["reconstruction"][shown], x[:, 0][shown]) and torch.all(rec["masked_input"][~shown] == 0)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resenc")
    study = generate_study(root / "study", StudyConfig(unlabelled=1, labelled=4, spacing_scale=1.8, seed=7,
                                                       dicom_subject=None))
    return rstore.prepare(sources=[study], out=root / "s.zarr", chunk=16, progress=False)


def test_resenc_pretrains_and_fine_tunes_from_a_store(store: Path, tmp_path: Path, capsys):
    assert main(["pretrain", "radiology", "--data", str(store), "--out", str(tmp_path / "pre"), "--steps", "2",
                 "--batch-size", "2", "--crop", "16", "--backbone", "resenc"]) == 0
    assert json.loads((tmp_path / "pre" / "model" / "config.json").read_text())["model_type"] == \
        "radiology_resenc_mae.tiny"
    assert main(["finetune", "radiology", "--from", str(tmp_path / "pre" / "model"), "--data", str(store), "--out",
                 str(tmp_path / "ft"), "--steps", "2", "--labels", "1", "--batch-size", "2", "--baselines"]) == 0
    cfg = json.loads((tmp_path / "ft" / "model" / "config.json").read_text())
    assert cfg["model_type"] == "radiology_resenc_segmenter.tiny"
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert all(0.0 <= m[k] <= 1.0 for k in ("dice", "dice_scratch", "dice_unet_same", "dice_unet"))
    assert (tmp_path / "ft" / "train_scratch").is_dir()  # scratch: the same residual-encoder architecture
    assert main(["evaluate", "radiology", "--ckpt", str(tmp_path / "ft" / "model"), "--data", str(store),
                 "--out", str(tmp_path / "ev")]) == 0
    capsys.readouterr()
    assert main(["finetune", "radiology", "--from", str(tmp_path / "pre" / "model"), "--data", str(store), "--out",
                 str(tmp_path / "x"), "--steps", "1", "--backbone", "transformer"]) == 1
    assert "is a resenc model" in capsys.readouterr().err
    assert main(["pretrain", "radiology", "--data", str(store), "--out", str(tmp_path / "y"), "--steps", "1",
                 "--backbone", "cnn"]) == 1
    assert "--backbone must be one of transformer, resenc" in capsys.readouterr().err
