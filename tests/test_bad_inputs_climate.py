"""Climate: bad input fails with one purposeful line and leaves no trace.

Every case builds one bad input (a file, a store, a checkpoint or a flag) from small good data
and runs the command line in-process: exit 1, exactly one stderr line ``hfmi: error: ...`` that
names the file (or the parameter) and the problem, no traceback, no "unexpected" error, no
warning logged, no fresh ``--out`` left behind, and a previously good output folder (a real
two-step pretraining run) byte for byte unchanged when the command is pointed at it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from badinput import fails_with_one_line, left_nothing, snapshot

from hfmi_kit.cli import main
from hfmi_kit.data.cf import write_cf
from hfmi_kit.domains.climate import GeneratorConfig, generate, write_dataset

FAST = ["--steps", "2", "--batch-size", "2"]


@dataclass(frozen=True)
class Good:
    """The small good data (4 years, 16 x 32) and the previously good output folder."""

    ds: xr.Dataset  # in memory, to derive bad variants from
    zarr: Path
    nc: Path
    out: Path  # a real `hfmi pretrain climate` run: out/model is its checkpoint
    ft: Path  # a fine-tuned forecaster (2 steps) from it: what `hfmi evaluate` takes
    materials_ckpt: Path  # a real checkpoint of another domain



@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Good:
    root = tmp_path_factory.mktemp("climate_good")
    ds = generate(GeneratorConfig(years=4, spinup_years=2, seed=0)).load()
    zarr = write_dataset(ds, root / "good.zarr")
    nc = write_cf(ds, root / "good.nc")
    out = root / "GOOD"
    assert main(["pretrain", "climate", "--data", str(zarr), "--out", str(out), *FAST]) == 0
    assert (out / "model" / "model.safetensors").is_file()
    assert main(["finetune", "climate", "--from", str(out / "model"), "--data", str(zarr), "--out", str(root / "FT"),
                 *FAST]) == 0
    csv = root / "gaps.csv"
    csv.write_text("formula,target\nGaAs,1.42\nSi,1.12\nCdTe,1.5\nZnO,3.3\nGaN,3.4\nInP,1.34\n")
    mat = root / "materials"
    assert main(["pretrain", "materials", "--data", str(csv), "--out", str(mat), "--steps", "2",
                 "--batch-size", "4"]) == 0
    return Good(ds=ds, zarr=zarr, nc=nc, out=out, ft=root / "FT" / "model", materials_ckpt=mat / "model")


def variant(good: Good, tmp: Path, name: str, change: Callable[[xr.Dataset], xr.Dataset]) -> Path:
    """A NetCDF copy of the good data with one thing changed."""
    p = tmp / name
    change(good.ds.copy(deep=True)).to_netcdf(p)
    return p


def pretrain(data: Path | str, *extra: str) -> list[str]:
    """`hfmi pretrain climate` of ``data`` (two steps)."""
    return ["pretrain", "climate", "--data", str(data), *FAST, *extra]


def finetune(ckpt: Path | str, data: Path | str, *extra: str) -> list[str]:
    """`hfmi finetune climate` from ``ckpt`` (or scratch) on ``data`` (two steps)."""
    return ["finetune", "climate", "--from", str(ckpt), "--data", str(data), *FAST, *extra]


# --- the bad inputs: each returns (argv without --out, the name the message must carry) ---------


def missing_path(good: Good, tmp: Path) -> tuple[list[str], str]:
    return pretrain(tmp / "absent.nc"), "absent.nc"


def empty_nc(good: Good, tmp: Path) -> tuple[list[str], str]:
    (tmp / "empty.nc").write_bytes(b"")
    return pretrain(tmp / "empty.nc"), "empty.nc"


def truncated_nc(good: Good, tmp: Path) -> tuple[list[str], str]:
    b = good.nc.read_bytes()
    (tmp / "half.nc").write_bytes(b[: len(b) // 2])
    return pretrain(tmp / "half.nc"), "half.nc"


def text_named_nc(good: Good, tmp: Path) -> tuple[list[str], str]:
    (tmp / "table.nc").write_text("time,lat,lon,tas\n2000-01-01,0,0,288.1\n")
    return pretrain(tmp / "table.nc"), "table.nc"


def folder_not_a_store(good: Good, tmp: Path) -> tuple[list[str], str]:
    (tmp / "notastore").mkdir()
    (tmp / "notastore" / "readme.txt").write_text("not zarr")
    return pretrain(tmp / "notastore"), "notastore"


def corrupt_zarr_chunk(good: Good, tmp: Path) -> tuple[list[str], str]:
    store = tmp / "damaged.zarr"
    shutil.copytree(good.zarr, store)
    chunks = sorted(p for p in (store / "tas").rglob("*") if p.is_file() and not p.name.startswith(".")
                    and p.name != "zarr.json")
    chunks[len(chunks) // 2].write_bytes(b"\x02\x01garbage, not a blosc frame")
    return pretrain(store), "damaged.zarr"


def zarr_variable_metadata_missing(good: Good, tmp: Path) -> tuple[list[str], str]:
    store = tmp / "partial.zarr"  # a half-copied store: no consolidated metadata, tas without its .zarray
    shutil.copytree(good.zarr, store)
    (store / ".zmetadata").unlink()
    for f in (store / "tas").glob(".z*"):
        f.unlink()
    return pretrain(store, "--variables", "tas"), "partial.zarr"


def variables_flag_names_absent(good: Good, tmp: Path) -> tuple[list[str], str]:
    return pretrain(good.nc, "--variables", "tas,psl"), "psl"


def checkpoint_variable_missing(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(good.out / "model", variant(good, tmp, "notas.nc", lambda d: d.drop_vars("tas"))), "notas.nc"


def tas_in_furlongs(good: Good, tmp: Path) -> tuple[list[str], str]:
    def change(d: xr.Dataset) -> xr.Dataset:
        d["tas"].attrs["units"] = "furlongs"
        return d

    return pretrain(variant(good, tmp, "furlongs.nc", change)), "furlongs.nc"


def latitude_in_radians(good: Good, tmp: Path) -> tuple[list[str], str]:
    def change(d: xr.Dataset) -> xr.Dataset:
        d = d.assign_coords(lat=np.deg2rad(d["lat"].values))
        d["lat"].attrs = {"standard_name": "latitude", "units": "radians", "axis": "Y"}
        return d

    return pretrain(variant(good, tmp, "radians.nc", change)), "radians.nc"


def nan_in_tas(good: Good, tmp: Path) -> tuple[list[str], str]:
    def change(d: xr.Dataset) -> xr.Dataset:
        d["tas"].values[5, 3, 4] = np.nan
        return d

    return pretrain(variant(good, tmp, "nan.nc", change)), "nan.nc"


def inf_in_tas(good: Good, tmp: Path) -> tuple[list[str], str]:
    def change(d: xr.Dataset) -> xr.Dataset:
        d["tas"].values[7, 1, 1] = np.inf
        return d

    return pretrain(variant(good, tmp, "inf.nc", change)), "inf.nc"


def tas_without_lat(good: Good, tmp: Path) -> tuple[list[str], str]:
    def change(d: xr.Dataset) -> xr.Dataset:
        d["tas"] = d["tas"].isel(lat=0, drop=True)
        return d

    return pretrain(variant(good, tmp, "nolat.nc", change), "--variables", "tas"), "nolat.nc"


def extra_dimension(good: Good, tmp: Path) -> tuple[list[str], str]:
    def change(d: xr.Dataset) -> xr.Dataset:
        d["tas"] = d["tas"].expand_dims(member=2).copy()
        return d

    return pretrain(variant(good, tmp, "members.nc", change)), "members.nc"


def lat_not_monotonic(good: Good, tmp: Path) -> tuple[list[str], str]:
    def change(d: xr.Dataset) -> xr.Dataset:
        i = list(range(d.sizes["lat"]))
        i[4], i[5] = i[5], i[4]
        return d.isel(lat=i)

    return pretrain(variant(good, tmp, "shuffled_lat.nc", change)), "shuffled_lat.nc"


def duplicated_time(good: Good, tmp: Path) -> tuple[list[str], str]:
    def change(d: xr.Dataset) -> xr.Dataset:
        return d.isel(time=[0, 1, 2, 2, *range(4, d.sizes["time"])])

    return pretrain(variant(good, tmp, "duptime.nc", change)), "duptime.nc"


def time_is_not_a_time(good: Good, tmp: Path) -> tuple[list[str], str]:
    def change(d: xr.Dataset) -> xr.Dataset:
        return d.assign_coords(time=("time", np.arange(d.sizes["time"], dtype=np.float64), {"standard_name": "time"}))

    return pretrain(variant(good, tmp, "floattime.nc", change)), "floattime.nc"


def strings_for_numbers(good: Good, tmp: Path) -> tuple[list[str], str]:
    def change(d: xr.Dataset) -> xr.Dataset:
        d["tas"] = d["tas"].astype(str)
        return d

    return pretrain(variant(good, tmp, "strings.nc", change)), "strings.nc"


def too_few_years(good: Good, tmp: Path) -> tuple[list[str], str]:
    return pretrain(variant(good, tmp, "oneyear.nc", lambda d: d.isel(time=slice(0, 12)))), "oneyear.nc"


def negative_co2(good: Good, tmp: Path) -> tuple[list[str], str]:
    def change(d: xr.Dataset) -> xr.Dataset:
        d["co2"].values[3] = -5.0
        return d

    return pretrain(variant(good, tmp, "negco2.nc", change)), "negco2.nc"


def steps_zero(good: Good, tmp: Path) -> tuple[list[str], str]:
    return pretrain(good.zarr, "--steps", "0"), "--steps"


def batch_size_zero(good: Good, tmp: Path) -> tuple[list[str], str]:
    return pretrain(good.zarr, "--batch-size", "0"), "--batch-size"


def negative_lr(good: Good, tmp: Path) -> tuple[list[str], str]:
    return pretrain(good.zarr, "--lr", "-1"), "--lr"


def label_fraction_two(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune("scratch", good.nc, "--label-fraction", "2"), "--label-fraction"


def checkpoint_of_another_domain(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(good.materials_ckpt, good.nc), str(good.materials_ckpt)


def corrupt_config_json(good: Good, tmp: Path) -> tuple[list[str], str]:
    ck = tmp / "ckpt"
    shutil.copytree(good.out / "model", ck)
    (ck / "config.json").write_text('{"domain": "climate", "geometry": ')
    return finetune(ck, good.nc), "config.json"


def config_without_geometry(good: Good, tmp: Path) -> tuple[list[str], str]:
    ck = tmp / "ckpt"
    shutil.copytree(good.out / "model", ck)
    cfg = json.loads((ck / "config.json").read_text())
    del cfg["geometry"]
    (ck / "config.json").write_text(json.dumps(cfg))
    return finetune(ck, good.nc), "config.json"


def truncated_weights(good: Good, tmp: Path) -> tuple[list[str], str]:
    ck = tmp / "ckpt"
    shutil.copytree(good.out / "model", ck)
    w = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(w[: len(w) // 3])
    return finetune(ck, good.nc), "model.safetensors"


def evaluate_a_pretrained_checkpoint(good: Good, tmp: Path) -> tuple[list[str], str]:
    return ["evaluate", "climate", "--ckpt", str(good.out / "model"), "--data", str(good.nc)], str(good.out / "model")


def evaluate_bad_units(good: Good, tmp: Path) -> tuple[list[str], str]:
    def change(d: xr.Dataset) -> xr.Dataset:
        d["siconc"].attrs["units"] = "kg"
        return d

    data = variant(good, tmp, "kg.nc", change)
    return ["evaluate", "climate", "--ckpt", str(good.ft), "--data", str(data)], "kg.nc"


def whatif_co2_factor_zero(good: Good, tmp: Path) -> tuple[list[str], str]:
    return ["whatif", "climate", "--ckpt", str(good.out / "model"), "--data", str(good.nc),
            "--co2-factor", "0"], "--co2-factor"


CORRUPT = r"corrupt|truncated|cannot be read|not a readable"
# (builder, the problem the line must name (regex), point --out at the good folder)
CASES = [
    pytest.param(missing_path, "no such file", False, id="missing-path"),
    pytest.param(empty_nc, r"empty file \(0 bytes\)", False, id="empty-nc"),
    pytest.param(truncated_nc, CORRUPT, True, id="truncated-nc"),
    pytest.param(text_named_nc, "not a NetCDF file", False, id="text-named-nc"),
    pytest.param(folder_not_a_store, "not a Zarr store", False, id="folder-not-a-store"),
    pytest.param(corrupt_zarr_chunk, r"variable 'tas' cannot be read.*corrupt", True, id="corrupt-zarr-chunk"),
    pytest.param(zarr_variable_metadata_missing, r"\['tas'\] not found", False, id="zarr-variable-metadata-missing"),
    pytest.param(variables_flag_names_absent, r"\['psl'\] not found", False, id="variables-absent"),
    pytest.param(checkpoint_variable_missing, r"\['tas'\] not found", True, id="checkpoint-variable-missing"),
    pytest.param(tas_in_furlongs, r"'tas' \(air_temperature\) has units 'furlongs'; expected 'K'", True,
                 id="wrong-units"),
    pytest.param(latitude_in_radians, r"latitude 'lat' has units 'radians'; expected degrees_north", False,
                 id="latitude-in-radians"),
    pytest.param(nan_in_tas, r"'tas' has 1 NaN/inf value", True, id="nan"),
    pytest.param(inf_in_tas, r"'tas' has 1 NaN/inf value", False, id="inf"),
    pytest.param(tas_without_lat, "not on a lat-lon grid", False, id="no-lat-dimension"),
    pytest.param(extra_dimension, r"extra dimension\(s\) \['member'\]", False, id="extra-dimension"),
    pytest.param(lat_not_monotonic, "latitude 'lat' is not monotonic", False, id="lat-not-monotonic"),
    pytest.param(duplicated_time, "duplicated time", False, id="duplicated-time"),
    pytest.param(time_is_not_a_time, "time axis 'time' holds float64 values, not times", False,
                 id="time-not-a-time"),
    pytest.param(strings_for_numbers, "'tas' holds .* not numbers", False, id="strings-for-numbers"),
    pytest.param(too_few_years, "at least 3 are needed", False, id="too-few-years"),
    pytest.param(negative_co2, "must be positive", False, id="negative-co2"),
    pytest.param(steps_zero, "must be an integer >= 1, got 0", True, id="steps-0"),
    pytest.param(batch_size_zero, "must be an integer >= 1, got 0", False, id="batch-size-0"),
    pytest.param(negative_lr, "must be a finite number > 0", False, id="negative-lr"),
    pytest.param(label_fraction_two, r"must lie in \(0, 1\], got 2", True, id="label-fraction-2"),
    pytest.param(checkpoint_of_another_domain, "a 'materials' checkpoint, not a climate one", True,
                 id="checkpoint-of-another-domain"),
    pytest.param(corrupt_config_json, "corrupt JSON", True, id="corrupt-config-json"),
    pytest.param(config_without_geometry, "no 'geometry' entry", False, id="config-without-geometry"),
    pytest.param(truncated_weights, "corrupt or truncated", False, id="truncated-weights"),
    pytest.param(evaluate_a_pretrained_checkpoint, "evaluate needs a fine-tuned one", False,
                 id="evaluate-pretrained-checkpoint"),
    pytest.param(evaluate_bad_units, r"'siconc' \(sea_ice_area_fraction\) has units 'kg'", True,
                 id="evaluate-wrong-units"),
    pytest.param(whatif_co2_factor_zero, "must be a finite number > 0, got 0", False, id="whatif-co2-factor-0"),
]


@pytest.mark.parametrize(("build", "problem", "into_good"), CASES)
def test_bad_input_fails_cleanly(build: Callable[[Good, Path], tuple[list[str], str]], problem: str,
                                 into_good: bool, good: Good, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 caplog: pytest.LogCaptureFixture) -> None:
    argv, named = build(good, tmp_path)
    out = good.out if into_good else tmp_path / "fresh_out"
    before = snapshot(good.out)
    line = fails_with_one_line([*argv, "--out", str(out)], capsys, caplog)
    assert named in line, line
    assert re.search(problem, line), line
    if into_good:
        assert snapshot(good.out) == before
    else:
        left_nothing(out)
