"""Radiology: bad input fails with one purposeful line and leaves no trace.

Every case copies one small good study, breaks one thing and runs the command line in-process:
exit 1, exactly one stderr line ``hfmi: error: ...`` that names the file (or parameter) and the
problem, no traceback, no fresh ``--out`` left behind, and a previously good output folder
(a real short pretraining run) byte for byte unchanged when the command is pointed at it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from badinput import fails_with_one_line, left_nothing, snapshot  # noqa: E402

from hfmi_kit.cli import main  # noqa: E402
from hfmi_kit.domains import get_domain  # noqa: E402

FAST = ("--steps", "2", "--batch-size", "2")
PRETRAIN = ("pretrain", "radiology", "--data", "{data}", "--out", "{out}", *FAST)
FINETUNE = ("finetune", "radiology", "--from", "scratch", "--data", "{data}", "--out", "{out}", *FAST)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small good study (6 unlabelled, 8 labelled subjects; sub-013's CT also as DICOM)."""
    return get_domain("radiology").example_data(tmp_path_factory.mktemp("radiology"), seed=0)


@pytest.fixture(scope="module")
def good(study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A previously good output folder: a real two-step pretraining run."""
    out = tmp_path_factory.mktemp("good") / "pretrained"
    assert main(["pretrain", "radiology", "--data", str(study), "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def carbon_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of another domain (a two-step carbon pretraining on a tiny region)."""
    from hfmi_kit.domains.carbon.synth import LandscapeConfig, generate_region

    root = tmp_path_factory.mktemp("carbon")
    region = generate_region(root / "region", LandscapeConfig(size=64, plots=60, seed=0))
    assert main(["pretrain", "carbon", "--data", str(region), "--out", str(root / "pre"), *FAST]) == 0
    return root / "pre" / "model"



# ------------------------------------------------------------------------------------ breakers

def _nifti(study: Path, sub: str, mod: str) -> Path:
    return study / sub / f"{sub}_{mod}.nii.gz"


def _rewrite(path: Path, edit: Callable[[np.ndarray], np.ndarray]) -> None:
    img = nib.load(str(path))
    data = edit(np.asarray(img.dataobj))
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


def _empty_folder(s: Path) -> None:
    for p in s.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _zero_bytes(s: Path) -> None:
    _nifti(s, "sub-000", "T1w").write_bytes(b"")


def _truncated(s: Path) -> None:
    p = _nifti(s, "sub-000", "T2w")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def _text_file(s: Path) -> None:
    _nifti(s, "sub-001", "ct").write_text("this is not an image\n")


def _nan_voxels(s: Path) -> None:
    def edit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        x[10:12, 10:12, 5] = np.nan
        return x
    _rewrite(_nifti(s, "sub-002", "T1w"), edit)


def _inf_voxels(s: Path) -> None:
    def edit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        x[3, 4, 5] = np.inf
        return x
    _rewrite(_nifti(s, "sub-003", "ct"), edit)


def _image_4d(s: Path) -> None:
    _rewrite(_nifti(s, "sub-004", "T1w"), lambda x: np.stack([x, x], axis=-1))


def _image_2d(s: Path) -> None:
    _rewrite(_nifti(s, "sub-005", "T2w"), lambda x: x[:, :, x.shape[2] // 2])


def _singular_affine(s: Path) -> None:
    p = _nifti(s, "sub-000", "ct")
    img = nib.load(str(p))
    hdr = img.header.copy()
    for row in ("srow_x", "srow_y", "srow_z"):
        r = hdr[row].copy()
        r[2] = 0.0  # the slice axis has no extent: a singular voxel-to-world matrix
        hdr[row] = r
    hdr["qform_code"], hdr["sform_code"] = 0, 1
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, hdr), str(p))


def _metre_units(s: Path) -> None:
    p = _nifti(s, "sub-001", "T1w")
    img = nib.load(str(p))
    img.header.set_xyzt_units("meter")
    nib.save(img, str(p))


def _label_outside_classes(s: Path) -> None:
    def edit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.uint8)
        x[0, 0, 0], x[0, 0, 1] = 5, 7
        return x
    _rewrite(_nifti(s, "sub-006", "seg"), edit)


def _label_negative(s: Path) -> None:
    def edit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        x[0, 0, 0] = -1
        return x
    _rewrite(_nifti(s, "sub-007", "seg"), edit)


def _label_shape(s: Path) -> None:
    _rewrite(_nifti(s, "sub-008", "seg"), lambda x: x[:-3, :, :])


def _label_missing(s: Path) -> None:
    _nifti(s, "sub-009", "seg").unlink()


def _meta(s: Path, edit: Callable[[dict], object]) -> None:
    js = json.loads((s / "dataset.json").read_text())
    (s / "dataset.json").write_text(json.dumps(edit(js)))


def _json_invalid(s: Path) -> None:
    (s / "dataset.json").write_text('{"subjects": [{"id": "sub-000",')


def _json_list(s: Path) -> None:
    _meta(s, lambda js: js["subjects"])


def _json_labels_type(s: Path) -> None:
    _meta(s, lambda js: {**js, "labels": "tumour"})


def _json_images_type(s: Path) -> None:
    def edit(js: dict) -> dict:
        js["subjects"][3]["images"] = ["sub-003/sub-003_T1w.nii.gz"]
        return js
    _meta(s, edit)


def _json_extra_class(s: Path) -> None:
    _meta(s, lambda js: {**js, "labels": {**js["labels"], "3": "necrosis"}})


def _dicom_first_file_junk(s: Path) -> None:
    (s / "dataset.json").unlink()  # the plain folder layout: files and DICOM folders are found by name
    f = sorted((s / "sub-013" / "dicom_ct").iterdir())[0]
    f.write_bytes(b"\0" * 100)


def _dicom_truncated(s: Path) -> None:
    f = sorted((s / "sub-013" / "dicom_ct").iterdir())[4]
    f.write_bytes(f.read_bytes()[:300])


def _nothing(s: Path) -> None:
    pass


@dataclass(frozen=True)
class Case:
    """One bad input: how the good study is broken, the command, what the error line must say."""

    id: str
    edit: Callable[[Path], None]
    argv: tuple[str, ...]
    expect: tuple[str, ...]  # substrings of the error line: the file or parameter, then the problem
    good_out: bool = False  # point --out at the previously good output folder


CASES = [
    Case("empty-folder", _empty_folder, PRETRAIN, ("radiology_study", "no NIfTI files")),
    Case("missing-path", _nothing, ("pretrain", "radiology", "--data", "{data}/nowhere", "--out", "{out}", *FAST),
         ("nowhere", "no such study folder")),
    Case("zero-byte-nifti", _zero_bytes, PRETRAIN, ("sub-000_T1w.nii.gz", "empty file"), good_out=True),
    Case("truncated-nifti", _truncated, PRETRAIN, ("sub-000_T2w.nii.gz", "truncated")),
    Case("text-as-nifti", _text_file, PRETRAIN, ("sub-001_ct.nii.gz", "not a NIfTI")),
    Case("nan-voxels", _nan_voxels, PRETRAIN, ("sub-002_T1w.nii.gz", "non-finite"), good_out=True),
    Case("inf-voxels", _inf_voxels, PRETRAIN, ("sub-003_ct.nii.gz", "non-finite")),
    Case("4d-image", _image_4d, PRETRAIN, ("sub-004_T1w.nii.gz", "4-D image", "expected a 3-D volume")),
    Case("2d-image", _image_2d, PRETRAIN, ("sub-005_T2w.nii.gz", "2-D image", "expected a 3-D volume")),
    Case("singular-affine", _singular_affine, PRETRAIN, ("sub-000_ct.nii.gz", "singular affine"), good_out=True),
    Case("metre-units", _metre_units, PRETRAIN, ("sub-001_T1w.nii.gz", "units", "meter", "mm")),
    Case("label-outside-classes", _label_outside_classes, FINETUNE,
         ("sub-006_seg.nii.gz", "[5, 7]", "dataset.json", "classes"), good_out=True),
    Case("label-negative", _label_negative, FINETUNE, ("sub-007_seg.nii.gz", "-1", "classes")),
    Case("label-shape", _label_shape, FINETUNE, ("sub-008_seg.nii.gz", "shape")),
    Case("label-missing", _label_missing, FINETUNE, ("dataset.json", "sub-009_seg.nii.gz", "does not exist")),
    Case("json-invalid", _json_invalid, PRETRAIN, ("dataset.json", "invalid JSON"), good_out=True),
    Case("json-list", _json_list, PRETRAIN, ("dataset.json", "JSON object", "a list")),
    Case("json-labels-type", _json_labels_type, PRETRAIN, ("dataset.json", "'labels'", "a string")),
    Case("json-images-type", _json_images_type, PRETRAIN, ("dataset.json", "sub-003", "'images'", "a list")),
    Case("json-extra-class", _json_extra_class, FINETUNE, ("dataset.json", "[3]", "does not predict"), good_out=True),
    Case("dicom-junk-first-file", _dicom_first_file_junk, PRETRAIN, ("IM00000.dcm", "not a readable DICOM")),
    Case("dicom-truncated", _dicom_truncated, FINETUNE, ("IM00004.dcm", "DICOM file", "truncated"),
         good_out=True),
    Case("labels-zero", _nothing, (*FINETUNE, "--labels", "0"), ("--labels", ">= 1", "got 0"), good_out=True),
    Case("label-fraction-zero", _nothing, (*FINETUNE, "--label-fraction", "0"), ("--label-fraction", "(0, 1]")),
    Case("labels-too-many", _nothing, (*FINETUNE, "--labels", "50"), ("--labels", "[1, 6]", "got 50")),
    Case("checkpoint-of-carbon", _nothing,
         ("finetune", "radiology", "--from", "{carbon}", "--data", "{data}", "--out", "{out}", *FAST),
         ("model", "'carbon' checkpoint", "not a radiology"), good_out=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_with_one_line(case: Case, study: Path, good: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> None:
    data = tmp_path / "radiology_study"
    shutil.copytree(study, data)
    case.edit(data)
    out = good if case.good_out else tmp_path / "out"
    before = snapshot(good)
    subs = {"data": str(data), "out": str(out)}
    if any("{carbon}" in a for a in case.argv):
        subs["carbon"] = str(request.getfixturevalue("carbon_ckpt"))
    argv = [a.format(**subs) for a in case.argv]
    line = fails_with_one_line(argv, capsys)
    for s in case.expect:
        assert s in line, f"{s!r} not in {line!r}"
    left_nothing(tmp_path / "out")
    assert snapshot(good) == before
