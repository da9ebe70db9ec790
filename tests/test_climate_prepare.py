"""``hfmi data prepare climate`` and ``hfmi data inspect``: files as users download them (one per
year, one per variable) joined into one checked training store, and each bad input named."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import xarray as xr

from hfmi_kit.cli import main
from hfmi_kit.data.cf import write_cf
from hfmi_kit.domains.climate import GeneratorConfig, generate, load_climate


@pytest.fixture(scope="module")
def whole() -> xr.Dataset:
    return generate(GeneratorConfig(years=4, spinup_years=1, seed=3, pressure_levels=(850, 500)))


@pytest.fixture()
def sources(whole, tmp_path):
    """Per-year files of the atmosphere/ocean/ice fields and, apart, per-year CO2 files."""
    src = tmp_path / "src"
    for y in range(4):
        part = whole.isel(time=slice(12 * y, 12 * y + 12))
        write_cf(part[["tas", "tos", "siconc", "rsdt", "ta", "sftlf"]], src / f"atm_{2000 + y}.nc")
        write_cf(part[["co2"]], src / f"co2_{2000 + y}.nc")
    return src


def test_per_year_and_per_variable_files_join_into_the_store_one_file_would_give(whole, sources, tmp_path, capsys):
    store = tmp_path / "store.zarr"
    assert main(["data", "prepare", "climate", str(sources), "--out", str(store)]) == 0
    text = capsys.readouterr().out
    assert "48 steps of 1 month (standard calendar)" in text and "2 plev levels 850, 500 hPa" in text
    a, b = load_climate(store), load_climate(write_cf(whole, tmp_path / "whole.nc"))
    assert sorted(a.state_vars) == sorted(b.state_vars) and list(a.scalars) == ["co2"]
    for v in b.state:
        np.testing.assert_allclose(a.state[v], b.state[v], rtol=1e-6, equal_nan=True)
        np.testing.assert_array_equal(a.valid[v], b.valid[v])
    ds = xr.open_zarr(store)
    stats = json.loads(ds.attrs["hfmi_statistics"])
    assert abs(stats["ta_500"]["mean"] - float(whole["ta"].sel(plev=50000.0).mean())) < 1e-3
    src = {s["path"]: s for s in json.loads(ds.attrs["hfmi_sources"])}
    f = sources / "co2_2002.nc"
    assert len(src) == 8 and src[f.name]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert ds["ta"].encoding["chunks"] == (1, 2, 16, 32)  # one step per chunk, whole fields
    assert main(["data", "inspect", str(store)]) == 0
    assert "ta: mean 241.2" in capsys.readouterr().out  # the range over its levels
    assert main(["pretrain", "climate", "--data", str(store), "--out", str(tmp_path / "pre"), "--steps", "2"]) == 0


def test_grid_levels_and_variables_are_chosen_when_the_store_is_made(sources, tmp_path, capsys):
    store = tmp_path / "coarse.zarr"
    assert main(["data", "prepare", "climate", str(sources), "--out", str(store), "--grid", "22.5",
                 "--levels", "500", "--variables", "tas,ta", "--time-chunk", "12"]) == 0
    ds = xr.open_zarr(store)
    assert (ds.sizes["lat"], ds.sizes["lon"]) == (8, 16) and list(ds["plev"].values) == [500.0]
    assert set(ds.data_vars) == {"tas", "ta", "rsdt", "co2", "sftlf"}  # the forcings and the land mask come along
    assert ds["tas"].encoding["chunks"][0] == 12
    assert main(["data", "prepare", "climate", str(sources), "--out", str(tmp_path / "x.zarr"), "--grid", "7"]) == 1
    assert "--grid 7.0: a regular grid needs a spacing in degrees that divides 180" in capsys.readouterr().err


def test_each_bad_input_is_one_line_naming_the_file(sources, tmp_path, capsys):
    def err(*args: str) -> str:
        out = tmp_path / "bad.zarr"
        assert main(["data", "prepare", "climate", *args, "--out", str(out)]) == 1
        assert not out.exists()  # nothing half-written
        return capsys.readouterr().err.strip()

    (tmp_path / "notes.nc").write_text("not a netcdf file")
    assert f"{tmp_path / 'notes.nc'}: not a NetCDF file" in err(str(tmp_path / "notes.nc"))
    files = sorted(str(p) for p in sources.glob("atm_*.nc"))
    missing = err(files[0], files[2], files[3])
    assert missing.startswith(f"hfmi: error: {files[2]}: its first time 2002-01-01") and "a file is missing" in missing
    dup = tmp_path / "dup"
    dup.mkdir()
    xr.open_dataset(files[1]).to_netcdf(dup / "again_2001.nc")
    assert f"{dup / 'again_2001.nc'}: its times start at 2001-01-01" in err(files[0], files[1],
                                                                          str(dup / "again_2001.nc"))
    assert "variable(s) ['pr'] are in none of the sources" in err(str(sources), "--variables", "pr")
    shifted = tmp_path / "shifted_2001.nc"
    ds1 = xr.open_dataset(files[1])
    ds1.assign_coords(lon=ds1["lon"] - 180.0).to_netcdf(shifted)  # the same size, other longitudes
    assert f"{shifted}: its coordinate 'lon' differs from {files[0]}'s" in err(files[0], str(shifted))
    assert main(["data", "prepare", "climate", str(sources), "--out", str(tmp_path / "s.nc")]) == 1
    assert "s.nc: the store's name must end in .zarr" in capsys.readouterr().err
    link = tmp_path / "linked"
    link.mkdir()
    (link / "outside.nc").symlink_to(tmp_path / "notes.nc")
    assert f"{link / 'outside.nc'}: a link to {tmp_path / 'notes.nc'}, outside the folder {link}" in err(str(link))
    plain = write_cf(xr.Dataset({"x": ("t", [1.0, 2.0])}), tmp_path / "plain.zarr")
    assert main(["data", "inspect", str(plain)]) == 1
    assert "not a store written by `hfmi data prepare`" in capsys.readouterr().err
