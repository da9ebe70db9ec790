"""Radiology end to end: study generation from nilearn's template, CLI pretrain/fine-tune/evaluate, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nilearn")
pytest.importorskip("monai")

import nibabel as nib
import pydicom

from hfmi_kit.cli import main
from hfmi_kit.domains.radiology import StudyConfig, discover, generate_study, split_subjects
from hfmi_kit.domains.radiology.io import load_volume
from hfmi_kit.domains.radiology.metrics import case_metrics, dice, hd95


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return generate_study(tmp_path_factory.mktemp("rad") / "study",
                          StudyConfig(unlabelled=2, labelled=5, spacing_scale=1.6, seed=3))


def test_study_set_is_real_files_with_exact_labels(study: Path):
    subs = discover(study)
    assert len(subs) == 7 and sum(1 for s in subs if s.label) == 5
    pool, test = split_subjects(subs)
    assert [s.id for s in test] == ["sub-005", "sub-006"] and len(pool) == 3
    last = subs[-1]
    assert "ct" in last.dicom, "the last labelled subject carries a DICOM CT series"
    t1 = load_volume(last.images["T1w"])
    lab = load_volume(last.label)
    ct = load_volume(last.images["ct"])
    dcm = load_volume(last.dicom["ct"])
    assert dcm.modality == "CT" and np.allclose(np.abs(np.linalg.det(dcm.affine)), np.abs(np.linalg.det(ct.affine)))
    assert lab.data.shape == t1.data.shape and np.allclose(lab.affine, t1.affine)
    vals = set(np.unique(lab.data).astype(int))
    assert vals == {0, 1, 2}
    # the lesion changes the contrast where the label says (T2 oedema brighter than white matter)
    assert t1.data[lab.data == 2].mean() < t1.data[(lab.data == 0) & (t1.data > 0.3)].mean()
    # CT in HU: air, brain, skull
    assert ct.data.min() < -900 and ct.data.max() > 900
    meta = json.loads((study / "dataset.json").read_text())
    assert "MNI" in meta["source"] and meta["labels"]["2"] == "tumour core"


def test_metrics_on_known_masks():
    a = np.zeros((20, 20, 20), bool)
    a[5:10, 5:10, 5:10] = True
    b = np.roll(a, 2, axis=0)
    assert dice(a, a) == 1.0 and math.isclose(dice(a, b), 3 / 5)
    assert math.isclose(hd95(a, b, np.array([1.5, 1.0, 1.0])), 3.0)
    aff = np.diag([1.5, 1.0, 1.0, 1.0])
    m = case_metrics(b.astype(np.uint8), a.astype(np.uint8), aff)
    assert math.isclose(m["centroid_error_mm"], 3.0)
    empty = case_metrics(np.zeros_like(a, np.uint8), a.astype(np.uint8), aff)
    assert empty["dice"] == 0.0 and empty["hd95_mm"] > 30


def test_cli_pretrain_finetune_evaluate(study: Path, tmp_path: Path, capsys):
    pt = tmp_path / "pt"
    assert main(["pretrain", "radiology", "--data", str(study), "--out", str(pt), "--steps", "6",
                 "--batch-size", "2"]) == 0
    cfg = json.loads((pt / "model" / "config.json").read_text())
    test_ids = cfg["geometry"]["excluded_test_subjects"]
    assert test_ids and cfg["geometry"]["modalities"] == ["T1w", "T2w", "ct"]
    ft = tmp_path / "ft"
    assert main(["finetune", "radiology", "--from", str(pt / "model"), "--data", str(study), "--out", str(ft),
                 "--steps", "4", "--labels", "2", "--batch-size", "2", "--baselines"]) == 0
    m = json.loads((ft / "metrics.json").read_text())
    for k in ("dice", "hd95_mm", "centroid_error_mm", "dice_scratch", "hd95_mm_scratch", "centroid_error_mm_scratch",
              "dice_unet", "hd95_mm_unet", "centroid_error_mm_unet", "dice_unet_same", "hd95_mm_unet_same"):
        assert k in m and math.isfinite(m[k]), k
        assert (0.0 <= m[k] <= 1.0) if k.startswith("dice") else m[k] >= 0.0
    assert m["labelled_cases"] == 2 and m["test_cases"] == 2 and m["unet_cases"] == 3 and m["unet_same_cases"] == 2
    cases = json.loads((ft / "cases.json").read_text())
    assert set(cases["per_case"]) == {"model", "scratch", "unet_same", "unet"}
    assert sorted(cases["test"]) == sorted(test_ids) and not set(cases["train"]) & set(test_ids)
    for row in cases["per_case"]["model"]:
        assert set(row) >= {"id", "dice", "hd95_mm", "centroid_error_mm", "centroid_mm", "bbox_mm"}
    # predictions: NIfTI on the exact input grid; DICOM-SEG for the DICOM study, de-identified
    subs = {s.id: s for s in discover(study)}
    for sid in cases["test"]:
        pred = nib.load(str(ft / "predictions" / f"{sid}_pred.nii.gz"))
        ref = nib.load(subs[sid].images["T1w"])
        assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-6)
    segs = list((ft / "predictions").glob("*_seg.dcm"))
    assert len(segs) == 1
    seg = pydicom.dcmread(segs[0])
    assert seg.Modality == "SEG" and seg.PatientIdentityRemoved == "YES" and str(seg.PatientName) == "ANON"
    out = capsys.readouterr().out
    assert "dice_unet" in out and "hd95_mm" in out
    ev = tmp_path / "ev"
    assert main(["evaluate", "radiology", "--ckpt", str(ft / "model"), "--data", str(study), "--out", str(ev)]) == 0
    me = json.loads((ev / "metrics.json").read_text())
    assert me["test_cases"] == 3  # every labelled subject not used for training (2 test + 1 unused pool case)
    # the scoring on the training run's test cases is the checkpoint's: the same blend, the same figures
    assert json.loads((ft / "model" / "config.json").read_text())["processors"]["window_blend"] == "gaussian"
    again = {r["id"]: r["dice"] for r in json.loads((ev / "cases.json").read_text())["per_case"]}
    for row in cases["per_case"]["model"]:
        assert again[row["id"]] == pytest.approx(row["dice"], abs=1e-9)
    # re-scored the other way: the same cases, other label maps
    assert main(["evaluate", "radiology", "--ckpt", str(ft / "model"), "--data", str(study), "--out",
                 str(tmp_path / "ev_argmax"), "--window-blend", "argmax"]) == 0
    other = json.loads((tmp_path / "ev_argmax" / "metrics.json").read_text())
    assert other["test_cases"] == 3 and 0.0 <= other["dice"] <= 1.0


def test_bad_inputs(study: Path, tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["pretrain", "radiology", "--data", str(empty), "--out", str(tmp_path / "x")]) == 1
    assert "no NIfTI files" in capsys.readouterr().err
    assert main(["finetune", "radiology", "--from", "scratch", "--data", str(study), "--out", str(tmp_path / "y"),
                 "--labels", "99"]) == 1
    assert "--labels must lie in [1, 3] (labelled training cases), got 99" in capsys.readouterr().err
    assert main(["finetune", "climate", "--from", "scratch", "--data", str(study), "--out", str(tmp_path / "z"),
                 "--labels", "2"]) == 1
    assert "--labels is not an option of climate" in capsys.readouterr().err



def test_the_shipped_checkpoint_is_found_by_name_fine_tunes_and_evaluates(study: Path, tmp_path: Path, capsys):
    """``radiology.tiny`` ships with the package: listed, loaded strictly, fine-tuned from by name
    (its encoder carried into the segmenter), and its fine-tuned model evaluates; made from
    generated example data, it records how to make that data again."""
    from safetensors.numpy import load_file
    from shipped import shipped_checkpoint

    from hfmi_kit.train import read_config

    ckpt, _ = shipped_checkpoint("radiology.tiny", {"seed": 0, "small": False})
    assert main(["info", "radiology.tiny"]) == 0
    assert "trained on radiology's generated example data (seed 0, full size" in capsys.readouterr().out
    ft = tmp_path / "ft"
    assert main(["finetune", "radiology", "--from", "radiology.tiny", "--data", str(study), "--out", str(ft),
                 "--steps", "4", "--labels", "2", "--batch-size", "2"]) == 0
    assert read_config(ft / "model")["training"]["from"] == str(ckpt)
    pre, got = load_file(str(ckpt / "model.safetensors")), load_file(str(ft / "model" / "model.safetensors"))
    shared = [k for k in pre if k in got and pre[k].shape == got[k].shape and pre[k].ndim > 1]
    assert len(shared) >= 10, shared
    for k in shared:  # four small steps from the shipped weights, not a fresh initialisation
        assert np.linalg.norm(got[k] - pre[k]) < 0.2 * np.linalg.norm(pre[k]), k
    assert main(["evaluate", "radiology", "--ckpt", str(ft / "model"), "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert 0.0 <= ev["dice"] <= 1.0


def test_a_checkpoint_made_from_example_data_makes_it_again_when_it_is_gone(tmp_path: Path, capsys):
    """Fine-tuning without ``--data`` uses the data a checkpoint records; a shipped one's folder
    is not on the user's machine, so the generated example data it records is made again (once),
    with the same subjects and so the same held-out test cases."""
    import shutil

    from hfmi_kit.checkpoints import recorded_data, shipped
    from hfmi_kit.errors import ConfigError

    fake = tmp_path / "ckpt"
    shutil.copytree(shipped()["radiology.tiny"], fake)
    cfg = json.loads((fake / "config.json").read_text())
    cfg["training"]["data"] = str(tmp_path / "gone" / "radiology_study")
    cfg["training"]["example_data"] = {"seed": 0, "small": True}  # the quick example set, for the test
    (fake / "config.json").write_text(json.dumps(cfg))
    data = recorded_data(fake, tmp_path / "data")
    assert "generating the example data ckpt was pretrained on (seed 0)" in capsys.readouterr().out
    ref = generate_study(tmp_path / "ref" / "radiology_study", StudyConfig(unlabelled=6, labelled=8,
                                                                           spacing_scale=1.4, seed=0))
    a, b = sorted(p.relative_to(data) for p in data.rglob("*")), sorted(p.relative_to(ref) for p in ref.rglob("*"))
    assert a == b and a
    first = next(p for p in a if str(p).endswith("_T1w.nii.gz"))
    assert np.array_equal(np.asarray(nib.load(data / first).dataobj), np.asarray(nib.load(ref / first).dataobj))
    assert recorded_data(fake, tmp_path / "data") == data.resolve()  # made once
    assert "generating" not in capsys.readouterr().out
    rec = json.loads((tmp_path / "data" / "example_data.json").read_text())
    (tmp_path / "data" / "example_data.json").write_text(json.dumps({**rec, "path": "../ref/radiology_study"}))
    shutil.rmtree(data)
    assert recorded_data(fake, tmp_path / "data") == data  # a record pointing out of its folder is not followed
    assert "generating" in capsys.readouterr().out
    del cfg["training"]["example_data"]
    (fake / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"the data it records \(.*gone.*\) is not on this machine; pass --data"):
        recorded_data(fake, tmp_path / "data2")
