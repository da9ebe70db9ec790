"""Carbon: the landscape generator, reading and aligning real formats (GeoTIFF, LAS, CSV), and
clear errors for bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
laspy = pytest.importorskip("laspy")

from hfmi_kit.domains.carbon import sources as S  # noqa: E402
from hfmi_kit.domains.carbon.synth import LandscapeConfig, chave_agb_kg, generate_region, write_geotiff  # noqa: E402
from hfmi_kit.domains.carbon.tasks import prepare  # noqa: E402
from hfmi_kit.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    return generate_region(tmp_path_factory.mktemp("carbon") / "r", LandscapeConfig(size=64, plots=60, seed=1))


def _copy(region, tmp_path):
    dst = tmp_path / "r"
    shutil.copytree(region, dst)
    return dst


def test_chave_allometry():
    # a 30 cm, 25 m tree of wood density 0.6: 0.0673 * (0.6 * 900 * 25) ** 0.976 kg
    assert chave_agb_kg(30, 25, 0.6) == pytest.approx(0.0673 * 13500**0.976)


def test_generated_region_aligns_and_plots_match_the_truth(region):
    prep = prepare(region)
    assert prep.grid.crs.to_epsg() == 32633 and prep.grid.resolution == 20 and prep.shape == (64, 64)
    f = prep.fields[0]
    assert set(f) == {"optical:blue", "optical:red", "optical:nir", "optical:swir", "radar:vv", "radar:vh", "lidar:chm"}
    truth = prep.truth[0]
    assert 20 < truth.mean() < 300 and truth.max() < 2000
    # radar came on a geographic grid: reprojected, it covers the map and rises with biomass
    vv = f["radar:vv"][:64, :64]
    assert np.isfinite(vv).all() and np.corrcoef(vv.ravel(), truth.ravel())[0, 1] > 0.3
    # clouds are declared nodata: absent, not zero; lidar covers only its strips
    assert 0.05 < np.isnan(f["optical:nir"][:64, :64]).mean() < 0.4
    chm = f["lidar:chm"][:64, :64]
    assert 0.4 < np.isnan(chm).mean() < 0.8
    ok = np.isfinite(chm)
    assert np.corrcoef(chm[ok], truth[ok])[0, 1] > 0.5
    # 1-ha plots cover 5 x 5 cells; stem positions put every tree in its cell, so each cell's
    # biomass and the plot's (their mean) match the truth up to the rounding of the tree sizes
    p = prep.plots[0]
    assert len(p.ids) == 60 and p.stem_mapped and len(p.pix_plot) == 60 * 25
    assert np.abs(p.pix_agb - truth[p.pix_rows, p.pix_cols]).max() < 3.0  # trees rounded to 0.1 cm / m
    block = np.array([truth[p.pix_rows[p.pix_plot == k], p.pix_cols[p.pix_plot == k]].mean() for k in range(60)])
    assert np.abs(p.agb - block).max() < 1.0
    assert np.abs(p.rows - p.pix_rows[p.pix_plot == 0].mean()).min() <= 1  # the centre cell
    # the change is known: disturbance removes biomass somewhere, growth adds it elsewhere
    d = prep.truth[1] - prep.truth[0]
    assert d.min() < -50 and (d > 0).mean() > 0.3


def test_target_grid_is_chosen_not_taken_from_the_first_file(region, tmp_path):
    r = _copy(region, tmp_path)
    meta = json.loads((r / "region.json").read_text())
    del meta["grid"]
    (r / "region.json").write_text(json.dumps(meta))
    g = S.target_grid(S.open_region(r))
    assert g.crs.to_epsg() == 32633 and g.resolution == 20  # UTM zone of the centre, 20 m default
    g40 = S.target_grid(S.open_region(r), resolution=40)
    assert g40.shape == (32, 32)
    g_geo = S.target_grid(S.open_region(r), crs="EPSG:3035", resolution=25)  # ETRS89-LAEA, the user's choice
    assert g_geo.crs.to_epsg() == 3035 and g_geo.resolution == 25


def test_a_new_source_is_added_by_describing_it(region, tmp_path):
    r = _copy(region, tmp_path)
    with rasterio.open(r / "epoch1" / "optical.tif") as src:
        red, nir = src.read(2), src.read(3)
        ndvi = np.where(red > -9000, (nir - red) / (nir + red), -9999.0)
        crs, tr = src.crs, src.transform
    for e in (1, 2):
        write_geotiff(r / f"epoch{e}" / "ndvi.tif", ndvi, crs=crs, transform=tr, nodata=-9999.0, band_names=["ndvi"],
                      units="1", description="NDVI")
    meta = json.loads((r / "region.json").read_text())
    meta["sources"].append({"name": "ndvi", "file": "ndvi.tif", "kind": "raster", "bands": ["ndvi"], "units": "1",
                            "offset": [0.6], "scale": [0.2]})
    (r / "region.json").write_text(json.dumps(meta))
    prep = prepare(r)
    assert "ndvi:ndvi" in prep.groups and "ndvi:ndvi" in prep.fields[0]
    assert np.nanmax(np.abs(prep.fields[0]["ndvi:ndvi"])) < 10  # its own normalisation applied


def _bad(region, tmp_path, edit, needle):
    r = _copy(region, tmp_path)
    edit(r)
    with pytest.raises(DataError, match=needle):
        p = prepare(r)
        S.read_plots(S.open_region(r), 1997, p.grid)


def _rewrite(path, **changes):
    with rasterio.open(path) as src:
        data, profile = src.read(), src.profile
    profile.update(changes)
    path.unlink()
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def test_bad_inputs_name_the_file_and_problem(region, tmp_path):
    _bad(region, tmp_path / "a", lambda r: _rewrite(r / "epoch1" / "radar.tif", crs=None),
         "radar.tif: the raster has no CRS")
    _bad(region, tmp_path / "b", lambda r: _rewrite(r / "epoch1" / "optical.tif", nodata=None),
         "optical.tif: nodata is not declared")

    def shift(r):
        with rasterio.open(r / "epoch2" / "optical.tif") as src:
            t = src.transform
        _rewrite(r / "epoch2" / "optical.tif", transform=rasterio.Affine(t.a, 0, t.c + 1e6, 0, t.e, t.f))
    _bad(region, tmp_path / "c", shift, "do not overlap")

    def truncate(r):
        p = r / "epoch1" / "optical.tif"
        p.write_bytes(p.read_bytes()[:2000])
    _bad(region, tmp_path / "d", truncate, "optical.tif")

    def far_plot(r):
        t = (r / "plots.csv").read_text().splitlines()
        cells = t[1].split(",")
        cells[2] = "20.5"  # lon far east of the map
        (r / "plots.csv").write_text("\n".join([t[0], ",".join(cells), *t[2:]]) + "\n")
    _bad(region, tmp_path / "e", far_plot, "lies outside the map")

    def edge_plot(r):  # a 1-ha plot whose centre lies 40 m inside the map's west edge
        t = (r / "plots.csv").read_text().splitlines()
        cells = t[1].split(",")
        from pyproj import Transformer

        lon, lat = Transformer.from_crs(32633, 4326, always_xy=True).transform(500040.0, 5399400.0)
        cells[2], cells[3] = f"{lon:.7f}", f"{lat:.7f}"
        (r / "plots.csv").write_text("\n".join([t[0], ",".join(cells), *t[2:]]) + "\n")
    _bad(region, tmp_path / "e2", edge_plot, "plot P0000 .* lies partly outside the map")

    def first_tree(column, value):
        def edit(r):
            t = (r / "trees.csv").read_text().splitlines()
            cells = t[1].split(",")
            cells[t[0].split(",").index(column)] = value
            (r / "trees.csv").write_text("\n".join([t[0], ",".join(cells), *t[2:]]) + "\n")
        return edit
    _bad(region, tmp_path / "e3", first_tree("x_m", "130.0"),
         r"trees.csv: row 2: x_m=.*130.* lies outside plot P\d+ \(0..100 m")
    _bad(region, tmp_path / "f", first_tree("height_m", "450"),
         r"trees.csv: row 2: height_m=.*450.* outside the plausible range")

    def no_ground(r):
        las = laspy.read(str(r / "epoch1" / "lidar.laz"))
        las.classification = np.full(len(las.points), 5, dtype=np.uint8)
        las.write(str(r / "epoch1" / "lidar.laz"))
    _bad(region, tmp_path / "g", no_ground, "lidar.laz: no ground returns")

    def not_las(r):
        (r / "epoch2" / "lidar.laz").write_bytes(b"not a las file")
    _bad(region, tmp_path / "h", not_las, "lidar.laz: not a readable LAS/LAZ")


def test_station_record_uses_the_real_mauna_loa_background(region):
    st = S.read_station(S.open_region(region))
    assert st["date"].is_monotonic_increasing and 355 < st["background_ppm"].mean() < 375  # 1995-2001 at MLO
    amp = st.groupby(st["date"].dt.month)["co2_ppm"].mean() - st.groupby(st["date"].dt.month)["background_ppm"].mean()
    assert amp.max() - amp.min() > 3  # a local seasonal drawdown on top of the background


def test_widen_moves_the_interval_by_its_width_and_keeps_quantiles_ordered():
    from hfmi_kit.domains.carbon.tasks import widen

    q = np.array([[[10.0, 0.5]], [[20.0, 1.0]], [[30.0, 2.0]], [[21.0, 1.1]]])  # q05, q50, q95, mean
    out = widen([q], 0.5, (0.05, 0.5, 0.95))[0]  # half the width (20 Mg/ha) on each side
    assert out[0, 0, 0] == 0.0 and out[2, 0, 0] == 40.0
    assert out[2, 0, 1] == 2.75 and out[0, 0, 1] == 0.0  # a 1.5-wide interval moves by 0.75, never below 0
    assert (out[1] == q[1]).all() and (out[3] == q[3]).all()  # median and mean untouched
    narrow = widen([q], -5.0, (0.05, 0.5, 0.95))[0]  # a negative factor stops at the median
    assert (narrow[0] == q[1]).all() and (narrow[2] == q[1]).all()
    assert (q[0] == [[10.0, 0.5]]).all()  # the input is not modified


def test_gross_losses_and_gains_are_corrected_by_the_plots_own_cell_changes(region, tmp_path):
    """Map differencing inflates gross losses and gains (noise in two maps adds to both); with the
    plots stem-mapped at both epochs the budget corrects them by the held-out plots' cell changes,
    and without stem maps it says so (no interval, no plots)."""
    import pandas as pd

    from hfmi_kit.domains.carbon.tasks import budget, split_plots

    prep = prepare(region)
    _, test = split_plots(prep)
    # unbiased maps with 40 Mg/ha cell noise, 20 draws of the noise
    hits, err, err_map = {"losses": [], "gains": []}, {"losses": [], "gains": []}, {"losses": [], "gains": []}
    for k in range(20):
        rng = np.random.default_rng(k)
        noisy = [t + rng.normal(0, 40, t.shape) for t in prep.truth]
        rows = {r["quantity"].split()[0]: r for r in budget(prep, noisy, set(test))}
        for key in hits:
            r = rows[key]
            assert r["plots"] == len(test) and r["lower_90"] < r["value"] < r["upper_90"]
            hits[key].append(r["lower_90"] <= r["true"] <= r["upper_90"])
            err[key].append(abs(r["value"] - r["true"]))
            err_map[key].append(abs(r["map_only"] - r["true"]))
    for key in hits:
        assert np.mean(err_map[key]) > 0.5 * abs(rows[key]["true"])  # differencing: both sides inflated
        assert np.mean(err[key]) < 0.2 * np.mean(err_map[key]) and np.mean(hits[key]) >= 0.75, key
    # the true maps need no correction: their cells' changes are the plots' (trees rounded to 0.1 cm / m)
    exact = {r["quantity"].split()[0]: r for r in budget(prep, prep.truth, set(test))}
    assert exact["losses"]["value"] == pytest.approx(exact["losses"]["true"], rel=0.02)

    r = _copy(region, tmp_path)
    pd.read_csv(r / "trees.csv").drop(columns=["x_m", "y_m"]).to_csv(r / "trees.csv", index=False)
    unmapped = prepare(r)
    assert not unmapped.plots[0].stem_mapped
    rows = {x["quantity"].split()[0]: x for x in budget(unmapped, noisy, set(test))}
    assert rows["losses"]["plots"] == 0 and "lower_90" not in rows["losses"]
    assert rows["losses"]["value"] == rows["losses"]["map_only"] and rows["net"]["plots"] == len(test)


def test_the_budget_chart_puts_stocks_and_changes_on_axes_of_their_own():
    """Stocks (~8,000 Mg C) and changes (~ +-500 Mg C) on one axis hid the changes: two panels,
    each with its own range, the changes with a zero line; rows without an interval are left out."""
    import holoviews as hv

    from hfmi_kit.domains.carbon.plots import budget_plot

    rows = [{"quantity": "carbon stock 2019", "value": 8000.0, "lower_90": 7600.0, "upper_90": 8400.0, "true": 8100.0},
            {"quantity": "carbon stock 2023", "value": 7500.0, "lower_90": 7100.0, "upper_90": 7900.0, "true": 7450.0},
            {"quantity": "net change 2019-2023", "value": -500.0, "lower_90": -700.0, "upper_90": -300.0,
             "true": -650.0},
            {"quantity": "losses 2019-2023", "value": -900.0, "lower_90": -1100.0, "upper_90": -700.0, "true": -950.0},
            {"quantity": "gains 2019-2023", "value": 400.0, "lower_90": np.nan, "upper_90": np.nan}]
    plot = budget_plot(rows)
    assert isinstance(plot, hv.Layout) and len(plot) == 2
    fig = hv.render(plot, backend="bokeh")
    figs = [c[0] if isinstance(c, tuple) else c for c in fig.children]
    figs = [f for f in figs if hasattr(f, "y_range")]
    assert len(figs) == 2
    titles = [f.title.text for f in figs]
    assert titles[0].startswith("carbon stocks") and titles[1].startswith("changes")
    (lo0, hi0), (lo1, hi1) = [(f.y_range.start, f.y_range.end) for f in figs]
    assert lo0 > 6000 and hi1 < 0 < hi0 and lo1 < -1000  # each axis spans only its own quantities
    assert [f.yaxis[0].axis_label for f in figs] == ["stock (Mg C)", "change (Mg C)"]
    single = budget_plot(rows[:2])  # one epoch pair missing: the stocks alone
    assert not isinstance(single, hv.Layout)


def test_maps_are_on_their_crs_with_a_scale_bar_units_and_the_field_plots():
    """A map a forester reads: easting/northing in km with the CRS named, a scale bar of a round
    length, the colourbar's quantity and units, the field plots where they are; a geographic
    grid gets degree axes and no metric scale bar."""
    from types import SimpleNamespace

    import holoviews as hv
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from hfmi_kit.domains.carbon.plots import biomass_maps, change_map, map_set

    H, W = 40, 60
    rng = np.random.default_rng(0)
    maps = [rng.random((4, H, W)).astype(np.float32) * 200 for _ in range(2)]
    plots = SimpleNamespace(rows=np.array([5, 30]), cols=np.array([10, 50]))

    def prep(crs: str, res: float) -> SimpleNamespace:
        return SimpleNamespace(epochs=[2019, 2023], shape=(H, W), truth=None, plots=[plots, plots],
                               grid=SimpleNamespace(crs=CRS.from_string(crs), transform=from_origin(500000, 5400000,
                                                                                                   res, res)))

    utm = prep("EPSG:32633", 20.0)  # 1.2 km x 0.8 km
    ms = map_set(utm, maps)
    assert ms.crs == "EPSG:32633" and ms.projected
    assert np.allclose(ms.plots[0], [500210, 501010]) and np.allclose(ms.plots[1], [5399890, 5399390])
    layout = biomass_maps(utm, maps)
    first = layout[0]
    img = first.get(0)
    assert [d.name for d in img.kdims] == ["easting [km] (EPSG:32633)", "northing [km]"]
    assert img.vdims[0].name == "AGB" and img.vdims[0].unit == "Mg/ha"
    (pts,) = [e for e in first if isinstance(e, hv.Points)]
    assert np.allclose(pts.dimension_values(0), [500.21, 501.01])  # plot centres, in km
    (bar,) = [e for e in first if isinstance(e, hv.Path)]
    (x0, x1) = bar.dimension_values(0)[[0, -1]]
    length_m = round((x1 - x0) * 1000)
    assert length_m == 200 and length_m <= 1200 / 5  # 1, 2 or 5 x 10^n m, about a fifth of the width
    assert [e.text for e in first if isinstance(e, hv.Text)] == ["200 m"]
    chg = change_map(utm, maps)[0].get(0)
    assert chg.vdims[0].name == "carbon change" and chg.vdims[0].unit == "Mg C/ha"
    hv.render(layout, backend="bokeh")

    geo = prep("EPSG:4326", 0.001)
    gfirst = biomass_maps(geo, maps)[0]
    assert gfirst.get(0).kdims[0].name == "longitude [°] (EPSG:4326)"
    assert not [e for e in gfirst if isinstance(e, hv.Path)]  # no metric scale bar on degrees
