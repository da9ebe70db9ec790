"""Climate end to end through the CLI: pretrain, fine-tune, evaluate, what-if, CF compliance."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from hfmi_kit.cli import main
from hfmi_kit.domains.climate import GeneratorConfig, generate, write_dataset
from hfmi_kit.errors import GeometryMismatchError
from hfmi_kit.train import load_pretrained, read_config


def test_pretrain_writes_a_usable_checkpoint(climate_runs):
    ck = climate_runs["pre"] / "model"
    cfg = read_config(ck)
    assert cfg["domain"] == "climate" and cfg["model_type"] == "climate_pretrainer.tiny"
    geom = cfg["geometry"]
    assert sorted(geom["state_variables"]) == ["siconc", "tas", "tos"]
    assert geom["units"]["tas"] == "K" and "normalisation" not in geom
    assert set(cfg["processors"]["normalisation"]) >= {"tas", "tos", "siconc", "rsdt", "co2"}
    card = (ck / "MODEL_CARD.md").read_text()
    assert "climate.zarr" in card and "sha256" in card and "code_version" in card
    hist = [json.loads(x) for x in (climate_runs["pre"] / "metrics.jsonl").read_text().splitlines()]
    tr = [h for h in hist if h["split"] == "train"]
    assert tr[-1]["next_step_loss"] < 0.85 * tr[-1]["next_step_persistence"]  # it learned dynamics
    assert tr[-1]["mae_loss"] < tr[0]["mae_loss"]
    model = load_pretrained(ck)
    assert model.hfmi_config["task"] == "pretrain"


def test_finetune_metrics_beat_persistence(climate_runs):
    m = json.loads((climate_runs["ft"] / "metrics.json").read_text())
    for k in ("rmse", "rmse_persistence", "rmse_climatology", "acc", "rmse_tas_lead6", "acc_tas_lead1",
              "seaice_extent_mae"):
        assert k in m and np.isfinite(m[k]), k
    assert all(isinstance(v, float) for v in m.values())
    assert m["rmse"] < m["rmse_persistence"]  # lead 1, held-out years
    assert m["rmse_tas_lead3"] < m["rmse_persistence_tas_lead3"]
    assert m["transferred_tensors"] > 0


def test_forecast_is_cf_compliant(climate_runs):
    from compliance_checker.runner import CheckSuite, ComplianceChecker

    nc = climate_runs["ft"] / "forecast.nc"
    fc = xr.open_dataset(nc)
    assert fc["tas"].dims == ("init_time", "lead", "lat", "lon") and fc["tas"].attrs["units"] == "K"
    assert fc["tas"].attrs["standard_name"] == "air_temperature" and "history" in fc.attrs
    assert np.isnan(fc["tos"].values).any() and np.isfinite(fc["tas"].values).all()
    fc.close()
    CheckSuite.load_all_available_checkers()
    out = climate_runs["root"] / "cf_report.json"
    _, errors = ComplianceChecker.run_checker(str(nc), ["cf:1.8"], 0, "normal", output_filename=str(out),
                                              output_format="json")
    report = json.loads(out.read_text())["cf:1.8"]
    failed = [(c["name"], c["msgs"]) for c in report.get("high_priorities", []) if c["value"][0] < c["value"][1]]
    assert report.get("high_priorities") and not errors and not failed, failed


def test_evaluate_and_info(climate_runs, capsys):
    out = climate_runs["root"] / "eval"
    assert main(["evaluate", "climate", "--ckpt", str(climate_runs["ft"] / "model"), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    ft = json.loads((climate_runs["ft"] / "metrics.json").read_text())
    assert m["rmse"] == pytest.approx(ft["rmse"], rel=1e-5)  # same held-out years, same model
    capsys.readouterr()
    assert main(["info", str(climate_runs["ft"] / "model")]) == 0
    short = capsys.readouterr().out
    assert "climate forecast model climate_forecaster.tiny" in short and len(short.splitlines()) < 20
    assert f"rmse {' ' * 28}{ft['rmse']:.4g}" in short and "--full" in short  # a headline metric, as run
    assert main(["info", str(climate_runs["ft"] / "model"), "--full"]) == 0
    text = capsys.readouterr().out
    assert "climate_forecaster.tiny" in text and "## Metrics" in text and "schema_version" in text


def test_whatif_writes_cf_response(climate_runs):
    out = climate_runs["root"] / "whatif"
    assert main(["whatif", "climate", "--ckpt", str(climate_runs["ft"] / "model"), "--out", str(out),
                 "--months", "12", "--members", "3"]) == 0  # --months: the old spelling of --horizon
    m = json.loads((out / "metrics.json").read_text())
    assert {"pattern_correlation", "amplitude_ratio", "tas_response_global", "tas_response_spread"} <= set(m)
    assert m["tas_response_global_true"] > 0  # the generator warms under doubled CO2
    assert m["horizon_steps"] == 12 and m["months"] == 12  # monthly data: the old key stays true
    ds = xr.open_dataset(out / "whatif.nc")
    assert {"tas_response", "tas_response_spread", "tas_response_true"} <= set(ds.data_vars)
    assert ds["tas_response_by_step"].dims == ("step", "lat", "lon") and ds["step"].attrs["step"] == "1 month"
    ds.close()


def test_geometry_mismatch_is_a_clear_error(climate_runs, tmp_path):
    other = write_dataset(generate(GeneratorConfig(nlat=8, nlon=16, years=3, spinup_years=2)),
                          tmp_path / "coarse.zarr")
    from hfmi_kit.domains.climate import evaluate

    ds = xr.open_zarr(other)
    assert ds.sizes["lat"] == 8
    # a grid the model was not trained on is regridded onto its grid, never silently misread
    m = evaluate(ckpt=climate_runs["ft"] / "model", data=other, out=tmp_path / "ev")
    assert np.isfinite(m["rmse"])
    dropped = write_dataset(xr.open_zarr(climate_runs["data"]).drop_vars("co2"), tmp_path / "noco2.zarr")
    with pytest.raises(GeometryMismatchError, match="scalar forcing.*co2"):
        evaluate(ckpt=climate_runs["ft"] / "model", data=dropped, out=tmp_path / "ev2")


def test_cli_errors_are_one_line(tmp_path, capsys):
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "evaluate", "climate", "--ckpt",
                        str(tmp_path / "nope"), "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "checkpoint directory not found" in r.stderr
    for cmd in ("pretrain", "finetune", "evaluate", "info", "run", "demo", "whatif"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and "usage: hfmi" in capsys.readouterr().out, cmd
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "sweep " in top and "SUPPRESS" not in top and "sweep-task" not in top  # internal: not listed


def test_finetune_from_scratch_and_seaice_task(climate_runs, tmp_path):
    assert main(["finetune", "climate", "--from", "scratch", "--data", str(climate_runs["data"]),
                 "--out", str(tmp_path / "scratch"), "--steps", "10", "--batch-size", "4"]) == 0
    m = json.loads((tmp_path / "scratch" / "metrics.json").read_text())
    assert "transferred_tensors" not in m and np.isfinite(m["rmse"])
    assert main(["finetune", "climate", "--from", str(climate_runs["pre"] / "model"), "--task", "seaice",
                 "--out", str(tmp_path / "ice"), "--steps", "30", "--mode", "frozen", "--batch-size", "4"]) == 0
    s = json.loads((tmp_path / "ice" / "metrics.json").read_text())
    assert {"extent_mae", "extent_mae_persistence", "extent_mae_climatology"} <= set(s)
    assert main(["finetune", "climate", "--from", str(climate_runs["pre"] / "model"), "--task", "nope",
                 "--out", str(tmp_path / "x")]) == 1


def test_pressure_levels_through_the_cli_round_trip_to_the_forecast(tmp_path, capsys):
    data = write_dataset(generate(GeneratorConfig(years=3, spinup_years=1, seed=4, pressure_levels=(850, 500, 250))),
                         tmp_path / "plev.nc")
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert main(["pretrain", "climate", "--data", str(data), "--out", str(pre), "--steps", "3",
                 "--levels", "500,850"]) == 0
    geo = read_config(pre / "model")["geometry"]
    assert geo["state_variables"] == ["tas", "tos", "siconc", "ta_850", "ta_500"]
    assert geo["levels"]["ta_850"]["units"] == "hPa"
    assert main(["finetune", "climate", "--from", str(pre / "model"), "--out", str(ft), "--steps", "3",
                 "--leads", "2", "--levels", "500"]) == 1  # a checkpoint's levels are its own
    assert "--levels chooses the levels of a model trained from scratch" in capsys.readouterr().err
    assert main(["finetune", "climate", "--from", str(pre / "model"), "--out", str(ft), "--steps", "3",
                 "--leads", "2"]) == 0
    fc = xr.open_dataset(ft / "forecast.nc")
    assert fc["ta"].dims == ("init_time", "lead", "plev", "lat", "lon")
    assert list(fc["plev"].values) == [850.0, 500.0] and fc["plev"].attrs["units"] == "hPa"
    assert "rmse_ta_500_lead2" in json.loads((ft / "metrics.json").read_text())


def _eofs_data(name: str):
    eofs = pytest.importorskip("eofs")
    from pathlib import Path

    return Path(eofs.__file__).parent / "examples" / "example_data" / name


def test_real_reanalysis_500hpa_heights_of_annual_winters_train_end_to_end(tmp_path, capsys):
    """NCEP/NCAR reanalysis DJF-mean 500 hPa geopotential height 1948-2012 on a 2.5 degree grid of
    29 x 49 cells, as the eofs package ships it: a pressure coordinate (one level), one step a year
    (dated mid-January, one at 12:00), a grid no patch divides, and no units on the variable."""
    src = _eofs_data("hgt_djf.nc")
    out = tmp_path / "pre"
    assert main(["pretrain", "climate", "--data", str(src), "--out", str(out), "--steps", "2"]) == 1
    err = capsys.readouterr().err
    assert f"{src}: variable 'z' (geopotential_height) has no 'units' attribute; CF requires one" in err
    ds = xr.open_dataset(src)
    ds["z"].attrs["units"] = "m"  # the one fix CF asks of the file
    data = tmp_path / "hgt_djf.nc"
    ds.to_netcdf(data)
    assert main(["pretrain", "climate", "--data", str(data), "--out", str(out), "--steps", "3"]) == 0
    geo = read_config(out / "model")["geometry"]
    assert geo["state_variables"] == ["z_500"] and geo["time_step"] == "1 year" and geo["climatology"] == "none"
    assert main(["finetune", "climate", "--from", str(out / "model"), "--out", str(tmp_path / "ft"), "--steps", "3",
                 "--leads", "3"]) == 0
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert np.isfinite(m["rmse_z_500_lead3"]) and 10 < m["rmse_climatology"] < 200  # metres of 500 hPa height
    fc = xr.open_dataset(tmp_path / "ft" / "forecast.nc")
    assert fc["z"].dims == ("init_time", "lead", "pressure", "lat", "lon") and float(fc["pressure"][0]) == 500.0
    assert fc["lead"].attrs["long_name"] == "forecast lead in steps of 1 year"
    from hfmi_kit.domains.climate.plots import lead_step, skill_vs_lead

    assert lead_step(fc) == "1 year"  # the skill plot counts leads in years, not months
    plot = skill_vs_lead(m, "z_500", step=lead_step(fc))
    import holoviews as hv

    assert set(plot.traverse(lambda c: c.kdims[0].name, [hv.Curve])) == {"lead [steps of 1 year]"}


def test_a_360_day_calendar_runs_and_is_written_back_on_its_calendar(tmp_path):
    import cftime

    ds = generate(GeneratorConfig(years=4, spinup_years=1, seed=5))
    t = [cftime.Datetime360Day(2000 + i // 12, i % 12 + 1, 16) for i in range(ds.sizes["time"])]
    ds = ds.assign_coords(time=xr.DataArray(t, dims="time", attrs=ds["time"].attrs))
    ds["time"].encoding = {"units": "days since 2000-01-01", "calendar": "360_day"}
    data = write_dataset(ds, tmp_path / "c360.nc")
    assert main(["finetune", "climate", "--from", "scratch", "--data", str(data), "--out", str(tmp_path / "ft"),
                 "--steps", "3", "--leads", "2"]) == 0
    assert read_config(tmp_path / "ft" / "model")["geometry"]["calendar"] == "360_day"
    fc = xr.open_dataset(tmp_path / "ft" / "forecast.nc", use_cftime=True)
    assert fc["valid_time"].values.ravel()[0].calendar == "360_day"


def test_the_windowed_layout_pretrains_and_its_fine_tuning_keeps_it(tmp_path, capsys):
    data = write_dataset(generate(GeneratorConfig(years=3, spinup_years=1, seed=6)), tmp_path / "c.nc")
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert main(["pretrain", "climate", "--data", str(data), "--out", str(pre), "--steps", "3", "--layout", "windowed",
                 "--window", "2,4"]) == 0
    mk = read_config(pre / "model")["model_kwargs"]
    assert (mk["layout"], mk["window"], mk["periodic"]) == ("windowed", [2, 4], True)
    assert main(["finetune", "climate", "--from", str(pre / "model"), "--out", str(ft), "--steps", "3",
                 "--leads", "2", "--layout", "groups", "--window", "4,4"]) == 1
    assert "keeps the layout it was pretrained with" in capsys.readouterr().err
    assert main(["finetune", "climate", "--from", str(pre / "model"), "--out", str(ft), "--steps", "3",
                 "--leads", "2"]) == 0
    m = json.loads((ft / "metrics.json").read_text())
    assert m["transferred_tensors"] > 10 and np.isfinite(m["rmse_tas_lead2"])
    assert read_config(ft / "model")["model_kwargs"]["layout"] == "windowed"


def test_the_shipped_checkpoint_fine_tunes_on_its_run_made_again_and_evaluates(tmp_path, capsys):
    """``climate.tiny`` ships with the package: listed, loaded strictly, and fine-tuned from by
    name without ``--data``: the generated run it was pretrained on is made again, byte for byte
    the one its record names (so the same years are held out); the result evaluates."""
    from shipped import shipped_checkpoint

    from hfmi_kit.train.provenance import digest

    ckpt, cfg = shipped_checkpoint("climate.tiny", {"seed": 0, "small": True})
    ft = tmp_path / "ft"
    assert main(["finetune", "climate", "--from", "climate.tiny", "--out", str(ft), "--steps", "5",
                 "--batch-size", "4"]) == 0
    assert "generating the example data climate.tiny was pretrained on (seed 0)" in capsys.readouterr().out
    assert digest(ft / "data" / "climate.zarr") == cfg["reproduce"]["inputs"]["data"]["sha256"]
    assert read_config(ft / "model")["training"]["from"] == str(ckpt)
    assert main(["evaluate", "climate", "--ckpt", str(ft / "model"), "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert 0 < ev["rmse"] < ev["rmse_climatology"] * 3
