"""Climate reader, generator and bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from hfmi_kit.data.cf import write_cf
from hfmi_kit.domains.climate import GeneratorConfig, generate, load_climate
from hfmi_kit.domains.climate import data as cdata
from hfmi_kit.domains.climate.generator import T_FREEZE
from hfmi_kit.errors import DataError


@pytest.fixture(scope="module")
def ds() -> xr.Dataset:
    return generate(GeneratorConfig(years=4, spinup_years=6, seed=1))


def test_generator_is_cf_and_physical(ds):
    assert ds.attrs["Conventions"] == "CF-1.8"
    for v in ds.data_vars:
        assert ds[v].attrs["units"] is not None and ds[v].attrs["standard_name"], v
    land = ds.sftlf.values >= 50
    assert np.isnan(ds.tos.values[:, land]).all() and np.isfinite(ds.tos.values[:, ~land]).all()
    assert np.isfinite(ds.tas.values).all()
    ice = ds.siconc.values[:, ~land]
    assert ice.min() >= 0 and ice.max() <= 1 and ice.max() > 0.5  # sea ice forms
    # a mostly ice-covered month has its mixed layer near freezing (monthly means)
    assert (ds.tos.values[:, ~land][ice > 0.5] < T_FREEZE + 2.0).all()
    # seasonal cycle: NH high latitudes colder in January than July
    nh = ds.tas.sel(lat=slice(45, 90)).mean(("lat", "lon"))
    assert float(nh.isel(time=6)) - float(nh.isel(time=0)) > 5
    # poles colder than the tropics
    zonal = ds.tas.mean(("time", "lon"))
    assert float(zonal.sel(lat=0, method="nearest")) - float(zonal.isel(lat=-1)) > 20


def test_more_co2_warms_the_generator():
    cfg = GeneratorConfig(years=3, spinup_years=5, seed=2)
    lo = generate(cfg, co2_ppm=np.full(36, 280.0))
    hi = generate(cfg, co2_ppm=np.full(36, 1120.0))
    w = np.cos(np.deg2rad(lo.lat))
    d = float((hi.tas - lo.tas).isel(time=slice(24, 36)).weighted(w).mean())
    assert 0.5 < d < 8.0  # 7.4 W m-2 of forcing warms by a few K within three years


def test_reads_zarr_and_netcdf_alike(ds, tmp_path):
    z = write_cf(ds, tmp_path / "c.zarr")
    n = write_cf(ds, tmp_path / "c.nc")
    a, b = load_climate(z), load_climate(n)
    assert sorted(a.state_vars) == sorted(b.state_vars) == ["siconc", "tas", "tos"]
    assert list(a.forcing) == ["rsdt"] and list(a.scalars) == ["co2"]
    np.testing.assert_allclose(a.state["tas"], b.state["tas"])
    assert a.valid["tos"].sum() == (ds.sftlf.values < 50).sum()
    np.testing.assert_allclose(a.scalars["co2"], 5.35 * np.log(ds.co2.values / 280.0), rtol=1e-5)


def test_axes_found_by_cf_attributes_not_names(ds, tmp_path):
    r = ds.rename({"lat": "y", "lon": "x", "time": "t"})
    p = write_cf(r, tmp_path / "renamed.nc", time_dim="t")
    d = load_climate(p)
    assert d.lat.size == ds.lat.size and d.time.size == ds.time.size


def test_variables_flag_and_missing_variable(ds, tmp_path):
    p = write_cf(ds, tmp_path / "c.nc")
    assert load_climate(p, variables=["tas"]).state_vars == ["tas"]
    with pytest.raises(DataError, match=r"c\.nc: variable\(s\) \['psl'\] not found"):
        load_climate(p, variables=["tas", "psl"])


def _bad(ds, tmp_path, name, fn):
    return write_cf(fn(ds.copy(deep=True)), tmp_path / f"{name}.nc")


def test_bad_inputs_give_clear_errors(ds, tmp_path):
    p = _bad(ds, tmp_path, "notime", lambda d: d.isel(time=0).drop_vars("time"))
    with pytest.raises(DataError, match=r"notime\.nc: no time axis"):
        load_climate(p)
    p = _bad(ds, tmp_path, "dup", lambda d: d.isel(time=[0, 1, 1, 2, 3]))
    with pytest.raises(DataError, match=r"dup\.nc: duplicated time"):
        load_climate(p)
    p = _bad(ds, tmp_path, "rev", lambda d: d.isel(time=[0, 2, 1, 3]))
    with pytest.raises(DataError, match=r"rev\.nc: non-monotonic time"):
        load_climate(p)

    def wrong_units(d):
        d["tas"].attrs["units"] = "m"
        return d

    with pytest.raises(DataError, match=r"variable 'tas' \(air_temperature\) has units 'm'; expected 'K'"):
        load_climate(_bad(ds, tmp_path, "units", wrong_units))

    def nan_over_ocean(d):
        ocean = np.argwhere(d.sftlf.values < 50)[0]
        d["tos"].values[5, ocean[0], ocean[1]] = np.nan
        return d

    with pytest.raises(DataError, match=r"variable 'tos' has 1 NaN.*over the ocean"):
        load_climate(_bad(ds, tmp_path, "nanocean", nan_over_ocean))

    def nan_in_tas(d):
        d["tas"].values[3, 2, 2] = np.nan
        return d

    with pytest.raises(DataError, match=r"variable 'tas' has 1 NaN.*no declared mask"):
        load_climate(_bad(ds, tmp_path, "nantas", nan_in_tas))

    def no_lon(d):
        d = d.rename({"lon": "x"})
        d["x"].attrs = {}
        return d

    with pytest.raises(DataError, match=r"nolon\.nc: grid without longitude"):
        load_climate(_bad(ds, tmp_path, "nolon", no_lon))
    corrupt = tmp_path / "corrupt.nc"
    corrupt.write_bytes(b"CDF\x01garbage" * 10)
    with pytest.raises(DataError, match=r"corrupt\.nc: cannot be read"):
        load_climate(corrupt)
    with pytest.raises(DataError, match="no such file"):
        load_climate(tmp_path / "missing.zarr")


def test_celsius_is_converted(ds, tmp_path):
    d = ds.copy(deep=True)
    d["tas"] = d["tas"] - 273.15
    d["tas"].attrs = {**ds["tas"].attrs, "units": "degC"}
    got = load_climate(write_cf(d, tmp_path / "degc.nc"))
    np.testing.assert_allclose(got.state["tas"], ds["tas"].values, atol=1e-3)
    assert got.attrs["tas"]["units"] == "K"


def test_variable_on_another_grid_is_regridded(ds, tmp_path):
    coarse = ds["tas"].coarsen(lon=2).mean()
    coarse = coarse.rename({"lon": "lon_c"}).rename("tas_coarse")
    coarse["lon_c"].attrs = {"standard_name": "longitude", "units": "degrees_east"}
    coarse.attrs = {**ds["tas"].attrs, "long_name": "tas on a coarser grid"}
    d = ds[["tas", "rsdt", "co2", "sftlf"]].assign(tas_coarse=coarse)
    got = load_climate(write_cf(d, tmp_path / "twogrids.nc"))
    assert got.state["tas_coarse"].shape == got.state["tas"].shape
    err = np.abs(got.state["tas_coarse"] - got.state["tas"]).mean()
    assert err < 2.0  # bilinear interpolation of a 2x coarser zonal grid stays close


def test_real_enso_sst_from_statsmodels_reads_as_cf(tmp_path):
    """Real data shipped in an installed package: monthly El Niño SST 1950-2010 (statsmodels)."""
    from statsmodels.datasets import elnino

    df = elnino.load_pandas().data
    sst = df.drop(columns="YEAR").to_numpy().reshape(-1)  # monthly, degC
    time = np.array([np.datetime64(f"{int(y)}-{m:02d}-01", "ns") for y in df.YEAR for m in range(1, 13)])
    ds_real = xr.Dataset(
        {"sst": (("time", "lat", "lon"), sst[:, None, None].astype("float32"),
                 {"standard_name": "sea_surface_temperature", "units": "degC"})},
        coords={"time": ("time", time, {"standard_name": "time"}),
                "lat": ("lat", [0.0], {"standard_name": "latitude", "units": "degrees_north"}),
                "lon": ("lon", [240.0], {"standard_name": "longitude", "units": "degrees_east"})},
        attrs={"Conventions": "CF-1.8", "source": "statsmodels.datasets.elnino"},
    )
    got = load_climate(write_cf(ds_real, tmp_path / "elnino.nc"))
    assert got.time.size == 61 * 12 and got.attrs["sst"]["units"] == "K"
    assert 293 < got.state["sst"].mean() < 303  # ~24-27 degC in K
    split = cdata.split_years(got)
    assert split.test_years == tuple(range(1999, 2011))  # the last 20 % of 61 years


def test_forced_anomaly_regression_recovers_known_damping_and_co2_response():
    import torch

    rng = np.random.default_rng(0)
    T, H, W = 600, 3, 4
    a_true = rng.uniform(0.2, 0.9, (1, H, W))
    b_true = rng.uniform(-0.5, 0.5, (1, 1, H, W))
    s = np.repeat(rng.uniform(-1, 1, T // 12), 12)  # a stepped forcing, as the generator's CO2 path
    x = np.zeros((T, 1, H, W))
    for t in range(1, T):
        x[t] = a_true * x[t - 1] + b_true[0] * (s[t] - s.mean()) + 0.05 * rng.standard_normal((1, H, W))
    tens = cdata.Tensors(state=torch.tensor(x, dtype=torch.float32), forcing=torch.zeros(T, 0, H, W),
                         scalars=torch.tensor(s, dtype=torch.float32)[:, None], mask=torch.ones(1, H, W),
                         phase=torch.arange(T) % 12)
    a, b, ref = cdata.anomaly_regression(tens, np.arange(T), torch.zeros(12, 1, H, W))
    assert a.shape == (1, H, W) and b.shape == (1, 1, H, W) and ref.shape == (1,)
    assert np.allclose(a.numpy(), a_true, atol=0.03) and np.allclose(b.numpy(), b_true, atol=0.03)
    # the plain lag-1 fit, blind to the forcing, is biased where the forced response is strong
    plain = cdata.anomaly_damping(tens, np.arange(T), torch.zeros(12, 1, H, W)).numpy()
    assert np.abs(plain - a_true).max() > 2 * np.abs(a.numpy() - a_true).max()


def test_linear_inverse_model_recovers_a_nonlocal_forced_response():
    """A system whose cells are coupled (a smoothing operator, as diffusion couples them) and
    forced uniformly: the per-cell regression cannot see the coupling, the linear inverse model
    in the leading EOFs recovers the equilibrium response pattern (I - A)^-1 B and rolls out better."""
    import torch

    rng = np.random.default_rng(1)
    T, H, W = 1200, 4, 6
    n = H * W
    ii, jj = np.divmod(np.arange(n), W)
    dj = np.abs(jj[:, None] - jj[None])
    dist = np.abs(ii[:, None] - ii[None]) + np.minimum(dj, W - dj)  # periodic in longitude
    K = np.exp(-dist / 1.5)
    A_true = 0.9 * K / np.abs(np.linalg.eigvals(K)).max()  # coupled, stable
    b_true = 0.2 + 0.3 * (ii / (H - 1))  # forcing response growing poleward
    s = np.repeat(rng.uniform(-1, 1, T // 12), 12)
    x = np.zeros((T, n))
    for t in range(1, T):
        x[t] = A_true @ x[t - 1] + b_true * s[t] + 0.1 * rng.standard_normal(n)
    tens = cdata.Tensors(state=torch.tensor(x.reshape(T, 1, H, W), dtype=torch.float32),
                         forcing=torch.zeros(T, 0, H, W), scalars=torch.tensor(s, dtype=torch.float32)[:, None],
                         mask=torch.ones(1, H, W), phase=torch.arange(T) % 12)
    clim = torch.zeros(12, 1, H, W)
    train, val = np.arange(900), np.arange(900, T)
    lim = cdata.choose_lim(tens, train, val, clim, candidates=(3, 8, n))
    equilibrium_true = np.linalg.solve(np.eye(n) - A_true, b_true)
    A, B = lim.operator.double(), lim.forcing.double()
    p_eq = torch.linalg.solve(torch.eye(lim.modes, dtype=torch.float64) - A.T, B[0])  # fixed point of p A + B
    eq = (p_eq.float() @ lim.reconstruct.reshape(lim.modes, -1)).numpy()
    assert np.corrcoef(eq, equilibrium_true)[0, 1] > 0.95
    assert abs(eq.mean() / equilibrium_true.mean() - 1) < 0.2
    # 12-month rollouts on the validation steps: better than the per-cell forced regression
    a, b, ref = cdata.anomaly_regression(tens, train, clim)
    starts = torch.arange(900, T - 12)
    xp = tens.state[starts]
    for k in range(1, 13):
        xp = a * xp + b[0] * (tens.scalars[starts + k, 0] - ref[0])[:, None, None, None]
    per_cell = float(((xp - tens.state[starts + 12]) ** 2).mean() / tens.state[val].var())
    assert lim.val_error < per_cell
    # the per-cell regression's equilibrium b / (1 - a) misses the coupling
    eq_cell = (b[0] / (1 - a)).reshape(-1).numpy()
    assert np.abs(eq_cell - equilibrium_true).mean() > 2 * np.abs(eq - equilibrium_true).mean()
    with pytest.raises(Exception, match="too few consecutive training steps"):
        cdata.fit_lim(tens, np.arange(5), clim, 8)


def test_the_skill_plot_shows_every_baseline_the_metrics_hold():
    """The strongest baseline (here damped persistence, as often at short leads) is drawn too."""
    pytest.importorskip("holoviews")
    from hfmi_kit.domains.climate.plots import skill_vs_lead

    m = {f"rmse{b}_tas_lead{k}": v * k for k in (1, 2)
         for b, v in (("", 1.0), ("_persistence", 2.0), ("_climatology", 1.5), ("_damped_persistence", 0.8))}
    m.update({"rmse_tos_lead1": 9.0, "rmse_skip_tas_lead1": 1.0})  # another variable; a baseline at one lead only
    labels = {e.label for e in skill_vs_lead(m) if e.label}
    assert labels == {"model", "persistence", "climatology", "damped persistence"}


@pytest.fixture(scope="module")
def leveled(tmp_path_factory) -> xr.Dataset:
    """Generated data with air temperature on pressure levels (Pa, as CMIP6 writes them) and
    ocean temperature on depths whose shelf cells end at 100 m."""
    return generate(GeneratorConfig(years=3, spinup_years=1, seed=2, pressure_levels=(850, 500, 250),
                                    ocean_depths=(5, 50, 200)))


def test_a_pressure_coordinate_is_read_as_one_field_per_level_with_its_own_statistics(leveled, tmp_path):
    path = write_cf(leveled, tmp_path / "levels.nc")
    d = load_climate(path)
    assert d.state_vars == ["tas", "tos", "siconc", "ta_850", "ta_500", "ta_250", "thetao_5", "thetao_50",
                            "thetao_200"]
    assert d.levels["ta_500"] == {"variable": "ta", "axis": "plev", "kind": "pressure", "value": 500.0,
                                  "units": "hPa", "positive": "down", "file_value": 50000.0}
    np.testing.assert_allclose(d.state["ta_500"], leveled["ta"].sel(plev=50000.0).values)
    stats = cdata.compute_stats(path, d)
    means = [stats[f"ta_{p}"]["mean"] for p in (850, 500, 250)]
    assert means[0] > means[1] > means[2]  # colder aloft: statistics per level, not per variable
    # at 200 m the shelf (ocean next to land) is below the sea floor: outside that level's mask only
    assert d.valid["thetao_200"].sum() < d.valid["thetao_50"].sum() == d.valid["tos"].sum()
    geo = d.geometry()
    assert set(geo["levels"]) == {f"ta_{p}" for p in (850, 500, 250)} | {f"thetao_{z}" for z in (5, 50, 200)}
    assert "file_value" not in geo["levels"]["ta_500"]
    assert load_climate(path, expect=geo).state_vars == d.state_vars  # a checkpoint finds its fields again


def test_levels_and_variables_select_level_fields(leveled, tmp_path):
    path = write_cf(leveled, tmp_path / "levels.nc")
    d = load_climate(path, levels=[500, 850])
    assert [v for v in d.state_vars if v.startswith("ta_")] == ["ta_850", "ta_500"]
    assert [v for v in d.state_vars if v.startswith("thetao")] == ["thetao_5", "thetao_50", "thetao_200"]
    assert load_climate(path, variables=["tas", "ta_250", "thetao"]).state_vars == [
        "tas", "ta_250", "thetao_5", "thetao_50", "thetao_200"]
    with pytest.raises(DataError, match=r"levels.nc: no variable has the level\(s\) 300; the levels present "
                                        r"are .*250 hPa"):
        load_climate(path, levels=[300])
    with pytest.raises(DataError, match=r"levels.nc: field\(s\) \['ta_300'\] not found.*ta: 500 hPa"):
        load_climate(path, variables=["ta_300"])


def test_level_spellings_real_files_use_and_levels_that_are_not_pressure_depth_or_height(leveled, tmp_path):
    ds = leveled[["tas", "ta"]].assign_coords(plev=leveled.plev / 100.0)
    ds["plev"].attrs = {"units": "millibars"}  # no axis, no standard name: the units say pressure
    ds["tas"].attrs["units"] = "degK"
    d = load_climate(write_cf(ds, tmp_path / "mbar.nc"))
    assert d.state_vars == ["tas", "ta_850", "ta_500", "ta_250"] and d.attrs["tas"]["units"] == "K"
    hybrid = leveled[["tas", "ta"]].rename(plev="lev").assign_coords(lev=[0.9, 0.5, 0.2])
    hybrid["lev"].attrs = {"axis": "Z", "units": "1", "standard_name": "atmosphere_hybrid_sigma_pressure_coordinate"}
    with pytest.raises(DataError, match=r"hybrid.nc: variable 'ta' has the vertical axis 'lev' .*not pressure, "
                                        r"depth or height.*interpolate"):
        load_climate(write_cf(hybrid, tmp_path / "hybrid.nc"))


def test_level_fields_are_written_back_on_their_vertical_coordinate(leveled, tmp_path):
    from hfmi_kit.domains.climate.plots import field, field_names

    d = load_climate(write_cf(leveled, tmp_path / "levels.nc"), levels=[850, 250])
    fields = {v: d.state[v][None, :2] for v in d.state}  # (init, lead, lat, lon) as a forecast holds them
    out = cdata.gather_levels(xr.Dataset({v: (("init_time", "lead", "lat", "lon"), a) for v, a in fields.items()},
                                         coords={"lat": d.lat, "lon": d.lon}), d.levels)
    assert out["ta"].dims == ("init_time", "lead", "plev", "lat", "lon")
    assert list(out["plev"].values) == [850.0, 250.0]
    assert out["plev"].attrs == {"standard_name": "air_pressure", "units": "hPa", "positive": "down", "axis": "Z"}
    assert out["thetao"].dims[2] == "depth" and "ta_850" not in out
    np.testing.assert_array_equal(out["ta"].sel(plev=250.0).values, fields["ta_250"])
    assert field_names(out, ["tas", "ta"]) == ["tas", "ta_850", "ta_250"]
    np.testing.assert_array_equal(field(out, "ta_850").values, fields["ta_850"])


@pytest.mark.parametrize("lon0", [0.0, -180.0], ids=["0-360", "-180-180"])
def test_maps_of_the_earth_draw_the_shipped_coastline_in_the_grids_longitudes(lon0):
    """Offline coastlines (Natural Earth 1:110m, shipped): in the grid's longitude convention,
    through known coasts, degree axes, land (no value) grey, not white like full sea ice; none on
    the generator's idealised planet."""
    pytest.importorskip("holoviews")
    import holoviews as hv

    from hfmi_kit.domains.climate.plots import on_earth
    from hfmi_kit.viz.core import LAND_COLOUR, coastline_paths, map_with_slider, single_map

    lon = lon0 + np.arange(144) * 2.5
    lat = np.linspace(-88.75, 88.75, 72)
    paths = coastline_paths(lon, lat)
    xy = np.concatenate(paths)
    assert len(paths) > 100 and xy[:, 0].min() >= lon.min() - 2.5 and xy[:, 0].max() <= lon.max() + 2.5
    assert not any(np.abs(np.diff(p[:, 0])).max() > 180 for p in paths)  # no line drawn across the map
    cape = (18.5, -34.4)  # Cape of Good Hope, east of the prime meridian in both conventions
    assert np.hypot(xy[:, 0] - cape[0], xy[:, 1] - cape[1]).min() < 1.5
    florida = ((-80.2) % 360 if lon0 == 0 else -80.2, 25.8)  # Miami, west of the prime meridian
    assert np.hypot(xy[:, 0] - florida[0], xy[:, 1] - florida[1]).min() < 1.5
    sst = np.where(np.abs(lat)[:, None] > 60, np.nan, 290.0) * np.ones((1, lon.size))
    da = xr.DataArray(np.stack([sst, sst]), dims=("lead", "lat", "lon"),
                      coords={"lead": [1, 2], "lat": lat, "lon": lon}, name="tos", attrs={"units": "K"})
    frame = map_with_slider(da, "lead")[1]
    img, coast = frame.get(0), frame.get(1)
    assert isinstance(coast, hv.Path) and coast.label == "coastline" and len(coast.data) == len(paths)
    assert [d.pprint_label for d in img.kdims] == ["longitude (°E)", "latitude (°N)"]
    assert img.vdims[0].name == "tos [K]"
    assert hv.Store.lookup_options("bokeh", img, "plot").kwargs["clipping_colors"]["NaN"] == LAND_COLOUR
    hv.render(frame, backend="bokeh")
    plain = single_map(da.isel(lead=0), coast=False)
    assert isinstance(plain, hv.Image)
    assert on_earth(xr.Dataset(attrs={"hfmi_input_title": "ERA5 hourly data on pressure levels"}))
    assert not on_earth(xr.Dataset(attrs={"hfmi_input_title": "hfmi_kit synthetic coupled atmosphere-ocean-sea-ice"}))


@pytest.mark.parametrize("projection", ["robinson", "mollweide", "north-polar", "south-polar"])
def test_maps_in_a_projection_sample_the_right_cells(projection):
    """A projected map takes each pixel's value from the grid cell under it (on a 0..360 grid
    running north to south, as ERA5's), leaves cells without a value grey over a white space off
    the globe, and draws the coastline and a graticule in the projection."""
    pytest.importorskip("holoviews")
    pytest.importorskip("pyproj")
    import holoviews as hv

    from hfmi_kit.viz.core import LAND_COLOUR, map_with_slider
    from hfmi_kit.viz.projection import PROJECTIONS, forward, lookup

    lat, lon = np.arange(90.0, -90.1, -2.5), np.arange(0.0, 360.0, 2.5)
    LON, LAT = np.meshgrid(lon, lat)
    lk = lookup(projection, lon, lat)
    at_lat, at_lon = lk.sample(LAT), lk.sample(LON)  # each pixel's cell, by its coordinates
    edge = PROJECTIONS[projection][1]
    for plon, plat in [(10.0, 45.0), (-80.0, 25.0), (150.0, -35.0), (0.0, 88.0), (100.0, -70.0)]:
        if edge is not None and (plat < edge if edge > 0 else plat > edge):
            continue
        x, y = forward(projection, np.array([plon]), np.array([plat]))
        iy, ix = np.argmin(abs(lk.y - y[0])), np.argmin(abs(lk.x - x[0]))
        assert abs(at_lat[iy, ix] - plat) <= 2.5, (plon, plat, at_lat[iy, ix])
        if abs(plat) < 80:  # near a pole a pixel spans many longitudes
            assert abs((at_lon[iy, ix] - plon % 360 + 180) % 360 - 180) <= 2.5, (plon, plat, at_lon[iy, ix])
    assert 0.6 < lk.globe.mean() < 0.95  # the corners are off the globe (white), the globe fills the rest
    assert (lk.cell[~lk.globe] == -1).all()
    sst = np.where(np.abs(LAT) > 75, np.nan, 290.0)
    da = xr.DataArray(np.stack([sst, sst]), dims=("lead", "lat", "lon"),
                      coords={"lead": [1, 2], "lat": lat, "lon": lon}, name="tos", attrs={"units": "K"})
    frame = map_with_slider(da, "lead", projection=projection)[1]
    globe, img = frame.get(0), frame.get(1)
    labels = {el.label for el in frame}
    assert {"graticule", "coastline"} <= labels
    assert img.vdims[0].name == "tos [K]"
    assert hv.Store.lookup_options("bokeh", globe, "style").kwargs["cmap"] == ["white", LAND_COLOUR]
    hv.render(frame, backend="bokeh")
    with pytest.raises(Exception, match="projection 'mercator' is not one of plate-carree, robinson"):
        map_with_slider(da, "lead", projection="mercator")
