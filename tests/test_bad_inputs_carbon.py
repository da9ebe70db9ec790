"""Carbon: bad input fails with one purposeful line and leaves no trace.

Every case copies one small good region (the generator behind ``example_data``, at 64 x 64 cells
and 60 plots so that each case reads it in a fraction of a second), breaks one thing and runs
the command line in-process: exit 1, exactly one stderr line ``hfmi: error: ...`` that names the
file (or parameter) and the problem, no traceback, no fresh ``--out`` left behind, and a
previously good output folder (a real short pretraining run) byte for byte unchanged when the
command is pointed at it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pytest.importorskip("laspy")

from badinput import fails_with_one_line, left_nothing, snapshot  # noqa: E402

from hfmi_kit.cli import main  # noqa: E402
from hfmi_kit.domains.carbon.synth import LandscapeConfig, generate_region  # noqa: E402

FAST = ("--steps", "2", "--batch-size", "2")
PRETRAIN = ("pretrain", "carbon", "--data", "{data}", "--out", "{out}", *FAST)
FINETUNE = ("finetune", "carbon", "--from", "scratch", "--data", "{data}", "--out", "{out}", *FAST)


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small good region: two epochs of optical, radar and lidar, 60 field plots."""
    return generate_region(tmp_path_factory.mktemp("carbon") / "region", LandscapeConfig(size=64, plots=60, seed=0))


@pytest.fixture(scope="module")
def good(region: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A previously good output folder: a real two-step pretraining run."""
    out = tmp_path_factory.mktemp("good") / "pretrained"
    assert main(["pretrain", "carbon", "--data", str(region), "--out", str(out), *FAST]) == 0
    return out



# ------------------------------------------------------------------------------------ breakers

def _meta(r: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    meta = json.loads((r / "region.json").read_text())
    (r / "region.json").write_text(json.dumps(edit(meta)))


def _source(name: str, **changes: Any) -> Callable[[Path], None]:
    def edit(r: Path) -> None:
        def change(meta: dict[str, Any]) -> dict[str, Any]:
            s = next(s for s in meta["sources"] if s["name"] == name)
            for k, v in changes.items():
                if v is None:
                    del s[k]
                else:
                    s[k] = v
            return meta
        _meta(r, change)
    return edit


def _region_list(r: Path) -> None:
    _meta(r, lambda m: m["sources"])


def _region_invalid(r: Path) -> None:
    (r / "region.json").write_text('{"epochs": [1997, 2001], "sources": [')


def _region_missing(r: Path) -> None:
    (r / "region.json").unlink()


def _epochs_string(r: Path) -> None:
    _meta(r, lambda m: {**m, "epochs": "1997"})


def _source_nowhere(r: Path) -> None:
    def add(m: dict[str, Any]) -> dict[str, Any]:
        m["sources"].append({"name": "thermal", "file": "thermal.tif", "kind": "raster", "bands": ["lst"],
                             "units": "K", "offset": [290.0], "scale": [10.0]})
        return m
    _meta(r, add)


def _epoch_folder_missing(r: Path) -> None:
    shutil.rmtree(r / "epoch2")


def _rewrite(path: Path, data: Callable[[np.ndarray], np.ndarray] | None = None, **profile: Any) -> None:
    with rasterio.open(path) as src:
        arr, prof, tags = src.read(), src.profile, [src.tags(b + 1) for b in range(src.count)]
    arr = data(arr) if data else arr
    prof.update(count=arr.shape[0], **profile)
    path.unlink()
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(arr)
        for b in range(arr.shape[0]):
            dst.update_tags(b + 1, **tags[min(b, len(tags) - 1)])


def _tif_zero(r: Path) -> None:
    (r / "epoch1" / "optical.tif").write_bytes(b"")


def _tif_truncated(r: Path) -> None:
    p = r / "epoch2" / "optical.tif"
    p.write_bytes(p.read_bytes()[:2000])


def _tif_all_nan(r: Path) -> None:
    _rewrite(r / "epoch1" / "radar.tif", lambda a: np.full_like(a, np.nan))


def _tif_inf(r: Path) -> None:
    def edit(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[2, 10:20, 10:20] = np.inf
        return a
    _rewrite(r / "epoch2" / "optical.tif", edit)


def _tif_bands(r: Path) -> None:
    _rewrite(r / "epoch1" / "radar.tif", lambda a: np.concatenate([a, a[:1]]))


def _tif_no_crs(r: Path) -> None:
    _rewrite(r / "epoch2" / "radar.tif", crs=None)


def _las_truncated(r: Path) -> None:
    p = r / "epoch1" / "lidar.laz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _csv(name: str, edit: Callable[[list[list[str]]], None]) -> Callable[[Path], None]:
    def run(r: Path) -> None:
        rows = [line.split(",") for line in (r / name).read_text().splitlines()]
        edit(rows)
        (r / name).write_text("\n".join(",".join(x) for x in rows) + "\n")
    return run


def _cell(column: str, value: str, row: int = 1) -> Callable[[list[list[str]]], None]:
    def edit(rows: list[list[str]]) -> None:
        rows[row][rows[0].index(column)] = value
    return edit


def _drop(column: str) -> Callable[[list[list[str]]], None]:
    def edit(rows: list[list[str]]) -> None:
        i = rows[0].index(column)
        for x in rows:
            del x[i]
    return edit


def _extra_field(rows: list[list[str]]) -> None:
    rows[3] += ["1", "2"]


def _plots_empty(r: Path) -> None:
    (r / "plots.csv").write_bytes(b"")


def _nothing(r: Path) -> None:
    pass


@dataclass(frozen=True)
class Case:
    """One bad input: how the good region is broken, the command, what the error line must say."""

    id: str
    edit: Callable[[Path], None]
    argv: tuple[str, ...]
    expect: tuple[str, ...]  # substrings of the error line: the file or parameter, then the problem
    good_out: bool = False  # point --out at the previously good output folder


CASES = [
    Case("region-json-list", _region_list, PRETRAIN, ("region.json", "JSON object", "list"), good_out=True),
    Case("region-json-invalid", _region_invalid, PRETRAIN, ("region.json", "invalid JSON")),
    Case("region-json-missing", _region_missing, PRETRAIN, ("region", "no region.json")),
    Case("epochs-string", _epochs_string, PRETRAIN, ("region.json", "'epochs'", "list of years")),
    Case("source-unknown-kind", _source("radar", kind="hyperspectral"), PRETRAIN,
         ("region.json", "'radar'", "kind", "'hyperspectral'"), good_out=True),
    Case("source-missing-units", _source("optical", units=None), PRETRAIN,
         ("region.json", "'optical'", "missing", "units")),
    Case("source-scale-text", _source("radar", scale=["a", "b"]), PRETRAIN, ("region.json", "'radar'", "scale")),
    Case("source-in-no-epoch", _source_nowhere, PRETRAIN, ("region.json", "'thermal'", "thermal.tif", "epoch1",
                                                          "epoch2"), good_out=True),
    Case("epoch-folder-missing", _epoch_folder_missing, PRETRAIN, ("epoch2", "region.json", "missing")),
    Case("wrong-units", _source("radar", units="linear"), PRETRAIN, ("radar.tif", "units", "'dB'", "'linear'"),
         good_out=True),
    Case("tif-zero-bytes", _tif_zero, PRETRAIN, ("optical.tif", "empty file")),
    Case("tif-truncated", _tif_truncated, PRETRAIN, ("optical.tif", "truncated")),
    Case("tif-all-nan", _tif_all_nan, PRETRAIN, ("radar.tif", "no valid value"), good_out=True),
    Case("tif-inf", _tif_inf, PRETRAIN, ("optical.tif", "infinite")),
    Case("tif-wrong-bands", _tif_bands, PRETRAIN, ("radar.tif", "3 band(s)", "describes 2")),
    Case("tif-no-crs", _tif_no_crs, PRETRAIN, ("radar.tif", "no CRS")),
    Case("las-truncated", _las_truncated, PRETRAIN, ("lidar.laz", "LAS")),
    Case("plots-missing-column", _csv("plots.csv", _drop("lat")), PRETRAIN, ("plots.csv", "['lat']")),
    Case("plots-nan", _csv("plots.csv", _cell("lon", "nan")), PRETRAIN, ("plots.csv", "row 2", "lon", "not a number"),
         good_out=True),
    Case("plots-text", _csv("plots.csv", _cell("lat", "north", 4)), PRETRAIN, ("plots.csv", "row 5", "'north'")),
    Case("plots-lat-range", _csv("plots.csv", _cell("lat", "95.0")), PRETRAIN, ("plots.csv", "lat", "-90..90")),
    Case("plots-empty", _plots_empty, PRETRAIN, ("plots.csv", "empty")),
    Case("trees-negative-dbh", _csv("trees.csv", _cell("dbh_cm", "-5.0")), PRETRAIN,
         ("trees.csv", "row 2", "dbh_cm=", "-5", "plausible range")),
    Case("trees-malformed", _csv("trees.csv", _extra_field), PRETRAIN, ("trees.csv", "malformed CSV")),
    Case("labels-zero", _nothing, (*FINETUNE, "--labels", "0"), ("--labels", "got 0"), good_out=True),
    Case("head-forest-scratch", _nothing, (*FINETUNE, "--head", "forest"), ("--head forest", "checkpoint")),
    Case("head-unknown", _nothing, (*FINETUNE, "--head", "lasso"), ("--head", "lasso")),
    Case("from-not-a-checkpoint", _nothing,
         ("finetune", "carbon", "--from", "{data}", "--data", "{data}", "--out", "{out}", *FAST),
         ("config.json", "missing"), good_out=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_with_one_line(case: Case, region: Path, good: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "region"
    shutil.copytree(region, data)
    case.edit(data)
    out = good if case.good_out else tmp_path / "out"
    before = snapshot(good)
    argv = [a.format(data=data, out=out) for a in case.argv]
    line = fails_with_one_line(argv, capsys)
    for s in case.expect:
        assert s in line, f"{s!r} not in {line!r}"
    left_nothing(tmp_path / "out")
    assert snapshot(good) == before
