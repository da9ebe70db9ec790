"""Real files end to end: a Landsat 7 scene (a stripped byte GeoTIFF, nodata 0) and an airborne
lidar tile in a CRS in feet (Autzen, Oregon) read as carbon sources, pretrained on without field
plots; the allometry against 31 measured black cherry trees. See tests/data/carbon_real/README.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
laspy = pytest.importorskip("laspy")

from hfmi_kit.domains.carbon import tasks as C  # noqa: E402
from hfmi_kit.domains.carbon.synth import chave_agb_kg  # noqa: E402
from hfmi_kit.errors import DataError  # noqa: E402

DATA = Path(__file__).parent / "data" / "carbon_real"
LANDSAT = {"name": "optical", "file": "scene", "kind": "raster", "bands": ["red", "green", "blue"], "units": "",
           "wavelengths_nm": [660.0, 560.0, 485.0], "offset": [60.0, 65.0, 70.0], "scale": [50.0, 50.0, 50.0]}
LIDAR = {"name": "lidar", "file": "tiles", "kind": "lidar", "bands": ["chm"], "units": "m", "offset": [10.0],
         "scale": [8.0]}


def _region(root: Path, sources: list[dict], files: dict[str, Path], grid: dict, year: int = 2010) -> Path:
    for folder, f in files.items():
        (root / "epoch1" / folder).mkdir(parents=True)
        shutil.copy(f, root / "epoch1" / folder / f.name)
    (root / "region.json").write_text(json.dumps({"name": root.name, "epochs": [year], "sources": sources,
                                                  "grid": grid, "licence": "see tests/data/carbon_real"}))
    return root


def test_a_real_landsat_scene_is_read_as_stored_and_pretrained_on_without_plots(tmp_path):
    root = _region(tmp_path / "bahamas", [LANDSAT], {"scene": DATA / "landsat7_rgb.tif"},
                   {"crs": "EPSG:32618", "resolution_m": 300.0379266750948})
    prep = C.prepare(root, in_memory=False)
    with rasterio.open(DATA / "landsat7_rgb.tif") as src:
        raw = src.read().astype(np.float32)
        # the grid's cells are the scene's pixels (same CRS and cell size), so values pass unresampled
        col, row = ~src.transform * (prep.grid.transform.c, prep.grid.transform.f)
        assert abs(col - round(col)) < 1e-3 and abs(row - round(row)) < 1e-3
        # the scene's pixels are 300.0379 x 300.0418 m, the grid's square: 1.3e-5 px drift per pixel
        assert prep.grid.shape == (src.height, src.width)
    r0, c0 = int(round(row)) + 10, int(round(col)) + 20
    x = prep.window(0, 10, 20, 64, 64)
    want = raw[0, r0:r0 + 64, c0:c0 + 64]
    want = np.where(want == 0, np.nan, (want - 60.0) / 50.0)
    got = x["optical:red"]
    # GDAL's average gives a nodata pixel the value of a neighbour that reaches into it by 1e-3 px
    assert (np.isnan(got) != np.isnan(want)).sum() <= 4
    both = ~np.isnan(got) & ~np.isnan(want)
    np.testing.assert_allclose(got[both], want[both], atol=0.5 / 50)  # within half a DN
    assert 0.1 < np.isnan(x["optical:red"]).mean() < 0.9  # the scene's nodata collar is absent, not zero

    model = C.pretrain(data=root, out=tmp_path / "pre", steps=3, batch_size=4, tile=32, progress=False)
    assert np.isfinite(json.loads((tmp_path / "pre" / "metrics.json").read_text())["train_loss"])
    card = json.loads((model / "config.json").read_text())["card"]
    assert card["data"][0]["file"] == "bahamas"
    with pytest.raises(DataError, match="no field plots .* an unlabelled region serves pretraining only"):
        C.finetune(ckpt=model, data=root, out=tmp_path / "ft", steps=2, progress=False)
    assert not (tmp_path / "ft" / "model").exists()


def test_a_real_lidar_tile_in_feet_gives_a_canopy_height_model_in_metres(tmp_path):
    root = _region(tmp_path / "autzen", [LIDAR], {"tiles": DATA / "autzen_trim.laz"},
                   {"crs": "EPSG:32610", "resolution_m": 10.0})
    prep = C.prepare(root)
    chm = prep.fields[0]["lidar:chm"][: prep.shape[0], : prep.shape[1]] * 8.0 + 10.0

    # the same model computed here from the points: highest return minus mean ground, feet -> metres
    from pyproj import Transformer

    las = laspy.read(str(DATA / "autzen_trim.laz"))
    crs = las.header.parse_crs()
    assert crs.axis_info[0].unit_name == "foot"
    x, y = Transformer.from_crs(crs, "EPSG:32610", always_xy=True).transform(np.asarray(las.x), np.asarray(las.y))
    r, c = prep.grid.rowcol(x, y)
    z, ground = np.asarray(las.z) * 0.3048, np.asarray(las.classification) == 2
    H, W = prep.shape
    ok = (r >= 0) & (r < H) & (c >= 0) & (c < W)
    idx, n = r[ok] * W + c[ok], H * W
    top = np.full(n, -np.inf)
    np.maximum.at(top, idx, z[ok])
    count = np.bincount(idx, minlength=n)
    gs, gc = np.bincount(idx[ground[ok]], weights=z[ok][ground[ok]], minlength=n), np.bincount(idx[ground[ok]],
                                                                                                 minlength=n)
    want = np.where((count >= 3) & (gc > 0), np.clip(top - gs / np.maximum(gc, 1), 0, None), np.nan).reshape(H, W)
    np.testing.assert_allclose(chm, want, atol=1e-4, equal_nan=True)
    valid = chm[np.isfinite(chm)]
    assert valid.size > 500
    # heights of a city park and stadium in metres: in feet the 99th percentile would be > 60
    assert 5 < np.percentile(valid, 99) < 45, np.percentile(valid, [50, 99])


def test_a_lidar_tile_without_a_crs_needs_the_crs_named_in_region_json(tmp_path):
    las = laspy.read(str(DATA / "autzen_trim.laz"))
    bare = laspy.LasData(laspy.LasHeader(point_format=3, version="1.2"))
    bare.header.scales, bare.header.offsets = las.header.scales, las.header.offsets
    bare.x, bare.y, bare.z, bare.classification = las.x, las.y, las.z, las.classification
    bare.write(str(tmp_path / "t.las"))
    root = _region(tmp_path / "a", [LIDAR], {"tiles": tmp_path / "t.las"}, {"crs": "EPSG:32610", "resolution_m": 10.0})
    no_crs = "t.las: the LAS header declares no CRS; .* name it as the lidar source's 'crs'"
    with pytest.raises(DataError, match=no_crs):
        C.prepare(root)
    meta = json.loads((root / "region.json").read_text())
    meta["sources"][0]["crs"] = "EPSG:2994"  # NAD83(HARN) / Oregon GIC Lambert (ft): Autzen's CRS by its code
    (root / "region.json").write_text(json.dumps(meta))
    prep = C.prepare(root)
    ref = C.prepare(_region(tmp_path / "b", [LIDAR], {"tiles": DATA / "autzen_trim.laz"},
                            {"crs": "EPSG:32610", "resolution_m": 10.0}))
    assert prep.shape == ref.shape
    np.testing.assert_allclose(prep.fields[0]["lidar:chm"], ref.fields[0]["lidar:chm"], atol=1e-3, equal_nan=True)
    for bad, message in (("+proj=utm +zone=10 +nadgrids=/etc/passwd", "must name a CRS as AUTHORITY:CODE"),
                         ("EPSG:999999", "is not a CRS pyproj knows")):
        meta["sources"][0]["crs"] = bad
        (root / "region.json").write_text(json.dumps(meta))
        with pytest.raises(DataError, match=message):
            C.prepare(root)


def test_the_allometry_against_31_measured_black_cherry_trees():
    import pandas as pd

    t = pd.read_csv(DATA / "black_cherry_trees.csv")
    d_cm, h_m, v_m3 = t["Girth"] * 2.54, t["Height"] * 0.3048, t["Volume"] * 0.0283168
    agb = chave_agb_kg(d_cm, h_m, 0.47)  # black cherry: basic wood density 0.47 g cm-3 (USDA Wood Handbook)
    stem = v_m3 * 470.0  # dry mass of the measured timber [kg]
    assert np.corrcoef(np.log(agb), np.log(stem))[0, 1] > 0.97
    # the whole tree (branches, stump, top) against the timber of the stem: expansion factors of
    # temperate hardwoods lie around 1.2-2; a unit error (inches for cm, feet for m) leaves this band
    ratio = agb / stem
    assert 1.2 < np.median(ratio) < 2.2 and ratio.min() > 1.0, ratio.describe()
