"""Carbon at landscape scale: sources read window by window (folders of rasters in several CRSs,
LAS tiles), windows at the region's edge, maps made and written block by block, an exact resume of
the tile stream, and one clear line for each bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
laspy = pytest.importorskip("laspy")
import torch  # noqa: E402

from hfmi_kit.domains.carbon import tasks as C  # noqa: E402
from hfmi_kit.domains.carbon.synth import LandscapeConfig, generate_region  # noqa: E402
from hfmi_kit.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    return generate_region(tmp_path_factory.mktemp("carbon") / "r", LandscapeConfig(size=64, plots=60, seed=3))


def _copy(region, tmp_path, name="r"):
    dst = tmp_path / name
    shutil.copytree(region, dst)
    return dst


def _set_source_file(root, name, file):
    meta = json.loads((root / "region.json").read_text())
    for s in meta["sources"]:
        if s["name"] == name:
            s["file"] = file
    (root / "region.json").write_text(json.dumps(meta))


def _write(path, data, crs, transform, nodata=-9999.0):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype="float32", crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=16,
                       blockysize=16) as d:
        d.write(data.astype(np.float32))


def _split(src_path, folder, crs_of_quadrant, *, fine=None):
    """Four quadrant rasters of ``src_path`` in ``folder``; quadrant k in ``crs_of_quadrant[k]`` (its
    own CRS: an exact crop; another: reprojected, at ``fine`` metres with nearest when given)."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject
    from rasterio.windows import Window
    from rasterio.windows import transform as win_transform

    folder.mkdir()
    with rasterio.open(src_path) as src:
        H, W = src.height, src.width
        for k, (r0, c0) in enumerate([(0, 0), (0, W // 2), (H // 2, 0), (H // 2, W // 2)]):
            win = Window(c0, r0, W // 2, H // 2)
            data, tr = src.read(window=win), win_transform(win, src.transform)
            crs = crs_of_quadrant[k]
            if crs == src.crs.to_string():
                _write(folder / f"q{k}.tif", data, src.crs, tr)
                continue
            left, top = tr.c, tr.f
            bounds = (left, top - (H // 2) * tr.a, left + (W // 2) * tr.a, top)
            dt, w, h = calculate_default_transform(src.crs, crs, W // 2, H // 2, *bounds, resolution=fine)
            out = np.full((src.count, h, w), -9999.0, np.float32)
            for b in range(src.count):
                reproject(data[b], out[b], src_transform=tr, src_crs=src.crs, dst_transform=dt, dst_crs=crs,
                          resampling=Resampling.nearest, src_nodata=-9999.0, dst_nodata=-9999.0)
            _write(folder / f"q{k}.tif", out, crs, dt)


def _mosaic(folder, grid, path):
    """One GeoTIFF on ``grid`` made from the rasters of ``folder`` by GDAL's whole-raster warp (average),
    the first file in name order winning where several have data: the reference mosaic."""
    from rasterio.warp import Resampling, reproject

    out = None
    for p in sorted(folder.glob("*.tif")):
        with rasterio.open(p) as src:
            part = np.full((src.count, *grid.shape), np.nan, np.float32)
            for b in range(src.count):
                reproject(src.read(b + 1), part[b], src_transform=src.transform, src_crs=src.crs,
                          dst_transform=grid.transform, dst_crs=grid.crs, resampling=Resampling.average,
                          src_nodata=src.nodata, dst_nodata=np.nan, tolerance=0.0)
        out = part if out is None else np.where(np.isnan(out), part, out)
    _write(path, np.nan_to_num(out, nan=-9999.0), grid.crs, grid.transform)


def test_a_region_split_over_four_rasters_in_two_crss_reads_as_its_mosaic(region, tmp_path):
    whole = C.prepare(region)
    # two quadrants cropped in the region's UTM zone 33N, two reprojected to zone 34N at 10 m
    split, mosaic = _copy(region, tmp_path, "split"), _copy(region, tmp_path, "mosaic")
    for e in (1, 2):
        _split(split / f"epoch{e}" / "optical.tif", split / f"epoch{e}" / "optical",
               ["EPSG:32633", "EPSG:32634", "EPSG:32634", "EPSG:32633"], fine=10.0)
        (split / f"epoch{e}" / "optical.tif").unlink()
    _set_source_file(split, "optical", "optical")
    parts = C.prepare(split, in_memory=False)
    grid = parts.grid  # the footprint of the reprojected quadrants is a little larger
    for e in (1, 2):
        _mosaic(split / f"epoch{e}" / "optical", grid, mosaic / f"epoch{e}" / "optical.tif")
    ref = C.prepare(mosaic)
    assert ref.grid.transform == grid.transform and ref.shape == parts.shape
    H, W = parts.shape
    for e, r0, c0 in [(0, 0, 0), (0, 20, 25), (1, 28, 28), (1, 40, 9), (0, H - 24, W - 24)]:
        a, b = ref.window(e, r0, c0, 24, 24), parts.window(e, r0, c0, 24, 24)
        for g in ("optical:blue", "optical:nir", "optical:swir"):
            assert np.array_equal(np.isnan(a[g]), np.isnan(b[g])), (g, e, r0, c0)  # seams: no cell lost or made up
            # GDAL's average warp of a rotated grid differs by ~2e-4 (normalised units) between a window
            # and the whole raster (measured: the same with the whole source); far below sensor noise
            np.testing.assert_allclose(b[g], a[g], atol=1e-3, equal_nan=True, err_msg=f"{g} {(e, r0, c0)}")
    # the quadrants kept in the region's own CRS are read exactly as the original scene
    t0, t1 = whole.grid.transform, grid.transform
    dr, dc = round((t1.f - t0.f) / t0.e), round((t1.c - t0.c) / t0.a)  # the original grid's cells in this one
    a = whole.fields[0]["optical:nir"][:64, :64]
    b = parts.window(0, -dr, -dc, 64, 64)["optical:nir"]
    np.testing.assert_array_equal(b[:30, :30], a[:30, :30])  # (next to a seam, a gap may be filled by the
    np.testing.assert_array_equal(b[34:, 34:], a[34:, 34:])  # neighbouring reprojected quadrant's sliver)
    ok = ~np.isnan(a) & ~np.isnan(b)  # the reprojected ones: close to it, cell by cell
    assert ok.sum() > 0.7 * 64 * 64 and np.corrcoef(a[ok], b[ok])[0, 1] > 0.9


def test_windows_read_from_the_files_equal_the_region_held_in_memory_and_pad_the_edge_with_absent_values(region):
    held = C.prepare(region)
    lazy = C.prepare(region, in_memory=False)
    assert held.in_memory and not lazy.in_memory
    with pytest.raises(DataError, match="read window by window"):
        _ = lazy.fields
    H, W = held.shape
    for e, r0, c0 in [(0, 5, 7), (1, 40, 3), (0, H - 16, W - 16), (1, -8, -8)]:
        a, b = held.window(e, r0, c0, 32, 32), lazy.window(e, r0, c0, 32, 32)
        assert set(a) == set(b)
        for g in a:  # the radar (geographic lat/lon; warped: ~1e-3 from the window, see above) and lidar too
            np.testing.assert_allclose(b[g], a[g], atol=1e-5 if g.startswith(("optical", "lidar")) else 2e-3,
                                       equal_nan=True, err_msg=f"{g} at {(e, r0, c0)}")
    edge = lazy.window(0, H - 16, W - 16, 32, 32)
    for v in edge.values():
        assert np.isnan(v[16:, :]).all() and np.isnan(v[:, 16:]).all()  # beyond the map: absent, never 0
    from hfmi_kit.domains.carbon.model import CarbonNet
    from hfmi_kit.models import get_size

    net = CarbonNet(size=get_size("tiny"), groups=lazy.groups, tile=32, patch=8)
    tb, _, _ = net.tokens({g: torch.from_numpy(v)[None] for g, v in edge.items()})
    pad = tb.padding[0].reshape(-1, 4, 4)[:-1]  # per source group, the 4 x 4 patches (the last: queries)
    assert pad[:, 2:, :].all() and pad[:, :, 2:].all()  # patches beyond the edge are absent tokens


def test_lidar_tiles_give_the_canopy_height_of_the_whole_point_cloud(region, tmp_path):
    r = _copy(region, tmp_path)
    las = laspy.read(str(r / "epoch1" / "lidar.laz"))
    x0, y0 = float(np.median(las.x)), float(np.median(las.y))
    (r / "epoch1" / "lidar").mkdir()
    for k, sel in enumerate([(las.x < x0) & (las.y < y0), (las.x >= x0) & (las.y < y0), (las.x < x0) & (las.y >= y0),
                             (las.x >= x0) & (las.y >= y0)]):
        tile = laspy.LasData(las.header)
        tile.points = las.points[np.asarray(sel)].copy()
        tile.write(str(r / "epoch1" / "lidar" / f"tile_{k}.laz"))
    (r / "epoch1" / "lidar.laz").unlink()
    shutil.move(r / "epoch2" / "lidar.laz", r / "epoch1" / "lidar" / ".hidden.laz")  # hidden files are not read
    _set_source_file(r, "lidar", "lidar")
    (r / "epoch2" / "lidar").mkdir()
    shutil.copy(r / "epoch1" / "lidar" / "tile_0.laz", r / "epoch2" / "lidar" / "tile_0.laz")
    whole, tiled = C.prepare(region), C.prepare(r, in_memory=False)
    a = whole.fields[0]["lidar:chm"][:64, :64]
    b = tiled.window(0, 0, 0, 64, 64)["lidar:chm"]
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(b, a, atol=1e-5, equal_nan=True)  # cells on the tiles' borders merge exactly


def test_maps_made_block_by_block_equal_the_whole_map_and_are_written_as_cogs(region, tmp_path):
    from hfmi_kit.domains.carbon.model import CarbonNet
    from hfmi_kit.models import get_size

    prep = C.prepare(region)
    torch.manual_seed(0)
    net = CarbonNet(size=get_size("tiny"), groups=prep.groups, tile=32, patch=8).eval()
    whole = [C.predict_map(net, f, prep.shape) for f in prep.fields]
    writer = C.MapWriter(prep, tmp_path / "run", net.quantiles)
    stats = C.map_pass(prep, C.model_blocks(net, prep), quantiles=net.quantiles, writer=writer, size=24)
    writer.close()
    dense = C.MapStats.from_maps(prep, whole, net.quantiles, truth=prep.truth)
    for e in range(2):
        np.testing.assert_allclose(stats.cells[e], dense.cells[e], rtol=1e-6, atol=1e-6)
        assert stats.total[e] == pytest.approx(dense.total[e], rel=1e-6)
    assert stats.err["err2"] == pytest.approx(dense.err["err2"], rel=1e-6)
    maps = tmp_path / "run" / "maps"
    assert not list((tmp_path / "run").glob(".maps.tmp-*"))
    from rio_cogeo.cogeo import cog_validate

    for f in maps.glob("*.tif"):
        valid, errors, _ = cog_validate(str(f), quiet=True)
        assert valid and not errors, (f.name, errors)
    with rasterio.open(maps / f"agb_{prep.epochs[0]}.tif") as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.crs == prep.grid.crs and src.transform == prep.grid.transform
        assert src.descriptions[-1] == "agb_mean" and src.tags(1)["units"] == "Mg ha-1"
        np.testing.assert_allclose(src.read(), whole[0], rtol=1e-5, atol=1e-4)
    import xarray as xr

    with xr.open_dataset(maps / "carbon.nc") as ds:
        np.testing.assert_allclose(ds["agb_mean"].values, np.stack([w[-1] for w in whole]), rtol=1e-5, atol=1e-4)
        assert ds["carbon"].attrs["units"] == "Mg ha-1" and "crs_wkt" in ds["spatial_ref"].attrs
    # the scores and the budget from the pass are those of the maps held whole
    test = set(C.split_plots(prep)[1])
    a, b = C.evaluate_maps(prep, stats, set(), test, net.quantiles), C.evaluate_maps(prep, whole, set(), test,
                                                                                     net.quantiles)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_a_failed_map_pass_leaves_no_maps_behind(region, tmp_path):
    prep = C.prepare(region)
    writer = C.MapWriter(prep, tmp_path, [0.05, 0.5, 0.95])
    calls = []

    def block(e, r0, c0, h, w):
        calls.append(r0)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return np.ones((4, h, w))

    with pytest.raises(KeyboardInterrupt):
        try:
            C.map_pass(prep, block, writer=writer, size=16)
        except BaseException:
            writer.abort()
            raise
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_pretraining_on_tiles_read_from_the_files_ends_with_the_same_weights(region, tmp_path):
    from hfmi_kit.domains.carbon.model import CarbonNet
    from hfmi_kit.models import get_size
    from hfmi_kit.train.loop import TrainConfig, Trainer

    prep = C.prepare(region, in_memory=False)

    def make(out):
        torch.manual_seed(0)
        net = CarbonNet(size=get_size("tiny"), groups=prep.groups, tile=16, patch=8)
        cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, progress=False, seed=1)
        return Trainer(net, C.TileCrops(prep, tile=16, length=40, seed=2), config=cfg, out_dir=out,
                       model_config={"domain": "carbon", "task": "pretrain", "model_type": "carbon_net.tiny"})

    straight = make(tmp_path / "a")
    straight.fit()
    make(tmp_path / "b").fit(until=3)
    resumed = make(tmp_path / "b")
    resumed.fit(resume=True)
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("case, message", [
    ("empty-folder", "holds no .tif/.tiff file"),
    ("vrt", "a VRT names other files"),
    ("no-crs-in-folder", "q1.tif: the raster has no CRS"),
    ("bands-in-folder", "q2.tif: 1 band(s), but source 'optical' describes 4"),
    ("las-no-crs", "t0.las: the LAS header declares no CRS"),
    ("inf-in-window", "q3.tif: band 1 (blue) has 1 infinite value(s)"),
])
def test_each_bad_tiled_input_gets_one_clear_line(region, tmp_path, case, message):
    r = _copy(region, tmp_path)
    folder = r / "epoch1" / "optical"
    if case == "las-no-crs":
        (r / "epoch1" / "lidar").mkdir()
        header = laspy.LasHeader(point_format=6, version="1.4")
        las = laspy.LasData(header)
        las.x, las.y, las.z = np.array([500000.0]), np.array([5399000.0]), np.array([1.0])
        las.classification = np.array([2], np.uint8)
        las.write(str(r / "epoch1" / "lidar" / "t0.las"))
        _set_source_file(r, "lidar", "lidar")
    elif case == "vrt":
        (r / "epoch1" / "optical.vrt").write_text("<VRTDataset/>")
        _set_source_file(r, "optical", "optical.vrt")
    else:
        _split(r / "epoch1" / "optical.tif", folder, ["EPSG:32633"] * 4)
        _set_source_file(r, "optical", "optical")
        (r / "epoch2" / "optical").mkdir()
        shutil.move(r / "epoch2" / "optical.tif", r / "epoch2" / "optical" / "all.tif")
        if case == "empty-folder":
            for p in folder.iterdir():
                p.rename(p.with_suffix(".txt"))
        elif case == "no-crs-in-folder":
            with rasterio.open(folder / "q1.tif") as s:
                data, tr = s.read(), s.transform
            _write(folder / "q1.tif", data, None, tr)
        elif case == "bands-in-folder":
            with rasterio.open(folder / "q2.tif") as s:
                data, tr, crs = s.read(1)[None], s.transform, s.crs
            _write(folder / "q2.tif", data, crs, tr)
        elif case == "inf-in-window":
            with rasterio.open(folder / "q3.tif") as s:
                data, tr, crs = s.read(), s.transform, s.crs
            data[0, 3, 3] = np.inf
            _write(folder / "q3.tif", data, crs, tr)
    with pytest.raises(DataError) as e:
        C.prepare(r, in_memory=False).window(0, 0, 0, 64, 64)
    assert message in str(e.value) and "\n" not in str(e.value)


def _as_sentinel2_dn(path, *, tags=False):
    """The generated reflectance as Sentinel-2 L2A stores it: uint16 DN = (reflectance + 0.1) x 10000
    (BOA_ADD_OFFSET -1000), nodata 0; with ``tags`` the scaling is also in the file's GDAL metadata."""
    with rasterio.open(path) as s:
        refl, prof = s.read(), s.profile
    dn = np.where(refl == -9999.0, 0, np.round((refl + 0.1) * 1e4)).astype(np.uint16)
    prof.update(dtype="uint16", nodata=None)
    with rasterio.open(path, "w", **prof) as d:
        d.write(dn)
        if tags:
            d.scales, d.offsets = (1e-4,) * 4, (-0.1,) * 4
            d.nodata = 0
    return refl


@pytest.mark.parametrize("tags", [False, True])
def test_a_real_product_needs_only_its_sensor_named(region, tmp_path, tags):
    from hfmi_kit.domains.carbon.sources import SENSORS

    r = _copy(region, tmp_path)
    refl = [_as_sentinel2_dn(r / f"epoch{e}" / "optical.tif", tags=tags) for e in (1, 2)]
    meta = json.loads((r / "region.json").read_text())
    meta["sources"][0] = {"name": "optical", "file": "optical.tif", "sensor": "sentinel-2-l2a",
                          "bands": ["B02", "B04", "B08", "B11"]}
    (r / "region.json").write_text(json.dumps(meta))
    prep = C.prepare(r, in_memory=False)
    spec = prep.specs[0]
    assert spec.bands == ("b02", "b04", "b08", "b11") and spec.wavelengths_nm == (492.7, 664.6, 832.8, 1613.7)
    s2 = SENSORS["sentinel-2-l2a"]
    H, W = prep.shape
    got = prep.window(0, 0, 0, H, W)
    with rasterio.open(region / "epoch1" / "optical.tif") as src:
        assert src.transform == prep.grid.transform  # the generator's own grid: cells compare directly
    for k, g in enumerate(("optical:b02", "optical:b04", "optical:b08", "optical:b11")):
        i = s2.bands.index(g.split(":")[1])
        want = (refl[0][k] - s2.offset[i]) / s2.scale[i]
        cloud = refl[0][k] == -9999.0
        assert np.isnan(got[g][cloud]).all() and not np.isnan(got[g][~cloud]).any()  # nodata 0 from the sensor
        np.testing.assert_allclose(got[g][~cloud], want[~cloud], atol=1e-4 / s2.scale[i])  # DN rounding


@pytest.mark.parametrize("source, message", [
    ({"name": "optical", "file": "optical.tif", "sensor": "sentinel-3"}, "unknown sensor 'sentinel-3'; known:"),
    ({"name": "optical", "file": "optical.tif", "sensor": "landsat-8-9-c2-l2", "bands": ["sr_b5", "b08"]},
     "band(s) ['b08'] are not landsat-8-9-c2-l2 bands"),
])
def test_a_sensor_description_that_does_not_fit_gets_one_line(region, tmp_path, source, message):
    from hfmi_kit.domains.carbon.sources import open_region

    r = _copy(region, tmp_path)
    meta = json.loads((r / "region.json").read_text())
    meta["sources"][0] = source
    (r / "region.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="region.json") as e:
        open_region(r)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_pretraining_on_a_folder_of_regions_draws_tiles_from_each_and_its_model_fine_tunes_on_another(
        region, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    generate_region(corpus / "a-beech", LandscapeConfig(size=96, plots=10, seed=11))
    generate_region(corpus / "b-spruce", LandscapeConfig(size=64, plots=10, seed=12))
    meta = json.loads((corpus / "b-spruce" / "region.json").read_text())
    meta["sources"] = [s for s in meta["sources"] if s["name"] != "radar"]  # a region without radar
    (corpus / "b-spruce" / "region.json").write_text(json.dumps(meta))
    (corpus / ".cache").mkdir()  # hidden folders and links out of the corpus are not regions
    (corpus / "outside").symlink_to(region, target_is_directory=True)
    assert [p.name for p in C.region_folders(corpus)] == ["a-beech", "b-spruce"]

    preps = [C.prepare(p) for p in C.region_folders(corpus)]
    assert not any(g.startswith("radar") for g in preps[1].groups)
    crops = C.TileCrops(preps, tile=16, length=400, seed=0)
    seen = [crops[i]["inputs"] for i in range(400)]
    assert all(x.keys() == seen[0].keys() for x in seen)
    no_radar = sum(bool(torch.isnan(x["radar:vv"]).all()) for x in seen)
    expected = 64 * 64 * 2 / (64 * 64 * 2 + 96 * 96 * 2)  # cells x epochs
    assert abs(no_radar / 400 - expected) < 0.05, (no_radar, expected)
    assert C.TileCrops(preps[0], tile=16, length=4, seed=0)[3]["inputs"].keys() == \
        C.TileCrops([preps[0]], tile=16, length=4, seed=0)[3]["inputs"].keys()

    model = C.pretrain(data=corpus, out=tmp_path / "pre", steps=4, batch_size=4, tile=16, progress=False)
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["geometry"]["regions"] == ["a-beech", "b-spruce"]
    assert set(cfg["model_kwargs"]["groups"]) == set(preps[0].groups)  # the union: b-spruce adds nothing
    assert [d["file"] for d in cfg["card"]["data"]] == ["a-beech", "b-spruce"]
    ft = C.finetune(ckpt=model, data=region, out=tmp_path / "ft", steps=4, batch_size=4, calibration_folds=0,
                    progress=False)
    assert np.isfinite(json.loads((tmp_path / "pre" / "metrics.json").read_text())["train_loss"])
    assert np.isfinite(ft["rmse_mg_ha"]) and (tmp_path / "ft" / "maps" / "carbon_2001.tif").is_file()

    with pytest.raises(DataError, match="no region.json, and no folder in it holds one"):
        C.region_folders(tmp_path / "pre")
