"""The trust boundary (SECURITY.md): no file handed to hfmi runs code, opens a connection or makes
it read outside the folder it was given.

Code execution is detected by marker files a payload would create; connections by a local TCP
listener that must see none; reads outside a folder by a secret file whose text must not show.
Every refusal is one ``hfmi: error:`` line naming the file and the field.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hfmi_kit.cli import main
from hfmi_kit.errors import CheckpointError, DataError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class Payload:
    """Unpickling it runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hfmi: error:"), err
    assert "Traceback" not in err and "unexpected" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


# ------------------------------------------------------------------ reproduce


def _card(tmp: Path, rec: dict) -> Path:
    ck = tmp / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"schema_version": 1, "domain": "materials", "reproduce": rec}))
    return ck


@pytest.mark.parametrize("case", ["hub", "papermill", "system", "function_mismatch", "unknown_entry"])
def test_reproduce_runs_no_function_a_card_names(case, tmp_path, capsys):
    marker = tmp_path / "pwned"
    ck_dir = tmp_path / "ck"
    if case == "hub":  # torch.hub.load(repo_or_dir=<the checkpoint>, source="local") imports its hubconf.py
        rec = {"function": "torch.hub.load", "kwargs": {"repo_or_dir": str(ck_dir), "model": "m", "source": "local"}}
    elif case == "papermill":
        rec = {"function": "papermill.execute_notebook", "kwargs": {"input_path": str(ck_dir / "x.ipynb"),
                                                                    "output_path": str(tmp_path / "o.ipynb")}}
    elif case == "system":
        rec = {"function": "os.system", "kwargs": {"command": f"touch {marker}"}}
    elif case == "function_mismatch":  # a real entry point's name, another function's path
        rec = {"domain": "materials", "command": "pretrain", "function": "os.system", "kwargs": {}}
    else:
        rec = {"entry": "materials.exec", "kwargs": {}}
    ck = _card(tmp_path, rec)
    (ck / "hubconf.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\ndef m(**kw):\n    pass\n")
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"open({str(marker)!r}, 'w')")])
    nbformat.write(nb, ck / "x.ipynb")
    assert main(["reproduce", str(ck), "--out", str(tmp_path / "out")]) == 1
    one_error_line(capsys, "config.json", "reproduce.")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, field", [
    ({"steps": 2, "evil": 1}, "reproduce.kwargs.evil"),  # not a parameter of materials.pretrain
    ({"steps": "2; rm -rf /"}, "reproduce.kwargs.steps"),  # wrong type
    ({"data": {"__class__": "os.system"}}, "reproduce.kwargs.data"),  # not a path
    ({"out": "/elsewhere"}, "reproduce.kwargs.out"),  # the re-run's own argument
])
def test_reproduce_checks_the_recorded_arguments_against_the_signature(kwargs, field, tmp_path, capsys):
    ck = _card(tmp_path, {"entry": "materials.pretrain", "function": "hfmi_kit.domains.materials.tasks.pretrain",
                          "kwargs": kwargs, "inputs": {}})
    assert main(["reproduce", str(ck), "--out", str(tmp_path / "out")]) == 1
    one_error_line(capsys, "config.json", field)
    assert not (tmp_path / "out").exists()


def test_every_domain_records_a_named_entry_point():
    from hfmi_kit.domains import get_domain, list_domains
    from hfmi_kit.train.provenance import ENTRY_POINTS, check_arguments

    for d in list_domains():
        get_domain(d)
    assert {f"{d}.{c}" for d in list_domains() for c in ("pretrain", "finetune")} <= set(ENTRY_POINTS)
    assert check_arguments(ENTRY_POINTS["climate.pretrain"], {"data": "x.zarr", "steps": 3, "patch": [2, 2],
                                                              "variables": ["tas"]}) == {
        "data": "x.zarr", "steps": 3, "patch": [2, 2], "variables": ["tas"]}


# ------------------------------------------------------------------ sharded (DCP) checkpoints


def _sharded_step(tmp: Path, state: dict) -> Path:
    """A step checkpoint of a materials_net.tiny whose DCP shards hold ``state``."""
    import torch.distributed.checkpoint as dcp

    step = tmp / "step-00000002"
    (step / "sharded").mkdir(parents=True)
    (step / "config.json").write_text(json.dumps({"schema_version": 1, "domain": "materials",
                                                  "model_type": "materials_net.tiny", "model_kwargs": {}}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(step / "sharded"), no_dist=True)
    return step


def _model_state() -> dict[str, torch.Tensor]:
    from hfmi_kit.domains import get_domain
    from hfmi_kit.models import create_model

    get_domain("materials")
    return create_model("materials_net.tiny").state_dict()


def test_a_sharded_checkpoint_whose_tensor_entry_is_bytes_runs_no_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    state = _model_state()
    first = next(iter(state))
    state[first] = Payload(marker)  # DCP stores a non-tensor as a pickled bytes entry
    step = _sharded_step(tmp_path, {"model": state})
    assert main(["convert", str(step), "--out", str(tmp_path / "conv")]) == 1
    one_error_line(capsys, ".metadata", first, "not a tensor")
    assert not marker.exists() and not (tmp_path / "conv").exists()
    # the training resume path reads the same shards
    from hfmi_kit.domains import get_domain
    from hfmi_kit.models import create_model
    from hfmi_kit.train.sharded import load_sharded

    get_domain("materials")
    model = create_model("materials_net.tiny")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_sharded(model, opt, step / "sharded")
    assert not marker.exists()


def test_a_sharded_checkpoint_cannot_read_outside_its_folder(tmp_path, capsys):
    step = _sharded_step(tmp_path, {"model": _model_state()})
    secret = tmp_path / "secret.bin"
    secret.write_bytes(os.urandom(1 << 16))
    md_file = step / "sharded" / ".metadata"
    from hfmi_kit.train.sharded import _MetadataUnpickler

    with open(md_file, "rb") as fh:  # read through the checked unpickler, to edit it
        md = _MetadataUnpickler(fh).load()
    for info in md.storage_data.values():
        info.relative_path = "../../secret.bin"
    md_file.write_bytes(pickle.dumps(md))
    assert main(["convert", str(step), "--out", str(tmp_path / "conv")]) == 1
    one_error_line(capsys, ".metadata", "not a file of the shard folder")


def test_a_sharded_checkpoint_opens_no_connection(tmp_path):
    step = _sharded_step(tmp_path, {"model": _model_state()})
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    # a DCP module re-exports torch's TCPStore, which connects when called; the metadata calls it
    args = pickle.dumps(("127.0.0.1", port), protocol=2)[2:-1]
    (step / "sharded" / ".metadata").write_bytes(
        b"\x80\x02ctorch.distributed.checkpoint._async_process_executor\nTCPStore\n" + args + b"R.")
    try:
        r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "convert", str(step), "--out",
                            str(tmp_path / "conv")], env=ENV, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r.stderr[-2000:]
        assert r.stderr.strip().startswith("hfmi: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "refusing torch.distributed.checkpoint._async_process_executor.TCPStore" in r.stderr
        ready, _, _ = select.select([listener], [], [], 0.5)
        assert not ready, "the checkpoint opened a connection"
    finally:
        listener.close()
    # the info command reads the same metadata
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "info", str(step)], env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "refusing" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_pickled_object_in_train_state_runs_no_code(tmp_path):
    from hfmi_kit.train.pretrained import read_train_state

    marker = tmp_path / "pwned"
    (tmp_path / "ck").mkdir()
    torch.save({"step": 1, "rng": Payload(marker)}, tmp_path / "ck" / "train_state.pt")
    with pytest.raises(CheckpointError, match="train_state.pt"):
        read_train_state(tmp_path / "ck")
    assert not marker.exists()


def test_a_truncated_weights_file_is_found_by_info(tmp_path, capsys):
    from hfmi_kit.models import create_model
    from hfmi_kit.train import save_pretrained

    _model_state()
    ck = save_pretrained(create_model("materials_net.tiny"), tmp_path / "ck",
                         config={"domain": "materials", "model_type": "materials_net.tiny", "model_kwargs": {}})
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    assert main(["info", str(ck)]) == 1
    one_error_line(capsys, "model.safetensors", "truncated")


def test_an_unknown_model_kwarg_in_a_checkpoint_is_refused(tmp_path, capsys):
    from hfmi_kit.models import create_model
    from hfmi_kit.train import save_pretrained

    _model_state()
    ck = save_pretrained(create_model("materials_net.tiny"), tmp_path / "ck",
                         config={"domain": "materials", "model_type": "materials_net.tiny",
                                 "model_kwargs": {"num_elements": 104, "evil": 1}})
    assert main(["info", str(ck)]) == 1
    one_error_line(capsys, "config.json", "model_kwargs", "'evil'")


# ------------------------------------------------------------------ data files


def test_a_zarr_store_with_a_pickle_codec_is_refused(tmp_path):
    import xarray as xr

    from hfmi_kit.data.cf import open_cf

    store = tmp_path / "s.zarr"
    xr.Dataset({"tas": (("time",), np.arange(3.0))}).to_zarr(store, zarr_format=2, consolidated=False)
    meta = json.loads((store / "tas" / ".zarray").read_text())
    meta["dtype"], meta["filters"] = "|O", [{"id": "pickle", "protocol": 5}]  # decoded by pickle.loads in zarr 2
    (store / "tas" / ".zarray").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"tas/\.zarray asks for the object dtype"):
        open_cf(store)


@pytest.mark.parametrize("kind", ["external", "virtual", "link"])
def test_a_netcdf4_file_cannot_read_another_file(kind, tmp_path):
    import h5py

    from hfmi_kit.data.cf import open_cf

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRET-0123456789")
    f = tmp_path / "data.nc"
    with h5py.File(f, "w") as h:
        if kind == "external":  # the variable's bytes live in another file
            h.create_dataset("tas", shape=(17,), dtype="u1", external=[(str(secret), 0, 17)])
        elif kind == "virtual":
            with h5py.File(tmp_path / "other.h5", "w") as o:
                o["x"] = np.arange(4.0)
            layout = h5py.VirtualLayout(shape=(4,), dtype="f8")
            layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "x", shape=(4,))
            h.create_virtual_dataset("tas", layout)
        else:
            h["grp"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/")
    with pytest.raises(DataError, match="must not refer to other files"):
        open_cf(f)


# ------------------------------------------------------------------ notebooks


@pytest.mark.parametrize("name, needle", [("nosuch", "unknown parameter"), ("x=1;import os", "not Python identifier"),
                                          ("import", "not Python identifier")])
def test_hfmi_run_checks_parameter_names_before_the_kernel_starts(name, needle, tmp_path, capsys):
    nb = Path(__file__).resolve().parents[1] / "notebooks" / "00_quickstart.py"
    out = tmp_path / "o.ipynb"
    assert main(["run", str(nb), "-p", name, "1", "-o", str(out)]) == 1
    err = one_error_line(capsys, needle)
    assert not out.exists()  # papermill never started
    if needle == "unknown parameter":
        assert "out_dir" in err  # the known ones are listed


# ------------------------------------------------------------------ the dashboard


READ_FILES = ["metrics.json", "model/config.json", "model/MODEL_CARD.md", "forecast.nc", "whatif.nc", "cases.json",
              "predictions", "maps/carbon.nc", "budget.csv", "cv_predictions.csv", "candidates.csv",
              "active_learning.json"]


def _texts(obj) -> str:
    """Every text, table and alert a Panel layout holds."""
    out = []
    for o in obj.select():
        val = getattr(o, "object", None)
        if isinstance(val, str):
            out.append(val)
        elif hasattr(val, "to_string"):
            out.append(val.to_string())
        v = getattr(o, "value", None)
        if hasattr(v, "to_string"):
            out.append(v.to_string())
    return "\n".join(out)


@pytest.mark.parametrize("name", READ_FILES)
def test_the_dashboard_reads_no_file_a_symlink_leads_out_of_the_results(name, tmp_path):
    pytest.importorskip("panel")
    from hfmi_kit.viz.dashboard import build_app
    from hfmi_kit.viz.results import load_run, scan_results

    secret_dir = tmp_path / "elsewhere"
    secret_dir.mkdir()
    secret = "SECRET-" + name.replace("/", "-")
    target = secret_dir / Path(name).name
    if name == "predictions":
        target.mkdir()
        (target / "case_pred.nii.gz").write_text(secret)
    elif name.endswith(".json"):
        target.write_text(json.dumps({"score": 1.0, "domain": "climate", "note": secret, "per_case": {}}))
    else:
        target.write_text(f"quantity,value,lower_90,upper_90\n{secret},1,0,2\n")
    root = tmp_path / "results"
    run = root / "run"
    (run / "model").mkdir(parents=True)
    (run / "maps").mkdir()
    if name != "metrics.json":
        (run / "metrics.json").write_text(json.dumps({"rmse": 1.0}))
    if name != "model/config.json":
        (run / "model" / "config.json").write_text(json.dumps({"domain": "climate", "task": "forecast"}))
    (run / "model" / "model.safetensors").write_bytes(b"")
    (run / name).symlink_to(target, target_is_directory=target.is_dir())
    r = load_run(root, "run")
    assert secret not in json.dumps({"m": r.metrics, "c": r.config, "card": r.card}, default=str)
    assert name not in r.files and not any(f.startswith(name + "/") for f in r.files)
    if name in ("metrics.json", "model/config.json", "model/MODEL_CARD.md"):
        assert any("outside the results directory" in p for p in r.problems)
    for domain in ("climate", "radiology", "carbon", "materials"):
        cfg = json.loads((run / "model" / "config.json").read_text()) if name != "model/config.json" else None
        if cfg is not None:
            cfg["domain"] = domain
            (run / "model" / "config.json").write_text(json.dumps(cfg))
        page = _texts(build_app(root, {"run": ["run"]}))
        assert secret not in page, domain
    assert [x.rel for x in scan_results(root)] == ["run"]


# ------------------------------------------------------------------ manifests and rasters


def test_dataset_json_paths_stay_inside_the_study(tmp_path):
    from hfmi_kit.domains.radiology import discover

    (tmp_path / "secret.nii.gz").write_bytes(b"x")
    study = tmp_path / "study"
    (study / "s1").mkdir(parents=True)
    (study / "s1" / "link.nii.gz").symlink_to(tmp_path / "secret.nii.gz")
    for path, needle in (("../secret.nii.gz", "stay inside"), (str(tmp_path / "secret.nii.gz"), "stay inside"),
                         ("s1/link.nii.gz", "outside")):
        (study / "dataset.json").write_text(json.dumps({"subjects": [{"id": "s1", "images": {"t1": path}}]}))
        with pytest.raises(DataError, match=needle):
            discover(study)


def test_region_json_sources_stay_inside_the_epoch_folders_and_rasters_are_geotiffs(tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    from hfmi_kit.domains.carbon.sources import _open_raster, open_region

    secret = tmp_path / "secret.tif"
    with rasterio.open(secret, "w", driver="GTiff", width=4, height=4, count=1, dtype="float32", crs="EPSG:32632",
                       transform=from_origin(0, 40, 10, 10), nodata=-1) as d:
        d.write(np.full((1, 4, 4), 42.0, np.float32))
    region = tmp_path / "region"
    (region / "epoch1").mkdir(parents=True)
    src = {"name": "optical", "file": "../../secret.tif", "kind": "raster", "units": "1", "bands": ["b"],
           "offset": [0.0], "scale": [1.0]}
    (region / "region.json").write_text(json.dumps({"epochs": [2000], "sources": [src]}))
    with pytest.raises(DataError, match="stay inside"):
        open_region(region)
    # a VRT (which names other files) under a .tif name is not read: GeoTIFF driver only
    vrt = region / "epoch1" / "optical.tif"
    vrt.write_text('<VRTDataset rasterXSize="4" rasterYSize="4"><VRTRasterBand dataType="Float32" band="1">'
                   f'<SimpleSource><SourceFilename relativeToVRT="0">{secret}</SourceFilename>'
                   '<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>')
    with rasterio.open(vrt) as plain:
        assert plain.read(1)[0, 0] == 42.0  # what GDAL would do with it
    with pytest.raises(DataError, match="not a readable GeoTIFF"):
        _open_raster(vrt)
