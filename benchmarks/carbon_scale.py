"""Carbon at landscape scale: a region far larger than memory, read window by window.

Phases (``--phases``, comma-separated):

- ``generate``: a region of ``--size`` x ``--size`` cells at 20 m (default 10,000: 200 km a side,
  a Sentinel-2 tile at 20 m is 5,490), written block by block as cloud-optimised GeoTIFFs the
  way products come: ``optical`` 10 Sentinel-2 L2A bands (B02-B12 at 20 m) as uint16 with the
  products' scale 1e-4 and nodata 0 in the files' tags (clouds are nodata), ``radar``
  Sentinel-1 VV/VH backscatter in dB (float32), ``chm`` a lidar canopy-height model in cm
  (uint16, scale 0.01) covering flight strips; ``--plots`` field plots of 1 ha with their trees
  (Chave et al. 2014) drawn from the biomass field. Wall time and size on disk.
- ``read``: random windows read by the region's readers (``Prepared.window``: every source,
  nodata, scale and normalisation applied) against rasterio's raw windowed ``read()`` of the
  same windows of the same files; both rates in windows/s at the model's tile (32) and at 256,
  the page cache warm for both (an untimed pass first).
- ``pretrain``: ``hfmi pretrain carbon`` on the region in a child process: wall time and peak
  resident memory (target < 3 GB).
- ``map``: ``hfmi finetune carbon --from scratch`` on the plots, then the whole region mapped
  block by block and written as COGs and a CF NetCDF, in a child process: wall time, peak
  memory, the COG layout check (GDAL's ``LAYOUT=COG`` and the overview count) of each map.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/carbon_scale.py --size 10000 --out runs/carbon_scale
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
SOIL = np.array([0.08, 0.10, 0.12, 0.15, 0.18, 0.20, 0.25, 0.26, 0.30, 0.24])
LEAF = np.array([0.02, 0.05, 0.03, 0.08, 0.25, 0.35, 0.45, 0.46, 0.20, 0.10])
BLOCK = 1024


def _field(coarse: np.ndarray, size: int, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """A smooth field on cells [r0, r0 + h) x [c0, c0 + w), bilinear from a coarse lattice."""
    from scipy.ndimage import map_coordinates

    k = (coarse.shape[0] - 1) / (size - 1)
    rr, cc = np.meshgrid((np.arange(r0, r0 + h) * k).astype(np.float32), (np.arange(c0, c0 + w) * k).astype(np.float32),
                         indexing="ij")
    return map_coordinates(coarse, [rr, cc], order=1, mode="nearest").astype(np.float32)


def generate(out: Path, size: int, plots: int, seed: int) -> dict[str, float]:
    import pandas as pd
    import rasterio
    import rasterio.shutil
    from pyproj import Transformer
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from hfmi_kit.domains.carbon.synth import chave_agb_kg

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    ep = out / "epoch1"
    ep.mkdir(exist_ok=True)
    res, x0, y0, epsg = 20.0, 300000.0, 5600000.0, 32633
    tr = from_origin(x0, y0, res, res)
    n_c = max(8, size // 40)  # a biomass field varying over ~800 m
    agb_c = np.clip(150 + 120 * rng.standard_normal((n_c, n_c)), 0, 450).astype(np.float32)
    cloud_c = rng.standard_normal((max(4, size // 200), max(4, size // 200))).astype(np.float32)
    moist_c = rng.random((max(4, size // 100), max(4, size // 100))).astype(np.float32)
    common = {"driver": "GTiff", "width": size, "height": size, "crs": f"EPSG:{epsg}", "transform": tr,
              "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate", "BIGTIFF": "YES"}
    files = {"optical": (ep / ".optical.tif", {"count": 10, "dtype": "uint16", "nodata": 0}),
             "radar": (ep / ".radar.tif", {"count": 2, "dtype": "float32", "nodata": -9999.0, "predictor": 3}),
             "chm": (ep / ".chm.tif", {"count": 1, "dtype": "uint16", "nodata": 65535})}
    ds = {k: rasterio.open(p, "w", **common, **kw) for k, (p, kw) in files.items()}
    strip = size // 6
    for r0 in range(0, size, BLOCK):
        for c0 in range(0, size, BLOCK):
            h, w = min(BLOCK, size - r0), min(BLOCK, size - c0)
            win = Window(c0, r0, w, h)
            agb = np.clip(_field(agb_c, size, r0, c0, h, w) + rng.normal(0, 15, (h, w)).astype(np.float32), 0, None)
            fc = 1 - np.exp(-agb / 80.0)
            refl = SOIL[:, None, None] * (1 - fc) + LEAF[:, None, None] * fc + rng.normal(0, 0.008, (10, h, w))
            dn = np.clip(np.round(refl * 1e4), 1, 65534).astype(np.uint16)
            dn[:, _field(cloud_c, size, r0, c0, h, w) > 1.1] = 0  # clouds: nodata
            ds["optical"].write(dn, window=win)
            t = np.exp(-2 * 0.004 * agb / np.cos(np.deg2rad(38.0)))
            m = _field(moist_c, size, r0, c0, h, w)
            radar = [10 * np.log10((sv * (1 - t) + ss * (0.6 + 0.8 * m) * t) * rng.gamma(4.0, 0.25, (h, w)))
                     for sv, ss in ((0.12, 0.05), (0.03, 0.008))]
            ds["radar"].write(np.stack(radar).astype(np.float32), window=win)
            chm = np.clip(3.5 * agb ** 0.45 + rng.normal(0, 1.5, (h, w)), 0, 60)
            cols = np.arange(c0, c0 + w)
            flown = ((cols // strip) % 3 == 0)[None, :].repeat(h, 0)  # every third strip flown
            ds["chm"].write(np.where(flown, np.round(chm * 100), 65535).astype(np.uint16)[None], window=win)
    for k, d in ds.items():
        if k == "optical":
            for i, b in enumerate(S2_BANDS, start=1):
                d.set_band_description(i, b)
            d.scales, d.offsets = (1e-4,) * 10, (0.0,) * 10
        elif k == "chm":
            d.scales, d.offsets = (0.01,), (0.0,)
            d.set_band_description(1, "chm")
        else:
            d.set_band_description(1, "VV")
            d.set_band_description(2, "VH")
        d.close()
    t_blocks = time.perf_counter() - t0
    for k, (p, _) in files.items():
        rasterio.shutil.copy(p, ep / f"{k}.tif", driver="COG", COMPRESS="DEFLATE", BLOCKSIZE="512",
                             OVERVIEW_RESAMPLING="AVERAGE", BIGTIFF="YES")
        p.unlink()
    # plots on a lattice of 5 x 5-cell squares, trees drawn until the plot holds the field's biomass
    to_geo = Transformer.from_crs(epsg, 4326, always_xy=True)
    slots = rng.choice((size // 5) ** 2, size=plots, replace=False)
    prow, trows = [], []
    for j, s in enumerate(slots):
        r, c = (s // (size // 5)) * 5, (s % (size // 5)) * 5
        target = float(_field(agb_c, size, r + 2, c + 2, 1, 1)[0, 0])  # Mg/ha over 1 ha
        lon, lat = to_geo.transform(x0 + (c + 2.5) * res, y0 - (r + 2.5) * res)
        prow.append({"plot_id": f"P{j:05d}", "epoch": 2020, "lon": round(lon, 7), "lat": round(lat, 7),
                     "size_m": 100.0})
        total = 0.0
        while total < target * 1000:
            d = float(rng.uniform(10, 70))
            hgt = float(np.clip(1.3 + 35 * (1 - np.exp(-0.04 * d)) + rng.normal(0, 2), 2, 60))
            rho = float(rng.uniform(0.4, 0.8))
            total += float(chave_agb_kg(d, hgt, rho))
            trows.append({"plot_id": f"P{j:05d}", "epoch": 2020, "dbh_cm": round(d, 1), "height_m": round(hgt, 1),
                          "wood_density_g_cm3": round(rho, 3)})
    pd.DataFrame(prow).to_csv(out / "plots.csv", index=False)
    pd.DataFrame(trows).to_csv(out / "trees.csv", index=False)
    meta = {"name": f"generated landscape {size} x {size}", "epochs": [2020],
            "grid": {"crs": f"EPSG:{epsg}", "resolution_m": res}, "licence": "CC0 (generated)",
            "description": "benchmarks/carbon_scale.py: a landscape far larger than memory",
            "sources": [
                {"name": "optical", "file": "optical.tif", "kind": "raster", "bands": [b.lower() for b in S2_BANDS],
                 "units": "", "offset": [0.1] * 10, "scale": [0.1] * 10},
                {"name": "radar", "file": "radar.tif", "kind": "raster", "bands": ["vv", "vh"], "units": "",
                 "offset": [-10.0, -17.0], "scale": [2.5, 3.0], "resampling": "bilinear"},
                {"name": "lidar", "file": "chm.tif", "kind": "raster", "bands": ["chm"], "units": "",
                 "offset": [15.0], "scale": [10.0]}]}
    (out / "region.json").write_text(json.dumps(meta, indent=1) + "\n")
    gb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**30
    return {"cells": float(size * size), "blocks_s": t_blocks, "wall_s": time.perf_counter() - t0, "disk_gib": gb,
            "plots": float(plots), "trees": float(len(trows))}


def read(region: Path, n: int, seed: int) -> dict[str, float]:
    import rasterio
    from rasterio.windows import Window

    from hfmi_kit.domains.carbon.tasks import prepare

    prep = prepare(region, in_memory=False)  # what a region larger than memory does
    H, W = prep.shape
    files = [prep.root / "epoch1" / s.file for s in prep.specs]
    out: dict[str, float] = {"in_memory": float(prep.in_memory)}
    for t in (32, 256):
        rng = np.random.default_rng(seed)
        corners = [(int(rng.integers(0, H - t)), int(rng.integers(0, W - t))) for _ in range(n)]

        def raw(corners: list[tuple[int, int]] = corners, t: int = t) -> None:
            handles = [rasterio.open(p) for p in files]  # fresh: GDAL's block cache starts empty
            for r, c in corners:
                for h in handles:
                    h.read(window=Window(c, r, t, t))
            for h in handles:
                h.close()

        def ours(corners: list[tuple[int, int]] = corners, t: int = t) -> None:
            for reader in prep.readers[0].values():
                reader._reset()  # the same: its files reopened, no decoded block kept
            for r, c in corners:
                prep.window(0, r, c, t, t)

        raw()  # the page cache warm for both
        ours()
        rates: dict[str, list[float]] = {"raw": [], "ours": []}
        for name, fn in (("raw", raw), ("ours", ours), ("raw", raw), ("ours", ours)):
            t0 = time.perf_counter()
            fn()
            rates[name].append(n / (time.perf_counter() - t0))
        out[f"raw_windows_s_{t}"] = max(rates["raw"])
        out[f"ours_windows_s_{t}"] = max(rates["ours"])
        out[f"ratio_{t}"] = out[f"ours_windows_s_{t}"] / out[f"raw_windows_s_{t}"]
    return out


def child(cmd: list[str]) -> dict[str, float]:
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if r.returncode:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode})")
    return {"wall_s": wall, "peak_gib": max(peak, before) / 2**20, "tail": r.stdout.strip().splitlines()[-1:]}


def cog_check(maps: Path) -> dict[str, str]:
    """Per map: rio-cogeo's validation (``rio cogeo validate``), GDAL's layout tag, the overviews."""
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    out = {}
    for p in sorted(maps.glob("*.tif")):
        valid, errors, warnings = cog_validate(str(p), quiet=True)
        with rasterio.open(p) as src:
            out[p.name] = (f"valid={valid} errors={errors} warnings={len(warnings)} "
                           f"LAYOUT={src.tags(ns='IMAGE_STRUCTURE').get('LAYOUT')} overviews={src.overviews(1)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=10000)
    ap.add_argument("--plots", type=int, default=300)
    ap.add_argument("--windows", type=int, default=400)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--phases", default="generate,read,pretrain,map")
    ap.add_argument("--out", type=Path, default=Path("runs/carbon_scale"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the generated region between runs")
    a = ap.parse_args()
    region = a.out / "region"
    hfmi = [sys.executable, "-m", "hfmi_kit.cli"]
    phases = a.phases.split(",")
    report: dict[str, object] = {}
    if "generate" in phases:
        if region.exists() and not a.keep:
            shutil.rmtree(region)
        if not region.exists():
            report["generate"] = generate(region, a.size, a.plots, a.seed)
            print("generate", json.dumps(report["generate"]), flush=True)
    if "read" in phases:
        report["read"] = read(region, a.windows, a.seed)
        print("read", json.dumps(report["read"]), flush=True)
    if "pretrain" in phases:
        shutil.rmtree(a.out / "pre", ignore_errors=True)
        report["pretrain"] = child([*hfmi, "pretrain", "carbon", "--data", str(region), "--config", "tiny",
                                    "--steps", str(a.steps), "--out", str(a.out / "pre")])
        print("pretrain", json.dumps(report["pretrain"]), flush=True)
    if "map" in phases:
        shutil.rmtree(a.out / "ft", ignore_errors=True)
        report["map"] = child([*hfmi, "finetune", "carbon", "--from", "scratch", "--data", str(region),
                               "--steps", str(a.steps), "--calibration-folds", "0", "--out", str(a.out / "ft")])
        report["map"]["cogs"] = cog_check(a.out / "ft" / "maps")
        print("map", json.dumps(report["map"]), flush=True)
    (a.out / "carbon_scale.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
