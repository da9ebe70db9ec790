"""Loader throughput against the raw read of each format, per domain (part of issue 9's entry point).

For every format a domain reads, the time of the library's plain read of the file (what any
script would do first) against hfmi's loader of the same file (checks, unit conversion,
reprojection or resampling to the model grid, encoding). The ratio is the price of the checks
and the geometry; the raw figure is what the disk and the decoder allow.

  climate    Zarr (CF)   xarray ``open_zarr().load()`` | ``load_climate`` (CF checks, units, grid)
             Zarr window xarray ``isel`` per window     | ``ZarrWindowSource.read`` (direct chunk reads)
  radiology  NIfTI       nibabel ``get_fdata``           | ``load_nifti`` + normalise + resample to 3 mm
             DICOM       pydicom ``dcmread`` per slice   | ``load_dicom_series`` (sort, orient, rescale)
  carbon     GeoTIFF     rasterio ``read()``              | ``read_raster`` (nodata, reprojection to the grid)
             LAS         laspy ``read()``                 | ``read_lidar_chm`` (CRS, rasterised canopy height)
  materials  CSV         pandas ``read_csv``              | ``load_property_csv`` + ``encode`` (parse, validate, merge)

    python benchmarks/loaders.py [--domains climate,radiology,carbon,materials] [--data DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from inference import per_call


def best_rate(fn: Callable[[], object], units: float, repeats: int = 3) -> float:
    """``units`` per second of the fastest of ``repeats`` calls (after one warm-up call)."""
    return units / per_call(fn, repeats)


def report(domain: str, fmt: str, unit: str, raw: float, ours: float, note: str = "") -> None:
    print(f"  {domain:9s} {fmt:12s} raw {raw:10.1f} {unit:10s} hfmi {ours:10.1f} {unit:10s} "
          f"({ours / raw:#.3g} x raw){'  ' + note if note else ''}")


def _size_mb(paths: Sequence[Path]) -> float:
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()) / 2**20


def climate(data: Path, repeats: int) -> None:
    import xarray as xr

    from hfmi_kit.data.zarr_source import ZarrWindowSource
    from hfmi_kit.domains.climate.data import load_climate

    mb = xr.open_zarr(data).load().nbytes / 2**20
    raw = best_rate(lambda: xr.open_zarr(data).load(), mb, repeats)
    ours = best_rate(lambda: load_climate(data), mb, repeats)
    report("climate", "Zarr (CF)", "MiB/s", raw, ours, f"{mb:.1f} MiB in memory")
    d = load_climate(data)
    names = [*d.state, *d.forcing]
    ds = xr.open_zarr(data)
    idx = np.random.default_rng(1).integers(1, ds.sizes["time"] - 1, 100)
    src = ZarrWindowSource(data, names)

    def xr_windows() -> None:
        for t in idx:
            ds[names].isel(time=slice(int(t) - 1, int(t) + 2)).to_array().to_numpy()

    def hf_windows() -> None:
        for t in idx:
            src.read(int(t) - 1, int(t) + 2)

    report("climate", "Zarr window", "windows/s", best_rate(xr_windows, len(idx), repeats),
           best_rate(hf_windows, len(idx), repeats), "3 steps x every variable")


def radiology(study: Path, repeats: int) -> None:
    import nibabel as nib
    import pydicom

    from hfmi_kit.domains.radiology import discover
    from hfmi_kit.domains.radiology.data import normalise
    from hfmi_kit.domains.radiology.geometry import to_model_grid
    from hfmi_kit.domains.radiology.io import Volume, _dcm_files, load_dicom_series, load_nifti

    subjects = discover(study)
    files = [(p, m) for s in subjects for m, p in s.images.items()]

    def raw() -> None:
        for p, _ in files:
            nib.load(p).get_fdata(dtype=np.float32)

    def ours() -> None:
        for p, m in files:
            v = load_nifti(p, modality=m)
            x, bg = normalise(v.data, m, str(p))
            to_model_grid(Volume(x, v.affine, str(p), m), 3.0, cval=bg)

    mb = _size_mb([Path(p) for p, _ in files])
    report("radiology", "NIfTI", "volumes/s", best_rate(raw, len(files), repeats),
           best_rate(ours, len(files), repeats), f"{len(files)} volumes, {mb:.1f} MiB")
    dicom = sorted(p.parent for p in study.rglob("*.dcm") if p.parent.name.startswith("dicom"))
    dirs = sorted(set(dicom))
    if not dirs:
        print("  radiology DICOM        (no DICOM series in the study)")
        return
    slices = sum(len(_dcm_files(d)) for d in dirs)

    def raw_dcm() -> None:
        for d in dirs:
            np.stack([pydicom.dcmread(f).pixel_array for f in _dcm_files(d)])

    def ours_dcm() -> None:
        for d in dirs:
            load_dicom_series(d)

    report("radiology", "DICOM", "slices/s", best_rate(raw_dcm, slices, repeats),
           best_rate(ours_dcm, slices, repeats), f"{len(dirs)} series, {slices} slices")


def carbon(region_dir: Path, repeats: int) -> None:
    import laspy
    import rasterio

    from hfmi_kit.domains.carbon.sources import open_region, read_lidar_chm, read_raster, target_grid

    region = open_region(region_dir)
    grid = target_grid(region)
    rasters = [(region.path(e, s), s) for e in range(len(region.epochs)) for s in region.sources
               if s.kind == "raster" and region.path(e, s).exists()]
    clouds = [region.path(e, s) for e in range(len(region.epochs)) for s in region.sources
              if s.kind != "raster" and region.path(e, s).exists()]

    def raw_tif() -> None:
        for p, _ in rasters:
            with rasterio.open(p) as src:
                src.read()

    def ours_tif() -> None:
        for p, s in rasters:
            read_raster(p, s, grid)

    mb = _size_mb([p for p, _ in rasters])
    report("carbon", "GeoTIFF", "MiB/s", best_rate(raw_tif, mb, repeats), best_rate(ours_tif, mb, repeats),
           f"{len(rasters)} files, {mb:.1f} MiB, onto a {grid.shape} grid")
    if clouds:
        points = sum(int(laspy.open(str(p)).header.point_count) for p in clouds)

        def raw_las() -> None:
            for p in clouds:
                las = laspy.read(str(p))
                np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)

        def ours_las() -> None:
            for p in clouds:
                read_lidar_chm(p, grid)

        report("carbon", "LAS", "Mpoints/s", best_rate(raw_las, points / 1e6, repeats),
               best_rate(ours_las, points / 1e6, repeats), f"{len(clouds)} files, {points / 1e6:.2f} M points")


def materials(csv: Path, repeats: int) -> None:
    import pandas as pd

    from hfmi_kit.domains.materials import chem
    from hfmi_kit.domains.materials.tables import load_property_csv

    rows = len(pd.read_csv(csv))

    def ours() -> None:
        chem._parse.cache_clear()  # time the first load of a file, not the memoised re-load
        t = load_property_csv(csv, duplicates="mean")
        chem.encode(t.parsed)

    report("materials", "CSV", "rows/s", best_rate(lambda: pd.read_csv(csv), rows, repeats),
           best_rate(ours, rows, repeats), f"{rows} rows; hfmi parses every formula with pymatgen")


def run(domains: Sequence[str], data_dir: Path, repeats: int = 3) -> None:
    """Print the loader figures of ``domains`` on the small scorecard's data under ``data_dir``
    (generated there when missing)."""
    from hfmi_kit.scorecard import plan_of

    print("loader throughput against the raw read of each format (best of "
          f"{repeats}, after a warm-up; files in the page cache):")
    fns = {"climate": climate, "radiology": radiology, "carbon": carbon, "materials": materials}
    for d in domains:
        data = plan_of(d).data(data_dir, "small")
        fns[d](Path(data.get("pretrain_data", data["data"])), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", default="climate,radiology,carbon,materials")
    ap.add_argument("--data", default="", help="data folder (default: a temporary one)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(a.domains.split(","), Path(a.data or tmp), a.repeats)


if __name__ == "__main__":
    main()
