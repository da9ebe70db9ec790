"""The radiology volume store: `hfmi data prepare radiology`, exact geometry, streamed crops, runs from a store."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nibabel")
pytest.importorskip("zarr")

import nibabel as nib
from test_radiology_io import oblique_affine

from hfmi_kit.cli import main
from hfmi_kit.domains.radiology import StudyConfig, generate_study
from hfmi_kit.domains.radiology import data as rdata
from hfmi_kit.domains.radiology import store as rstore
from hfmi_kit.domains.radiology.geometry import model_grid
from hfmi_kit.domains.radiology.io import save_nifti
from hfmi_kit.domains.radiology.tasks import write_prediction
from hfmi_kit.errors import DataError


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return generate_study(tmp_path_factory.mktemp("rad_store") / "study",
                          StudyConfig(unlabelled=1, labelled=4, spacing_scale=1.8, seed=5, dicom_subject=None))


@pytest.fixture(scope="module")
def store(study: Path, tmp_path_factory) -> Path:
    return rstore.prepare(sources=[study], out=tmp_path_factory.mktemp("st") / "study.zarr", chunk=16)


def _oblique_study(root: Path, n: int = 3) -> Path:
    """Oblique, anisotropic MR cases (0.9 x 1.3 x 2.7 mm, axes permuted and flipped) with labels."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        shape = (40 + i, 36, 22)
        img = rng.normal(100, 10, shape).astype(np.float32)
        img[5:-5, 5:-5, 3:-3] += 400
        lab = np.zeros(shape, np.uint8)
        lab[18:24, 10:15, 8:12] = 2
        lab[16:18, 10:15, 8:12] = 1
        aff = oblique_affine(origin=(31.0 + i, -42.0, 17.0))
        save_nifti(root / f"case{i}_T1w.nii.gz", img, aff)
        save_nifti(root / f"case{i}_seg.nii.gz", lab, aff)
    return root


def test_store_keeps_each_case_geometry_exactly(tmp_path: Path):
    src = _oblique_study(tmp_path / "obl")
    out = rstore.prepare(sources=[src], out=tmp_path / "obl.zarr", chunk=16)
    st = rstore.RadiologyStore(out)
    fp = json.loads(st.group.attrs["hfmi_fingerprint"])
    # the RAS-ordered spacing of the fingerprint: the 0.9/1.3/2.7 mm axes permuted onto R, A, S
    assert sorted(fp["cases"][0]["spacing"]) == pytest.approx([0.9, 1.3, 2.7])
    assert st.spacing == pytest.approx(fp["target_spacing"])
    for sub in rdata.discover(src):
        img = nib.load(sub.images["T1w"])
        case = st.prepared(sub.id)
        grid_aff, grid_shape = model_grid(img.affine, img.shape, st.spacing)
        assert np.array_equal(case.affine, grid_aff) and case.image.shape[1:] == grid_shape
        assert np.array_equal(case.ref.affine, img.affine) and case.ref.data.shape == img.shape
        direct = rdata.prepare(sub, ["T1w"], st.spacing)  # the store holds what training in memory sees
        assert np.array_equal(case.image, direct.image) and np.array_equal(case.label, direct.label)
        assert np.array_equal(case.label_ref.data, np.asarray(nib.load(sub.label).dataobj))
        # a prediction made on the store's grid is written on the input file's grid, exactly
        written = write_prediction(case.label, case, tmp_path / "pred")
        back = nib.load(written[0])
        assert back.shape == img.shape and np.array_equal(back.affine, img.affine)
        inside = np.asarray(back.dataobj) == np.asarray(nib.load(sub.label).dataobj)
        assert inside.mean() > 0.99  # nearest-neighbour there and back, on a coarser grid


def test_target_spacing_is_the_median_and_keeps_thin_slices_of_anisotropic_data():
    iso = np.array([[1.0, 1.0, 1.0], [1.2, 1.2, 1.2], [0.8, 0.8, 0.8]])
    assert rstore.target_spacing(iso, np.full((3, 3), 200)).tolist() == [1.0, 1.0, 1.0]
    aniso = np.array([[0.7, 0.7, 5.0]] * 8 + [[0.7, 0.7, 1.5]] * 2)
    shapes = np.array([[512, 512, 40]] * 10)
    t = rstore.target_spacing(aniso, shapes)
    assert t[:2].tolist() == [0.7, 0.7] and t[2] == pytest.approx(np.percentile(aniso[:, 2], 10)) and t[2] < 5.0


def test_segment_crops_oversample_tumour_as_asked(store: Path):
    st = rstore.RadiologyStore(store)
    pool, _ = rstore.split(st)
    c = 16
    mid = slice(c // 2 - 1, c // 2 + 1)  # the crop's centre voxel, wherever a flip put it

    def tumour_at_centre(ds: rstore.StoreCrops, n: int) -> float:
        return float(np.mean([int((ds[i]["target"][mid, mid, mid] > 0).any()) for i in range(n)]))

    hits = {}
    for frac in (1.0, 0.0):
        hits[frac] = tumour_at_centre(rstore.StoreCrops(store, pool, crop=c, task="segment", seed=1,
                                                        fg_fraction=frac), 120)
    assert hits[1.0] > 0.9  # centred on a stored tumour voxel (a few kept inside at the volume's edge)
    assert hits[0.0] < 0.3  # anywhere in the head: tumours are a few per cent of it
    half = tumour_at_centre(rstore.StoreCrops(store, pool, crop=c, task="segment", seed=1, fg_fraction=0.5), 200)
    assert 0.35 < half < 0.75


def test_crop_stream_is_a_function_of_seed_and_index(store: Path):
    st = rstore.RadiologyStore(store)
    a = rstore.StoreCrops(store, st.ids, crop=16, task="pretrain", seed=4)
    b = copy.deepcopy(a)  # through __getstate__, as a DataLoader worker receives it
    for i in (0, 7, 13, 9999):
        x, y = a[i], b[i]
        assert np.array_equal(x["inputs"], y["inputs"]) and int(x["modality"]) == int(y["modality"])
    assert not np.array_equal(a[0]["inputs"], rstore.StoreCrops(store, st.ids, crop=16, seed=5)[0]["inputs"])
    assert a[0]["inputs"].shape == (1, 16, 16, 16)


def test_a_crop_larger_than_the_volume_is_filled_with_background(store: Path):
    st = rstore.RadiologyStore(store)
    cid = st.ids[0]
    shape = st.case(cid).attrs["shape"]
    big = max(shape) + 6
    ds = rstore.StoreCrops(store, [cid], crop=big, task="pretrain", modalities=[st.modalities[0]], seed=0)
    x = ds[0]["inputs"][0].numpy()
    bg = st.case(cid).attrs["background"][0]
    assert x.shape == (big,) * 3
    assert np.all(x[0] == bg) and np.all(x[-1] == bg)  # the first axis is padded on both sides
    assert (x != bg).any()


def test_pretrain_finetune_evaluate_from_a_store(store: Path, study: Path, tmp_path: Path, capsys):
    assert main(["pretrain", "radiology", "--data", str(store), "--out", str(tmp_path / "pre"), "--steps", "2",
                 "--batch-size", "2", "--crop", "16"]) == 0
    cfg = json.loads((tmp_path / "pre" / "model" / "config.json").read_text())
    st = rstore.RadiologyStore(store)
    assert cfg["geometry"]["spacing_mm"] == pytest.approx(st.spacing)
    assert set(cfg["geometry"]["excluded_test_subjects"]) == set(rstore.split(st)[1])
    assert main(["finetune", "radiology", "--from", str(tmp_path / "pre" / "model"), "--data", str(store),
                 "--out", str(tmp_path / "ft"), "--steps", "2", "--labels", "1", "--batch-size", "2"]) == 0
    cases = json.loads((tmp_path / "ft" / "cases.json").read_text())
    assert cases["test"] == rstore.split(st)[1] and len(cases["train"]) == 1
    for cid in cases["test"]:
        pred = nib.load(tmp_path / "ft" / "predictions" / f"{cid}_pred.nii.gz")
        src = next(s for s in rdata.discover(study) if s.id == cid)
        img = nib.load(src.images[st.modalities[0]])
        assert pred.shape == img.shape and np.array_equal(pred.affine, img.affine)
    assert main(["finetune", "radiology", "--from", "scratch", "--data", str(store), "--out", str(tmp_path / "x"),
                 "--steps", "1", "--spacing", "2.0"]) == 1
    assert "the store is on a" in capsys.readouterr().err


def test_bad_inputs_of_prepare_get_one_line_each(study: Path, tmp_path: Path, capsys):
    def run(*args: str) -> str:
        assert main(["data", "prepare", "radiology", *args]) == 1
        err = [x for x in capsys.readouterr().err.replace("\r", "\n").splitlines()
               if x.strip() and not x.startswith("prepare:")]
        assert len(err) == 1, err  # one line (besides the progress bar)
        return err[0]

    assert "must end in .zarr" in run(str(study), "--out", str(tmp_path / "s"))
    assert "no such study folder" in run(str(tmp_path / "none"), "--out", str(tmp_path / "s.zarr"))
    assert "one or three positive numbers" in run(str(study), "--out", str(tmp_path / "s.zarr"), "--spacing", "1,2")
    assert "has no ['FLAIR'] image" in run(str(study), "--out", str(tmp_path / "s.zarr"), "--variables", "FLAIR")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a_T1w.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    assert "a_T1w.nii.gz" in run(str(bad), "--out", str(tmp_path / "s.zarr"))
    off = _oblique_study(tmp_path / "off", n=1)
    save_nifti(off / "case0_seg.nii.gz", np.zeros((10, 10, 10), np.uint8), np.eye(4))
    assert "case0_seg.nii.gz" in run(str(off), "--out", str(tmp_path / "s.zarr"))
    assert not (tmp_path / "s.zarr").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.zarr")]


def test_a_store_that_is_not_what_it_claims_is_refused(store: Path, tmp_path: Path):
    import shutil

    import zarr

    bad = tmp_path / "b.zarr"
    shutil.copytree(store, bad)
    g = zarr.open_group(str(bad), mode="r+")
    mark = json.loads(g.attrs["hfmi_store"])
    g.attrs["hfmi_store"] = json.dumps({**mark, "domain": "climate"})
    with pytest.raises(DataError, match="not a radiology store"):
        rstore.RadiologyStore(bad)
    meta = next(bad.rglob(".zarray"))
    doc = json.loads(meta.read_text())
    doc["compressor"] = {"id": "pickle"}
    meta.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="unpickles"):
        rstore.RadiologyStore(bad)
    lines = rstore.inspect_store(store)
    assert "a radiology store of 5 cases (4 labelled)" in lines[0]


def test_pretraining_from_a_store_in_workers_sees_the_same_crops(store: Path, tmp_path: Path):
    from safetensors.numpy import load_file

    weights = []
    for w in (0, 2):
        assert main(["pretrain", "radiology", "--data", str(store), "--out", str(tmp_path / f"w{w}"), "--steps", "2",
                     "--batch-size", "2", "--crop", "16", "--workers", str(w)]) == 0
        weights.append(load_file(tmp_path / f"w{w}" / "model" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        np.testing.assert_array_equal(weights[0][k], weights[1][k], err_msg=k)
