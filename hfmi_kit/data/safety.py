"""Checks a data file passes before any library opens it: nothing in a file may run code, open a
connection or make a reader fetch bytes from another file.

Each check looks at the file's own metadata, without decoding data, and raises
:class:`~hfmi_kit.errors.DataError` naming the file and what it refers to:

- HDF5 (NetCDF-4) files may store a variable's bytes in other files (*external storage*), map
  them from other files (*virtual datasets*) or link groups of other files (*external links*);
  the HDF5 library follows all three silently, so a crafted ``.nc`` could read any file the user
  can read into a forecast or a statistic. :func:`check_netcdf` refuses them.
- Zarr arrays name their codecs in JSON; a ``pickle`` codec (or an object dtype decoded by one)
  unpickles chunks, i.e. runs code in older zarr releases. :func:`check_zarr` refuses them.
- Paths written inside a manifest (``dataset.json``, ``region.json``) must stay inside the folder
  that holds the manifest: :func:`inside` resolves symlinks and refuses ``..`` and absolute paths.
- Rasters are opened by the GeoTIFF driver only (:data:`RASTER_DRIVERS`), so a VRT or another
  format that references other files or URLs is never interpreted (see the carbon sources).
"""

from __future__ import annotations

import json
from pathlib import Path

from hfmi_kit.errors import DataError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
RASTER_DRIVERS = ("GTiff",)  # the one driver rasters open with: COGs are GeoTIFFs; a VRT names other files
_ZARR_META = (".zarray", "zarr.json", ".zmetadata")


def is_hdf5(path: str | Path) -> bool:
    """Whether ``path`` is an HDF5 file (its signature at byte 0, 512, 1024, ...; the user block)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            for offset in (0, 512, 1024, 2048, 4096):
                fh.seek(offset)
                if fh.read(8) == HDF5_SIGNATURE:
                    return True
    except OSError:
        return False
    return False


def check_netcdf(path: str | Path) -> None:
    """Refuse an HDF5-based NetCDF file whose variables read other files (external storage,
    virtual datasets) or whose groups link to other files. Classic NetCDF (CDF-1/2/5) has no
    such references and passes unchanged.

    Raises:
        DataError: naming the file, the object and the file it refers to.
    """
    p = Path(path)
    if not p.is_file() or not is_hdf5(p):
        return
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py comes with the climate, carbon and viz extras
        raise ImportError("checking a NetCDF-4 file needs h5py; install it with `pip install hfmi_kit[climate]`") from e
    try:
        with h5py.File(p, "r") as f:
            _check_group(p, f, "/")
    except DataError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise DataError(f"{p}: not a readable NetCDF-4/HDF5 file ({e})") from e


def _check_group(path: Path, group: object, name: str) -> None:
    import h5py

    for key in group.keys():  # type: ignore[attr-defined]
        link = group.get(key, getlink=True)  # type: ignore[attr-defined]
        where = f"{name.rstrip('/')}/{key}"
        if isinstance(link, h5py.ExternalLink):
            raise DataError(f"{path}: {where} is an external link to {link.filename}:{link.path}; a data file "
                            "must not refer to other files")
        if isinstance(link, h5py.SoftLink):
            continue  # a name inside this file; its target is checked where it lives
        obj = group[key]  # type: ignore[index]
        if isinstance(obj, h5py.Group):
            _check_group(path, obj, where)
        elif isinstance(obj, h5py.Dataset):
            if obj.external:
                raise DataError(f"{path}: variable {where} keeps its data in external file(s) "
                                f"{[str(e[0]) for e in obj.external]}; a data file must not refer to other files")
            if obj.is_virtual:
                sources = sorted({str(v.file_name) for v in obj.virtual_sources()})
                raise DataError(f"{path}: variable {where} is a virtual dataset mapping {sources}; a data file "
                                "must not refer to other files")


def check_zarr(path: str | Path) -> None:
    """Refuse a Zarr store whose metadata asks for a pickle codec or an object dtype.

    Raises:
        DataError: naming the store, the array and the codec.
    """
    root = Path(path)
    if not root.is_dir():
        return
    for meta in sorted(f for f in root.rglob("*") if f.name in _ZARR_META and f.is_file()):
        try:
            doc = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{meta}: corrupt Zarr metadata ({e})") from e
        bad = _pickled(doc)
        if bad:
            raise DataError(f"{root}: {meta.relative_to(root)} asks for {bad}, which unpickles data (can run code); "
                            "re-write the array with numeric dtypes and standard codecs")


def _pickled(doc: object) -> str | None:
    """The first pickle codec or object dtype anywhere in a Zarr metadata document."""
    if isinstance(doc, dict):
        for key in ("id", "name"):
            v = doc.get(key)
            if isinstance(v, str) and "pickle" in v.lower():
                return f"the codec {v!r}"
        dtype = doc.get("dtype", doc.get("data_type"))
        if isinstance(dtype, str) and dtype.lstrip("|<>=") == "O":
            return f"the object dtype {dtype!r}"
        for v in doc.values():
            found = _pickled(v)
            if found:
                return found
    elif isinstance(doc, list):
        for v in doc:
            found = _pickled(v)
            if found:
                return found
    return None


def inside(root: str | Path, rel: str, *, manifest: str | Path) -> Path:
    """``root / rel`` for a path written in ``manifest``: relative, without ``..``, and (symlinks
    resolved) inside ``root``.

    Raises:
        DataError: naming the manifest and the path.
    """
    base = Path(root).resolve()
    text = str(rel)
    parts = Path(text).parts
    if not text or Path(text).is_absolute() or ".." in parts or "\x00" in text or "://" in text:
        raise DataError(f"{manifest}: path {text!r} must be relative to {base.name}/ and stay inside it")
    target = (base / text).resolve()
    if target != base and base not in target.parents:
        raise DataError(f"{manifest}: {text!r} resolves to {target}, outside {base}; data must lie inside the folder "
                        "it was given in")
    return target
