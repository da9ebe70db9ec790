"""Radiology I/O: NIfTI and DICOM readers, world-coordinate round trips, bad input, de-identification."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nibabel")
pytest.importorskip("pydicom")

import nibabel as nib
import pydicom

from hfmi_kit.domains.radiology import data as rdata
from hfmi_kit.domains.radiology.geometry import model_grid, to_input_grid, to_model_grid
from hfmi_kit.domains.radiology.io import (
    IDENTIFYING,
    Volume,
    load_dicom_series,
    load_nifti,
    save_nifti,
    write_dicom_seg,
    write_dicom_series,
)
from hfmi_kit.domains.radiology.model import sliding_window_labels
from hfmi_kit.errors import DataError


def oblique_affine(spacing=(0.9, 1.3, 2.7), deg=(17.0, -9.0, 23.0), perm=(1, 2, 0), flips=(1, -1, 1),
                   origin=(31.0, -42.0, 17.0)) -> np.ndarray:
    """An oblique, anisotropic, permuted and flipped voxel-to-RAS affine."""
    a, b, c = np.deg2rad(deg)
    Rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    Ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    Rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    R = (Rz @ Ry @ Rx)[:, list(perm)] * np.array(flips, dtype=float)
    A = np.eye(4)
    A[:3, :3] = R * np.array(spacing)
    A[:3, 3] = origin
    return A


def marker_volume(shape=(40, 36, 22), marker=(23, 11, 9)) -> tuple[Volume, np.ndarray]:
    data = np.zeros(shape, np.float32)
    data[marker] = 1000.0
    vol = Volume(data, oblique_affine())
    return vol, vol.world(np.array(marker))[0]


def threshold_logits(x):
    """A stand-in segmenter: class 1 wherever the (single-channel) image is bright."""
    import torch

    return torch.cat([torch.zeros_like(x[:, :1]), (x[:, :1] - 1.0) * 50.0], dim=1)


def segment_and_map_back(vol: Volume, spacing: float = 3.0) -> np.ndarray:
    """Model grid -> sliding windows -> input grid: the path every prediction takes."""
    mg = to_model_grid(vol, spacing, cval=0.0)
    lab, conf = sliding_window_labels(threshold_logits, mg.data[None], window=16, background=[0.0], overlap=0.5)
    assert lab.shape == mg.data.shape and conf.dtype == np.float32
    return to_input_grid(lab, mg.affine, vol)


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask > 0)
    assert idx.size, "prediction is empty"
    c = idx.mean(0)
    return affine[:3, :3] @ c + affine[:3, 3]


def test_model_grid_is_ras_ordered_and_covers_input():
    A = oblique_affine()
    aff, shape = model_grid(A, (40, 36, 22), 3.0)
    assert np.allclose(np.linalg.norm(aff[:3, :3], axis=0), 3.0)
    assert np.all(np.diag(aff[:3, :3]) > 0), "model grid axes must point nearest to +R, +A, +S"
    assert nib.orientations.aff2axcodes(aff) == ("R", "A", "S")
    corners = np.array([[0, 0, 0], [39, 35, 21]], dtype=float) @ A[:3, :3].T + A[:3, 3]
    ijk = (np.linalg.inv(aff) @ np.c_[corners, np.ones(2)].T)[:3].T
    assert np.all(ijk > -0.5) and np.all(ijk < np.array(shape) - 0.5)


def test_marker_round_trip_nifti_oblique_anisotropic(tmp_path: Path):
    vol, marker_world = marker_volume()
    p = save_nifti(tmp_path / "in.nii.gz", vol.data, vol.affine)
    loaded = load_nifti(p)
    assert np.allclose(loaded.affine, vol.affine, atol=1e-5)
    pred = segment_and_map_back(loaded)
    out = save_nifti(tmp_path / "pred.nii.gz", pred, loaded.affine, dtype=np.uint8)
    img = nib.load(str(out))
    assert img.shape == loaded.data.shape
    assert np.allclose(img.affine, loaded.affine, atol=1e-5)
    c = world_centroid(np.asarray(img.dataobj), img.affine)
    assert np.linalg.norm(c - marker_world) < 2.0, (c, marker_world)


def test_marker_round_trip_dicom_series(tmp_path: Path):
    vol, marker_world = marker_volume()
    vol.data = vol.data - 1000.0  # HU: air everywhere, the marker at 0 HU
    d = write_dicom_series(vol, tmp_path / "series", modality="CT")
    back = load_dicom_series(d)
    # slices are stacked along the row x column normal; this affine's k axis points the other
    # way, so the same world grid comes back with k reversed
    K = vol.data.shape[2]
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, K - 1
    assert np.allclose(back.affine, vol.affine @ flip, atol=1e-4)
    assert np.allclose(back.data, np.clip(vol.data[:, :, ::-1], -1024, None), atol=0.51)
    assert np.allclose(back.world(np.argwhere(back.data == back.data.max())[0]), marker_world, atol=1e-3)
    back.data = back.data + 1000.0
    pred = segment_and_map_back(back)
    c = world_centroid(pred, back.affine)
    assert np.linalg.norm(c - marker_world) < 2.0, (c, marker_world)
    # slice order comes from positions, not from file names
    files = sorted(d.iterdir())
    files[0].rename(d / "zzz_first_slice.dcm")
    again = load_dicom_series(d)
    assert np.allclose(again.affine, back.affine, atol=1e-6)


def _series(tmp_path: Path, name="s") -> Path:
    vol = Volume(np.random.default_rng(0).normal(0, 50, (12, 10, 6)).astype(np.float32), oblique_affine())
    return write_dicom_series(vol, tmp_path / name, modality="CT")


def test_dicom_uids_are_random_unless_derived_from_a_given_entropy(tmp_path: Path):
    """Real series get fresh UIDs; a generated study passes ``uid_entropy``, so making it again
    writes the same bytes (its checksum in a checkpoint's record still matches)."""
    import pydicom

    vol = Volume(np.random.default_rng(0).normal(0, 50, (12, 10, 6)).astype(np.float32), oblique_affine())
    a, b = (write_dicom_series(vol, tmp_path / n, modality="CT", uid_entropy="seed 0 sub-001") for n in "ab")
    c = write_dicom_series(vol, tmp_path / "c", modality="CT")
    files = {d.name: sorted(d.iterdir()) for d in (a, b, c)}
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(files["a"], files["b"]))
    ua, uc = (pydicom.dcmread(files[n][0]) for n in "ac")
    assert ua.SOPInstanceUID != uc.SOPInstanceUID and ua.StudyInstanceUID != uc.StudyInstanceUID
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in files["a"]}
    assert len(uids) == len(files["a"])  # one per slice
    assert all(u.startswith("2.25.") and len(u) <= 64 and pydicom.uid.UID(u).is_valid for u in uids)


def test_dicom_series_errors_name_the_problem(tmp_path: Path):
    d = _series(tmp_path)
    files = sorted(d.iterdir())
    # missing slice
    miss = tmp_path / "missing"
    shutil.copytree(d, miss)
    (miss / files[3].name).unlink()
    with pytest.raises(DataError, match="missing slice"):
        load_dicom_series(miss)
    # duplicated slice
    dup = tmp_path / "dup"
    shutil.copytree(d, dup)
    ds = pydicom.dcmread(files[2])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(dup / "copy.dcm")
    with pytest.raises(DataError, match="duplicated slice"):
        load_dicom_series(dup)
    # mixed series
    mixed = tmp_path / "mixed"
    shutil.copytree(d, mixed)
    other = _series(tmp_path, "other")
    shutil.copy(sorted(other.iterdir())[0], mixed / "from_other.dcm")
    with pytest.raises(DataError, match="mixed series"):
        load_dicom_series(mixed)
    # truncated / not DICOM
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / files[1].name).write_bytes(files[1].read_bytes()[:200])
    with pytest.raises(DataError, match=files[1].name):
        load_dicom_series(bad)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="notes.txt"):
        load_dicom_series(tmp_path / "text")


def test_nifti_errors_name_the_file(tmp_path: Path):
    good = save_nifti(tmp_path / "good.nii.gz", np.ones((6, 5, 4), np.float32), oblique_affine())
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(good.read_bytes()[:100])
    with pytest.raises(DataError, match="trunc.nii.gz"):
        load_nifti(trunc)
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"hello" * 100)
    with pytest.raises(DataError, match="junk.nii"):
        load_nifti(junk)
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.eye(4)), str(four))
    with pytest.raises(DataError, match=r"four.nii.gz: 4-D"):
        load_nifti(four)
    shear = np.eye(4)
    shear[0, 1] = 0.5
    sh = tmp_path / "shear.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), shear), str(sh))
    with pytest.raises(DataError, match="non-orthonormal"):
        load_nifti(sh)
    sing = np.eye(4)
    sing[2, 2] = 0.0
    sg = tmp_path / "singular.nii.gz"
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    img.set_qform(None, code=0)
    img.set_sform(sing, code=2)  # a corrupt header: nibabel itself cannot write this as a qform
    nib.save(img, str(sg))
    with pytest.raises(DataError, match="singular|non-orthonormal"):
        load_nifti(sg)
    nan = np.ones((4, 4, 4), np.float32)
    nan[1, 1, 1] = np.nan
    nn = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(nn))
    with pytest.raises(DataError, match="nan.nii.gz: 1 non-finite"):
        load_nifti(nn)


def test_label_grid_must_match_image(tmp_path: Path):
    A = oblique_affine()
    img = np.random.default_rng(0).uniform(0.5, 1.0, (10, 9, 8)).astype(np.float32)
    save_nifti(tmp_path / "s1_T1w.nii.gz", img, A)
    save_nifti(tmp_path / "s1_seg.nii.gz", np.zeros((10, 9, 7), np.uint8), A)
    sub = rdata.discover(tmp_path)[0]
    assert sub.label and sub.images == {"T1w": str(tmp_path / "s1_T1w.nii.gz")}
    with pytest.raises(DataError, match="s1_seg.nii.gz: label grid"):
        rdata.prepare(sub, ["T1w"], 3.0)
    with pytest.raises(DataError, match="no \\['T2w'\\]"):
        rdata.prepare(sub, ["T1w", "T2w"], 3.0)


def test_save_nifti_is_atomic(tmp_path: Path, monkeypatch):
    target = tmp_path / "keep.nii.gz"
    save_nifti(target, np.ones((3, 3, 3), np.float32), np.eye(4))
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(OSError):
        save_nifti(target, np.zeros((3, 3, 3), np.float32), np.eye(4))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.nii.gz"]


def test_dicom_seg_is_deidentified_and_aligned(tmp_path: Path):
    pytest.importorskip("highdicom")
    vol = Volume(np.full((12, 10, 6), 30.0, np.float32), oblique_affine())
    d = write_dicom_series(vol, tmp_path / "series", modality="CT")
    src = load_dicom_series(d)
    assert str(pydicom.dcmread(src.source_files[0]).PatientName) == "Doe^Jane"
    labels = np.zeros(src.data.shape, np.uint8)
    labels[3:6, 2:5, 1:3] = 1
    labels[4, 3, 2] = 2
    out = write_dicom_seg(labels, src.source_files, tmp_path / "seg.dcm", segment_names=["oedema", "tumour core"])
    seg = pydicom.dcmread(out)
    assert seg.Modality == "SEG" and seg.PatientIdentityRemoved == "YES"
    assert str(seg.PatientName) == "ANON" and seg.PatientID == "ANON"
    for kw in IDENTIFYING:
        if kw in seg and kw not in ("PatientName", "PatientID"):
            assert str(getattr(seg, kw)) == "", kw
    assert "InstitutionName" not in seg
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(src.source_files[0]).SeriesInstanceUID
    import highdicom as hd

    s = hd.seg.Segmentation.from_dataset(seg)
    assert s.number_of_segments == 2
    # frames per segment: the non-empty source slices
    n_frames = int(seg.NumberOfFrames)
    assert n_frames == int((labels == 1).any(axis=(0, 1)).sum() + (labels == 2).any(axis=(0, 1)).sum())


def _pydicom_series(name: str) -> Path:
    from pydicom.data import get_testdata_file

    p = get_testdata_file("DICOMDIR", read=False)
    assert p is not None, "pydicom's bundled test files are missing"
    return Path(p).parent / name  # DICOMDIR lies in test_files/dicomdirtests


def test_real_pydicom_series(tmp_path: Path):
    """The multi-file series that pydicom ships: a 5-slice CT, one with a gap, one with two series."""
    ct = _pydicom_series("98892001/CT5N")
    vol = load_dicom_series(ct)
    assert vol.modality == "CT" and vol.data.shape[2] == 5
    assert np.allclose(vol.spacing, [0.488281, 0.488281, 2.5], atol=1e-4)
    first = pydicom.dcmread(vol.source_files[0])
    assert float(first.ImagePositionPatient[2]) == pytest.approx(-1.2375)  # sorted along the normal, not by name
    raw = first.pixel_array.astype(float) * float(first.RescaleSlope) + float(first.RescaleIntercept)
    assert np.allclose(vol.data[:, :, 0], raw.T)  # HU after rescale, [column, row] indexing
    # LPS -> RAS: the first voxel's world position is the DICOM position with x and y negated
    assert np.allclose(vol.world([0, 0, 0])[0], [72.2, 143.0, -1.2375], atol=1e-3)
    with pytest.raises(DataError, match="missing slice"):
        load_dicom_series(_pydicom_series("77654033/CT2"))
    with pytest.raises(DataError, match="mixed series"):
        load_dicom_series(_pydicom_series("98892003/MR2"))


def test_dicom_series_write_is_all_or_nothing(tmp_path: Path, monkeypatch):
    vol = Volume(np.zeros((6, 5, 4), np.float32), oblique_affine())
    calls = {"n": 0}
    real = pydicom.dcmwrite

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(pydicom, "dcmwrite", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_series(vol, tmp_path / "new" / "series")
    assert list((tmp_path / "new").iterdir()) == []  # no half-written series, no temp folder
    monkeypatch.setattr(pydicom, "dcmwrite", real)
    d = write_dicom_series(vol, tmp_path / "new" / "series")
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_dicom_series(vol, d)


def test_the_viewer_shows_what_radiology_viewers_show():
    """Orientation labels on every edge, positions in mm from the grid's affine, the aspect of the
    voxel spacing, one slider per plane (live and in a saved notebook), every modality, CT window
    presets, a mask legend."""
    pytest.importorskip("holoviews")
    import holoviews as hv

    from hfmi_kit.domains.radiology.plots import OrthoViews, orthoviews, windows

    rng = np.random.default_rng(0)
    shape = (40, 50, 20)
    ct = rng.normal(40, 30, shape).astype(np.float32)
    ct[:4] = -1000.0  # air, in HU
    t1 = rng.random(shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[15:25, 20:30, 8:12] = 1
    lab[18:22, 23:27, 9:11] = 2
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-16.0, -20.0, -25.0)
    lay = orthoviews({"ct": ct, "T1w": t1}, {"true": lab}, affine=affine, positions=[25, 50, 75])
    assert isinstance(lay, OrthoViews) and len(lay) == 6
    sag, _, cor, _, axial, axial_mask = lay  # one column per mask: image, image + mask per plane
    # a saved notebook: each plane its own slider, over its own stops in mm, and the modality
    assert [[d.name for d in p.kdims] for p in (sag, cor, axial)] == [
        ["sagittal [mm]", "modality"], ["coronal [mm]", "modality"], ["axial [mm]", "modality"]]
    assert set(sag.dimension_values("modality")) == {"ct", "T1w"}
    assert sorted(set(axial.dimension_values("axial [mm]"))) == [round(-25.0 + i * 2.5, 1) for i in (5, 10, 14)]
    rows = lay.rows()  # shown as one output per plane
    assert [[len(p) for p in r] for r in rows] == [[6, 6]] * 3
    shown: list = []
    import IPython.display

    orig = IPython.display.display
    IPython.display.display = shown.append
    try:
        lay._ipython_display_()
    finally:
        IPython.display.display = orig
    assert [type(x) for x in shown] == [hv.Layout] * 3
    edges = {name: {a.text for a in hv.render(panel.last, backend="bokeh").center if a.name == "orientation"}
             for name, panel in (("sagittal", sag), ("coronal", cor), ("axial", axial))}
    assert edges == {"sagittal": {"P", "A", "I", "S"}, "coronal": {"L", "R", "I", "S"}, "axial": {"L", "R", "P", "A"}}
    idx = round(49 * 0.5)  # the middle of J, in mm from the affine's origin and spacing
    at_mm = round(-20.0 + idx * 0.8, 1)
    img = cor[(at_mm, "ct")].get(0)  # coronal: I across (40 x 0.8 mm), K up (20 x 2.5 mm)
    left, b, r, t = img.bounds.lbrt()
    assert (r - left, t - b) == pytest.approx((32.0, 50.0))
    assert img.opts.get().kwargs["title"] == f"coronal {at_mm:g} mm ({idx})"
    other = cor[(round(-20.0 + round(49 * 0.75) * 0.8, 1), "ct")].get(0)  # the coronal slider's next stop
    assert not np.array_equal(img.dimension_values(2), other.dimension_values(2))
    legend = {c for e in axial_mask.last if isinstance(e, hv.Points) for c in e.dimension_values("class")}
    assert legend == {"1 oedema", "2 tumour core"}
    assert windows(ct, "ct")["lung"] == (-1350.0, 150.0) and set(windows(ct, "ct")) == {
        "soft tissue", "lung", "bone", "percentiles"}
    assert set(windows(t1, "T1w")) == {"percentiles"}  # MR: no HU presets
    for row in rows:
        hv.render(row, backend="bokeh")

    live = orthoviews({"ct": ct, "T1w": t1}, {"true": lab}, affine=affine, positions=[25, 50, 75], dynamic=True)
    dims = [d.name for d in live[0].kdims]
    assert dims == ["sagittal [mm]", "coronal [mm]", "axial [mm]", "modality", "window"]
    s_mm, c_mm, a_mm = (d.values for d in live[0].kdims[:3])
    key = (s_mm[1], c_mm[1], a_mm[1], "ct", "lung")
    moved = (s_mm[1], c_mm[2], a_mm[1], "ct", "lung")  # only the coronal slider moved
    sag_img = live[0][key].get(0).dimension_values(2)
    assert np.array_equal(sag_img, live[0][moved].get(0).dimension_values(2))  # sagittal stays
    assert not np.array_equal(live[2][key].get(0).dimension_values(2), live[2][moved].get(0).dimension_values(2))
    assert live[0][key].get(0).opts.get().kwargs["clim"] == (-1350.0, 150.0)  # the lung window


def test_the_dashboard_holds_one_modality_volume_at_a_time():
    """A page offers every modality; a CT is hundreds of MB as float32: the one shown is held."""
    import nibabel as nib

    from hfmi_kit.domains.radiology.dashboard import _OneAtATime

    imgs = {m: nib.Nifti1Image(np.full((4, 5, 6), i, np.int16), np.eye(4)) for i, m in enumerate(("T1w", "ct"))}
    vols = _OneAtATime(imgs)
    assert list(vols) == ["T1w", "ct"] and vols._held == (None, None)  # nothing read before it is shown
    assert vols["ct"].dtype == np.float32 and float(vols["ct"].max()) == 1.0
    first = vols["T1w"]
    assert vols._held[0] == "T1w" and vols["T1w"] is first  # the one shown, read once
