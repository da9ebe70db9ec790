"""Medical volume I/O: NIfTI (nibabel) and DICOM series (pydicom) in, NIfTI, DICOM and DICOM-SEG out.

Every volume is held as a :class:`Volume`: a 3-D float32 array indexed ``[i, j, k]`` and the
4x4 voxel-to-world affine in RAS+ millimetres (the NIfTI convention). DICOM's patient
coordinates are LPS+, so a DICOM affine is flipped in x and y on the way in and out; the data
array of a DICOM series is indexed ``[column, row, slice]`` so that its affine has the row
direction cosine as the first column, as dcm2niix and nibabel do.

Writers are atomic: a file or series appears complete under its final name or not at all.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hfmi_kit.config import as_created
from hfmi_kit.errors import DataError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A 3-D image: ``data`` (I, J, K) float32 and its RAS+ ``affine`` (4, 4) in mm."""

    data: np.ndarray
    affine: np.ndarray
    path: str = ""
    modality: str = ""
    source_files: list[str] = field(default_factory=list)  # DICOM files in slice order (k = 0..K-1)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm (the column norms of the affine)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def world(self, ijk: np.ndarray) -> np.ndarray:
        """World (RAS mm) coordinates of voxel indices (N, 3)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def check_affine(affine: np.ndarray, where: str) -> np.ndarray:
    """Return ``affine`` as float64 (4, 4) after checking it is finite, invertible and orthogonal.

    Scanners write rotations times voxel sizes; a sheared (non-orthonormal direction cosines)
    or singular affine means a corrupt header, and resampling through it silently misplaces
    every voxel, so it is an error.
    """
    A = np.asarray(affine, dtype=np.float64)
    if A.shape != (4, 4) or not np.all(np.isfinite(A)):
        raise DataError(f"{where}: affine must be a finite 4x4 matrix, got {A.tolist()}")
    M = A[:3, :3]
    zooms = np.linalg.norm(M, axis=0)
    if np.any(zooms < 1e-6) or abs(np.linalg.det(M)) < 1e-9:
        raise DataError(f"{where}: singular affine (voxel sizes {np.round(zooms, 4).tolist()}); the header is corrupt")
    R = M / zooms
    err = float(np.abs(R.T @ R - np.eye(3)).max())
    if err > 1e-3:
        raise DataError(f"{where}: non-orthonormal affine (direction cosines deviate by {err:.3g} from "
                        "orthogonal, a sheared grid); expected a rotation times voxel sizes")
    return A


NIFTI_MAGIC = (b"n+1\0", b"ni1\0")  # NIfTI-1 at byte 344 (single file, header + image pair)
NIFTI2_MAGIC = b"n+2\0"  # NIfTI-2 at byte 4


def check_nifti_file(path: str | Path) -> None:
    """Check that ``path`` looks like a NIfTI file before nibabel parses it.

    Raises :class:`DataError` naming the file for an empty file, a ``.nii.gz`` that is not
    gzip-compressed, a header cut short (truncated) and a header without the NIfTI-1/2 magic.
    """
    p = Path(path)
    if p.stat().st_size == 0:
        raise DataError(f"{p}: empty file (0 bytes); expected a NIfTI image")
    gz = p.name.lower().endswith(".gz")
    try:
        if gz:
            with open(p, "rb") as fh:
                if fh.read(2) != b"\x1f\x8b":
                    raise DataError(f"{p}: not a NIfTI file (named .nii.gz but not gzip-compressed)")
            with gzip.open(p, "rb") as fh:
                head = fh.read(548)
        else:
            with open(p, "rb") as fh:
                head = fh.read(548)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{p}: truncated or corrupt gzip stream ({type(e).__name__}: {e})") from e
    if head[344:348] in NIFTI_MAGIC or head[4:8] == NIFTI2_MAGIC:
        return
    if len(head) < 348:
        raise DataError(f"{p}: truncated NIfTI file ({len(head)} header bytes, a NIfTI-1 header has 348)")
    raise DataError(f"{p}: not a NIfTI file (no NIfTI-1/2 magic in the header)")


def load_nifti(path: str | Path, *, modality: str = "") -> Volume:
    """Read a 3-D NIfTI-1/2 file (``.nii`` or ``.nii.gz``) with nibabel.

    A trailing singleton 4th dimension is dropped; real 4-D data, empty, truncated or non-NIfTI
    files, spatial units other than mm (or unknown), bad affines and NaNs raise
    :class:`DataError` naming the file.
    """
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such NIfTI file")
    check_nifti_file(p)
    try:
        img = nib.load(str(p))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise DataError(f"{p}: a {type(img).__name__}, not a NIfTI image")
        shape = img.shape
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise DataError(f"{p}: {len(img.shape)}-D image of shape {tuple(img.shape)}; expected a 3-D volume")
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except DataError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        raise DataError(f"{p}: cannot read as NIfTI ({type(e).__name__}: {e}); truncated or corrupt?") from e
    units = img.header.get_xyzt_units()[0]
    if units not in ("mm", "unknown"):
        raise DataError(f"{p}: spatial units {units!r} in the header (xyzt_units); hfmi_kit reads affines in mm: "
                        "rescale the affine to mm and set the units to mm")
    affine = check_affine(img.affine, str(p))
    if not np.all(np.isfinite(data)):
        raise DataError(f"{p}: {int((~np.isfinite(data)).sum())} non-finite voxels (NaN/inf)")
    return Volume(data=data, affine=affine, path=str(p), modality=modality)


def save_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray, *, dtype: Any = None,
               description: str = "") -> Path:
    """Write ``data`` with exactly ``affine`` (sform and qform, scanner code) atomically."""
    import nibabel as nib

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(data) if dtype is None else np.asarray(data).astype(dtype)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    if description:
        img.header["descrip"] = description[:79].encode()
    suffix = ".nii.gz" if str(p).endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp-" + suffix.lstrip("."))
    os.close(fd)
    tmp_named = tmp + suffix  # nibabel chooses compression by the file name
    try:
        nib.save(img, tmp_named)
        os.replace(tmp_named, p)
    finally:
        for t in (tmp, tmp_named):
            if os.path.exists(t):
                os.unlink(t)
    return p


# ----------------------------------------------------------------------------------------- DICOM

def _dcm_files(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith(".") and f.name != "DICOMDIR")


def is_dicom_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder holding at least one file with the DICOM preamble."""
    p = Path(path)
    if not p.is_dir():
        return False
    for f in _dcm_files(p)[:5]:
        with open(f, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            return True
    return False


def load_dicom_series(directory: str | Path) -> Volume:
    """Read one DICOM image series from a folder into a RAS+ :class:`Volume`.

    Slices are ordered by their position along the slice normal (the cross product of the
    row and column direction cosines), not by file name or InstanceNumber; pixel values go
    through RescaleSlope/RescaleIntercept (CT in HU). Errors name the folder and file: a
    non-DICOM or truncated file, several series in one folder, mixed orientations or pixel
    sizes, duplicated slice positions, missing slices (a gap larger than 1.5 times the typical
    spacing) and a tilted (non-orthogonal) slice stack.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: not a folder of DICOM files")
    files = _dcm_files(d)
    if not files:
        raise DataError(f"{d}: no files")
    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as e:
            raise DataError(f"{f}: not a readable DICOM file ({e})") from e
        missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
                               "Columns", "SeriesInstanceUID") if t not in ds]
        if missing:
            raise DataError(f"{f}: a DICOM file without image geometry (missing {missing}); truncated, or not an "
                            "image slice?")
        headers.append((f, ds))
    series = sorted({str(ds.SeriesInstanceUID) for _, ds in headers})
    if len(series) > 1:
        raise DataError(f"{d}: mixed series ({len(series)} SeriesInstanceUIDs: {series[:3]}...); "
                        "put each series in its own folder")
    iop = np.array([float(x) for x in headers[0][1].ImageOrientationPatient])
    ps = np.array([float(x) for x in headers[0][1].PixelSpacing])  # (row spacing, column spacing)
    shape2 = (int(headers[0][1].Rows), int(headers[0][1].Columns))
    for f, ds in headers[1:]:
        if not np.allclose([float(x) for x in ds.ImageOrientationPatient], iop, atol=1e-4):
            raise DataError(f"{f}: ImageOrientationPatient differs from the first slice's; mixed orientations")
        if not np.allclose([float(x) for x in ds.PixelSpacing], ps, atol=1e-4) or \
                (int(ds.Rows), int(ds.Columns)) != shape2:
            raise DataError(f"{f}: pixel spacing or matrix size differs from the first slice's")
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    pos = np.array([[float(x) for x in ds.ImagePositionPatient] for _, ds in headers])
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    headers = [headers[i] for i in order]
    pos, dist = pos[order], dist[order]
    n = len(headers)
    if n > 1:
        gaps = np.diff(dist)
        dup = np.nonzero(gaps < 1e-3)[0]
        if dup.size:
            i = int(dup[0])
            raise DataError(f"{d}: duplicated slice position {dist[i]:.3f} mm in {headers[i][0].name} and "
                            f"{headers[i + 1][0].name}")
        med = float(np.median(gaps))
        bad = np.nonzero(gaps > 1.5 * med)[0]
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{d}: missing slice(s): a {gaps[i]:.2f} mm gap between {headers[i][0].name} and "
                            f"{headers[i + 1][0].name}, typical spacing {med:.2f} mm")
        if gaps.max() - gaps.min() > 0.01 * med + 1e-3:
            raise DataError(f"{d}: uneven slice spacing ({gaps.min():.3f}-{gaps.max():.3f} mm)")
        step = (pos[-1] - pos[0]) / (n - 1)
        if np.linalg.norm(np.cross(step / np.linalg.norm(step), normal)) > 1e-3:
            raise DataError(f"{d}: slice positions do not follow the slice normal (gantry tilt); "
                            "resample the series first")
    else:
        thick = float(getattr(headers[0][1], "SliceThickness", 1.0) or 1.0)
        step = normal * thick
    lps = np.eye(4)
    lps[:3, 0] = row_cos * ps[1]
    lps[:3, 1] = col_cos * ps[0]
    lps[:3, 2] = step
    lps[:3, 3] = pos[0]
    data = np.empty((shape2[1], shape2[0], n), dtype=np.float32)
    for k, (f, _) in enumerate(headers):
        try:
            ds = pydicom.dcmread(f)
            px = ds.pixel_array.astype(np.float32)
        except Exception as e:  # pixel decoding raises many types (truncated data, missing codecs)
            raise DataError(f"{f}: cannot decode pixel data ({type(e).__name__}: {e})") from e
        if px.shape != shape2:
            raise DataError(f"{f}: pixel array {px.shape}, expected {shape2}")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        inter = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        data[:, :, k] = (px * slope + inter).T
    affine = check_affine(LPS_TO_RAS @ lps, str(d))
    modality = str(getattr(headers[0][1], "Modality", ""))
    return Volume(data=data, affine=affine, path=str(d), modality=modality,
                  source_files=[str(f) for f, _ in headers])


def load_volume(path: str | Path, *, modality: str = "") -> Volume:
    """A NIfTI file or a folder holding one DICOM series."""
    p = Path(path)
    if p.is_dir():
        return load_dicom_series(p)
    if is_nifti(p):
        return load_nifti(p, modality=modality)
    raise DataError(f"{p}: neither a NIfTI file (.nii, .nii.gz) nor a folder of DICOM files")


@dataclass(frozen=True)
class Patient:
    """Identifying attributes written into synthetic DICOM (so de-identification can be shown)."""

    name: str = "Doe^Jane"
    patient_id: str = "HFMI-0001"
    birth_date: str = "19700101"
    sex: str = "F"
    institution: str = "hfmi_kit synthetic hospital"


def write_dicom_series(volume: Volume, out_dir: str | Path, *, modality: str = "CT",
                       patient: Patient | None = None, series_description: str = "",
                       uid_prefix: str | None = None, uid_entropy: str | None = None) -> Path:
    """Write ``volume`` as a DICOM series (one file per k-slice) with its exact geometry.

    UIDs are random (``2.25.`` + a UUID, or under ``uid_prefix``) unless ``uid_entropy`` is given:
    then they are derived from it, so that the same call writes the same files (a generated
    study made again is byte for byte the one a checkpoint records).

    CT values are stored as unsigned 16-bit with RescaleIntercept -1024 (HU); MR values are
    scaled to 0..4095 with RescaleSlope. The folder is written next to ``out_dir`` and renamed
    into place when complete.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out = Path(out_dir)
    if out.exists():
        raise DataError(f"{out}: exists; refusing to overwrite a DICOM series")
    patient = patient or Patient()
    A = check_affine(volume.affine, volume.path or "volume")
    lps = np.linalg.inv(LPS_TO_RAS) @ A
    zooms = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos, col_cos = lps[:3, 0] / zooms[0], lps[:3, 1] / zooms[1]
    if modality == "CT":
        sop_class, intercept, slope = CT_IMAGE_STORAGE, -1024.0, 1.0
    else:
        sop_class, intercept = MR_IMAGE_STORAGE, 0.0
        slope = float(max(volume.data.max(), 1e-6) / 4095.0)
    stored = np.clip(np.round((volume.data - intercept) / slope), 0, 65535).astype(np.uint16)
    def uid(*parts: object) -> str:
        if uid_entropy is None:
            return generate_uid(prefix=uid_prefix)
        if uid_prefix is not None:
            return generate_uid(prefix=uid_prefix, entropy_srcs=[uid_entropy, *map(str, parts)])
        key = hashlib.sha256("\0".join([uid_entropy, *map(str, parts)]).encode()).digest()[:16]
        return f"2.25.{int.from_bytes(key, 'big')}"  # the UUID-derived root, as generate_uid(None) makes

    study_uid, series_uid, for_uid = uid("study"), uid("series"), uid("frame of reference")
    now = _dt.datetime(2026, 1, 1, 12, 0, 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))  # same file system: atomic rename
    try:
        for k in range(stored.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = uid("instance", k)
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(str(tmp / f"IM{k:05d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
            ds.Modality = modality
            ds.PatientName, ds.PatientID = patient.name, patient.patient_id
            ds.PatientBirthDate, ds.PatientSex = patient.birth_date, patient.sex
            ds.InstitutionName = patient.institution
            ds.ReferringPhysicianName = "Smith^John"
            ds.AccessionNumber, ds.StudyID = "A0001", "1"
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
            ds.Manufacturer = "hfmi_kit"
            ds.SeriesDescription = series_description or f"hfmi_kit {modality}"
            ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.ImagePositionPatient = [f"{x:.6f}" for x in lps[:3, 3] + k * lps[:3, 2]]
            ds.ImageOrientationPatient = [f"{x:.8f}" for x in (*row_cos, *col_cos)]
            ds.PixelSpacing = [f"{zooms[1]:.6f}", f"{zooms[0]:.6f}"]  # row spacing, column spacing
            ds.SliceThickness = f"{zooms[2]:.6f}"
            ds.PositionReferenceIndicator = ""
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.RescaleIntercept, ds.RescaleSlope = f"{intercept:g}", f"{slope:.10g}"
            if modality == "CT":
                ds.RescaleType = "HU"
                ds.KVP = "120"
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
            pydicom.dcmwrite(ds.filename, ds, enforce_file_format=True)
        as_created(tmp)  # mkdtemp's 0700: the series gets the user's umask
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# DICOM PS3.15 Annex E basic profile: attributes that identify the patient, staff or place.
# Removed (X), emptied (Z) or replaced by a dummy (D); UIDs are kept (the Retain UIDs option,
# E.3.9) so a segmentation still references its source series.
_DEID_REMOVE = ("PatientBirthTime", "OtherPatientIDs", "OtherPatientNames", "PatientAddress",
                "PatientTelephoneNumbers", "PatientMotherBirthName", "MilitaryRank", "EthnicGroup",
                "PatientReligiousPreference", "MedicalRecordLocator", "InstitutionAddress",
                "InstitutionalDepartmentName", "PhysiciansOfRecord", "PerformingPhysicianName",
                "NameOfPhysiciansReadingStudy", "OperatorsName", "AdmittingDiagnosesDescription",
                "PatientAge", "PatientSize", "PatientWeight", "Occupation", "AdditionalPatientHistory",
                "PatientComments", "DeviceSerialNumber", "StationName", "InstitutionName",
                "RequestingPhysician", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers")
_DEID_EMPTY = ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "AccessionNumber", "StudyID")
IDENTIFYING = ("PatientName", "PatientID", *_DEID_EMPTY, *_DEID_REMOVE)


def deidentify(ds: Any, *, pseudonym: str = "ANON") -> Any:
    """Apply the DICOM basic de-identification profile (Retain UIDs option) to ``ds`` in place.

    Patient name and ID become ``pseudonym``; identifying attributes listed in PS3.15 E.1-1
    are removed or emptied; private tags are removed; dates are kept only as the study date
    shifted to 1 January of its year. PatientIdentityRemoved and DeidentificationMethod record
    what was done.
    """
    from pydicom.dataset import Dataset

    def walk(d: Dataset) -> None:
        for kw in _DEID_REMOVE:
            if kw in d:
                delattr(d, kw)
        for kw in _DEID_EMPTY:
            if kw in d:
                setattr(d, kw, "")
        if "PatientName" in d:
            d.PatientName = pseudonym
        if "PatientID" in d:
            d.PatientID = pseudonym
        d.remove_private_tags()
        for elem in list(d):
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)

    walk(ds)
    for kw in ("StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate"):
        if kw in ds and str(getattr(ds, kw)):
            setattr(ds, kw, str(getattr(ds, kw))[:4] + "0101")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "DICOM PS3.15 E.1 Basic Profile; Retain UIDs Option (hfmi_kit)"
    return ds


def write_dicom_seg(labels: np.ndarray, source_files: Sequence[str], out_path: str | Path, *,
                    segment_names: Sequence[str], algorithm: str = "hfmi_kit radiology") -> Path:
    """Write a label map on the source series' grid as a DICOM Segmentation (highdicom).

    ``labels`` is (I, J, K) in the source :class:`Volume`'s indexing (column, row, slice; slice
    k is ``source_files[k]``) with values 0..len(segment_names). The result is de-identified
    (basic profile, Retain UIDs) before it is written atomically.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in source_files]
    if labels.shape[2] != len(sources):
        raise DataError(f"{out_path}: label map has {labels.shape[2]} slices, the source series {len(sources)}")
    frames = np.ascontiguousarray(np.transpose(labels, (2, 1, 0))).astype(np.uint8)  # (slices, rows, cols)
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, version="0.1",
                                              family=codes.cid7162.ArtificialIntelligence)
    descs = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=name,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm if "core" in name.lower() else codes.SCT.Edema,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
        for i, name in enumerate(segment_names)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs, series_instance_uid=hd.UID(), series_number=100,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="hfmi_kit",
        manufacturer_model_name="hfmi_kit radiology", software_versions="0.1", device_serial_number="0")
    deidentify(seg)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp-dcm")
    os.close(fd)
    try:
        seg.save_as(tmp)
        as_created(tmp)  # mkstemp's 0600: the file gets the user's umask
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
