"""Notebooks: paired and in sync, a parameters cell each, and they run headless via papermill."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pandas as pd
import pytest

from hfmi_kit.cli import main
from hfmi_kit.errors import NotebookError
from hfmi_kit.launch.notebook import has_parameters_cell, run_notebook

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "notebooks").rglob("*.py"))


def _code(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("py", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_pairs_are_in_sync_and_have_parameters(py: Path):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{py} has no paired {ipynb.name}; run `jupytext --sync {py}`"
    a, b = jupytext.read(py), nbformat.read(ipynb, as_version=4)
    assert _code(a) == _code(b), f"{py} and {ipynb.name} are out of sync; run `jupytext --sync {py}`"
    assert has_parameters_cell(a) and has_parameters_cell(b)


def test_every_notebook_has_a_pair():
    for nb in (REPO / "notebooks").rglob("*.ipynb"):
        if ".ipynb_checkpoints" in nb.parts:
            continue
        assert nb.with_suffix(".py").is_file(), nb


def test_climate_notebooks_chain_through_hfmi_run(tmp_path):
    from hfmi_kit.checkpoints import shipped
    from hfmi_kit.train import read_config

    # 02 starts from its defaults: the shipped climate.tiny, on its generated run made again;
    # 01_pretrain runs live in JupyterLab (test_jupyterlab.py)
    nbdir = REPO / "notebooks" / "climate"
    ft = tmp_path / "ft"
    assert main(["run", str(nbdir / "02_finetune.py"), "-p", "steps", "20",
                 "-p", "batch_size", "4", "-p", "out_dir", str(ft), "-p", "whatif_members", "2",
                 "-o", str(tmp_path / "02.ipynb")]) == 0
    assert json.loads((ft / "pretrained" / "metrics.json").read_text())["label_fraction"] == 0.25
    assert read_config(ft / "pretrained" / "model")["training"]["from"] == str(shipped()["climate.tiny"])
    assert (ft / "data" / "example_data.json").is_file()  # the run, made again under the notebook's folder
    assert (ft / "scratch" / "metrics.json").is_file() and (ft / "whatif" / "whatif.nc").is_file()
    assert main(["run", str(nbdir / "03_visualize.py"), "-p", "run_dir", str(ft / "pretrained"),
                 "-p", "whatif_dir", str(ft / "whatif"), "-o", str(tmp_path / "03.ipynb")]) == 0
    nb = nbformat.read(tmp_path / "03.ipynb", as_version=4)
    assert any("application/vnd.holoviews_exec.v0+json" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))


def test_radiology_notebooks_chain_through_hfmi_run(tmp_path):
    pytest.importorskip("nilearn")
    pytest.importorskip("monai")
    from hfmi_kit.checkpoints import shipped
    from hfmi_kit.domains.radiology.synth import StudyConfig, generate_study
    from hfmi_kit.train import read_config

    # 02 starts from its default, the shipped radiology.tiny, on a small study of the same
    # modalities; 01_pretrain runs live in JupyterLab (test_jupyterlab.py)
    nbdir = REPO / "notebooks" / "radiology"
    ft = tmp_path / "ft"
    study = generate_study(tmp_path / "study", StudyConfig(unlabelled=0, labelled=5, spacing_scale=1.6, seed=1))
    assert main(["run", str(nbdir / "02_finetune.py"), "-p", "data_path", str(study), "-p", "steps", "4",
                 "-p", "budgets", "[2]", "-p", "out_dir", str(ft), "-o", str(tmp_path / "02.ipynb")]) == 0
    m = json.loads((ft / "n2" / "metrics.json").read_text())
    assert {"dice", "dice_scratch", "dice_unet"} <= set(m)
    assert read_config(ft / "n2" / "model")["training"]["from"] == str(shipped()["radiology.tiny"])
    assert main(["run", str(nbdir / "03_visualize.py"), "-p", "finetuned", str(ft / "n2" / "model"),
                 "-p", "positions", "[45, 55]", "-p", "out_dir", str(tmp_path / "vis"),
                 "-o", str(tmp_path / "03.ipynb")]) == 0
    nb = nbformat.read(tmp_path / "03.ipynb", as_version=4)
    assert any("application/vnd.holoviews_exec.v0+json" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))
    assert "same affine as input: True same shape: True" in json.dumps([c.get("outputs") for c in nb.cells])


def test_failing_cell_and_dead_kernel_are_reported(tmp_path):
    nb = tmp_path / "bad.py"
    nb.write_text("# %% tags=[\"parameters\"]\nx = 1\n\n# %%\nraise ValueError(f'bad x={x}')\n")
    with pytest.raises(NotebookError, match=r"cell .* raised ValueError: bad x=5"):
        run_notebook(nb, {"x": 5}, output=tmp_path / "bad.ipynb")
    dead = tmp_path / "dead.py"
    dead.write_text("# %% tags=[\"parameters\"]\nx = 1\n\n# %%\n"
                    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "run", str(dead), "-o", str(tmp_path / "d.ipynb")],
                       capture_output=True, text=True, timeout=300, env={**os.environ})
    assert r.returncode == 1
    assert "kernel died while running cell 1" in r.stderr and "import os, signal" in r.stderr
    with pytest.raises(NotebookError, match="no cell tagged 'parameters'"):
        noparam = tmp_path / "np.py"
        noparam.write_text("# %%\nx = 1\n")
        run_notebook(noparam, {"x": 2})


def test_materials_notebooks_chain_through_hfmi_run(tmp_path):
    pytest.importorskip("pymatgen")
    pytest.importorskip("pvlib")
    # 02 and 03 start from their default, the shipped materials.tiny; 01_pretrain runs live in
    # JupyterLab (test_jupyterlab.py)
    nbdir = REPO / "notebooks" / "materials"
    ft, vis = tmp_path / "ft", tmp_path / "vis"
    assert main(["run", str(nbdir / "02_finetune.py"), "-p", "steps", "20",
                 "-p", "budgets", "[50]", "-p", "folds", "2", "-p", "members", "2", "-p", "out_dir", str(ft),
                 "-o", str(tmp_path / "02.ipynb")]) == 0
    m = json.loads((ft / "n50" / "metrics.json").read_text())
    assert {"mae_ev", "mae_ev_scratch", "mae_ev_rf", "mae_ev_dummy"} <= set(m) and m["labels_per_fold"] == 50
    from hfmi_kit.checkpoints import shipped
    from hfmi_kit.train import read_config

    assert read_config(ft / "n50" / "model")["training"]["from"] == str(shipped()["materials.tiny"])
    assert main(["run", str(nbdir / "03_visualize.py"), "-p", "finetuned", str(ft / "n50" / "model"),
                 "-p", "al_budget", "30", "-p", "al_repeats", "1",
                 "-p", "out_dir", str(vis), "-o", str(tmp_path / "03.ipynb")]) == 0
    cands = pd.read_parquet(vis / "candidates.parquet")
    assert {"formula", "prediction_ev", "uncertainty_ev", "sq_limit_pct", "provenance"} <= set(cands.columns)
    from hfmi_kit.domains.materials.discover import ALResult

    al = ALResult.load(vis / "active_learning.json")  # what the dashboard reads
    assert set(al.hits) == {"random", "foundation", "magpie"} and al.hits["random"].shape == (1, 30)
    nb = nbformat.read(tmp_path / "03.ipynb", as_version=4)
    assert any("application/vnd.holoviews_exec.v0+json" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))


def test_carbon_notebooks_chain_through_hfmi_run(tmp_path):
    pytest.importorskip("rasterio")
    pytest.importorskip("laspy")
    from hfmi_kit.checkpoints import shipped
    from hfmi_kit.domains.carbon import LandscapeConfig, generate_region
    from hfmi_kit.train import read_config

    # 02 starts from its default, the shipped carbon.tiny, on a small region of the same sources
    # (test_carbon_e2e.py fine-tunes it on its own region, made again); 01_pretrain runs live in
    # JupyterLab (test_jupyterlab.py)
    nbdir = REPO / "notebooks" / "carbon"
    ft = tmp_path / "ft"
    region = generate_region(tmp_path / "region", LandscapeConfig(size=64, plots=60, seed=1))
    assert main(["run", str(nbdir / "02_finetune.py"), "-p", "data_path", str(region), "-p", "steps", "5",
                 "-p", "budgets", "[20]", "-p", "calibration_folds", "2", "-p", "out_dir", str(ft),
                 "-o", str(tmp_path / "02.ipynb")]) == 0
    m = json.loads((ft / "n20" / "metrics.json").read_text())
    assert {"rmse_mg_ha", "rmse_mg_ha_rf", "rmse_mg_ha_scratch", "coverage_90"} <= set(m)
    assert read_config(ft / "n20" / "model")["training"]["from"] == str(shipped()["carbon.tiny"])
    assert main(["run", str(nbdir / "03_visualize.py"), "-p", "finetuned", str(ft / "n20" / "model"),
                 "-p", "out_dir", str(tmp_path / "vis"), "-o", str(tmp_path / "03.ipynb")]) == 0
    nb = nbformat.read(tmp_path / "03.ipynb", as_version=4)
    assert any("application/vnd.holoviews_exec.v0+json" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))
    assert (tmp_path / "vis" / "budget.csv").is_file()


_COMMAND = {"01_pretrain": "pretrain", "02_finetune": "finetune", "03_visualize": "evaluate"}


@pytest.mark.parametrize("py", [p for p in SCRIPTS if p.parent.name in ("climate", "radiology", "materials", "carbon")
                                and p.stem in _COMMAND], ids=lambda p: str(p.relative_to(REPO)))
def test_notebook_parameters_are_the_typed_task_options(py: Path):
    """A notebook parameter named like an option of the task it runs (``data_path`` is ``data``)
    has a default of that option's type: the task's signature is the one declaration."""
    import ast

    from hfmi_kit.config import check_options
    from hfmi_kit.domains import get_domain

    nb = jupytext.read(py)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    values = {t.id: ast.literal_eval(n.value) for n in ast.parse(cell.source).body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name)}
    assert "data" not in values or "data_path" in values, "data is the old spelling; the parameter is data_path"
    opts = get_domain(py.parent.name).options(_COMMAND[py.stem])
    given = {("data" if k == "data_path" else k): v for k, v in values.items() if k != "data"}
    shared = {k: v for k, v in given.items() if k in opts and v not in ("", None)}
    check_options(opts, shared, what=f"{py.parent.name} {_COMMAND[py.stem]} (notebook {py.name})")
    if py.stem != "03_visualize":
        assert {"seed"} <= set(shared) and len(shared) >= 2, shared


def test_notebooks_started_together_talk_over_private_sockets(tmp_path):
    """Kernels started at once on a node must not race for TCP ports (a lost race hangs the run)."""
    from concurrent.futures import ThreadPoolExecutor

    nb = tmp_path / "who.py"
    nb.write_text("# %% tags=[\"parameters\"]\nx = 1\n\n# %%\n"
                  "from ipykernel.connect import get_connection_info\n"
                  "info = get_connection_info(unpack=True)\nprint(x, info['transport'], info['ip'])\n")
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: run_notebook(nb, {"x": i}, output=tmp_path / f"who{i}.ipynb"), range(4)))
    seen = [nbformat.read(o, as_version=4).cells[-1].outputs[0]["text"].split() for o in outs]
    assert [s[:2] for s in seen] == [[str(i), "ipc"] for i in range(4)]
    assert len({s[2] for s in seen}) == 4  # one private socket folder each, none left behind
    assert not any(Path(s[2]).parent.exists() for s in seen)


def test_an_executed_notebook_is_plain_trusted_and_runs_where_the_caller_is(tmp_path, monkeypatch):
    """Relative parameters mean what they mean to the caller; the executed copy carries no
    jupytext pairing (opening it would write a .py beside it) and is signed as trusted."""
    from nbformat.sign import NotebookNotary

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))  # this test's signature store
    nbdir, caller = tmp_path / "nbs", tmp_path / "caller"
    nbdir.mkdir()
    caller.mkdir()
    src = nbdir / "w.py"
    src.write_text("# ---\n# jupyter:\n#   jupytext:\n#     formats: ipynb,py:percent\n# ---\n\n"
                   "# %% tags=[\"parameters\"]\nout = 'x.txt'\n\n# %%\nopen(out, 'w').write('hi')\n")
    monkeypatch.chdir(caller)
    out = run_notebook(src, {"out": "x.txt"}, output=tmp_path / "w.ipynb")
    assert (caller / "x.txt").read_text() == "hi" and not (nbdir / "x.txt").exists()
    nb = nbformat.read(out, as_version=4)
    assert "jupytext" not in nb.metadata
    assert NotebookNotary().check_signature(nb)


def _chromium():
    """playwright's ``sync_playwright`` and Debian's Chromium, or skip."""
    import shutil

    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return sync_playwright, exe


def _executed_html(tmp_path: Path, name: str, parameters: str, code: str) -> Path:
    """A two-cell notebook (``parameters``, then ``code``) run by papermill and exported to HTML."""
    src = tmp_path / f"{name}.py"
    src.write_text(f"# %% tags=[\"parameters\"]\n{parameters}\n\n# %%\n{code}")
    out = run_notebook(src, {}, output=tmp_path / f"{name}.ipynb", cwd=tmp_path)
    html = tmp_path / f"{name}.html"
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", str(out), "--output", str(html)],
                   check=True, capture_output=True, timeout=300)
    return html


def test_an_executed_notebooks_plots_render_with_the_network_blocked(tmp_path):
    """Compute nodes have no internet: an executed notebook's plots must not need the Bokeh or
    HoloViz CDN. Its HTML export is opened in Chromium with every request but file:// refused."""
    sync_playwright, exe = _chromium()
    html = _executed_html(tmp_path, "plot", "n = 3", "from hfmi_kit.viz.core import curves\n"
                          "curves({'a': (list(range(n)), [1.0, 3.0, 2.0])}, xlabel='step', ylabel='loss')\n")
    refused: list[str] = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True)
        page = b.new_page()

        def route(r):
            if r.request.url.startswith("file:"):
                r.continue_()
            else:
                refused.append(r.request.url)
                r.abort()

        page.route("**/*", route)
        page.goto(html.as_uri())
        page.wait_for_selector("canvas", timeout=30_000)  # BokehJS came with the notebook, not a CDN
        b.close()
    # nbconvert's own HTML template asks cdnjs for require.js and MathJax; nothing else may leave:
    # neither BokehJS nor Panel's stylesheets come from a CDN
    assert not [u for u in refused if not u.startswith("https://cdnjs.cloudflare.com/ajax/libs/")], refused


def test_a_saved_notebooks_radiology_viewer_keeps_one_slider_per_plane(tmp_path):
    """The three-plane viewer in an executed notebook, opened offline in Chromium: one output per
    plane, each with its own slider in mm; moving the coronal one changes the coronal row only."""
    import io

    import numpy as np
    from PIL import Image

    sync_playwright, exe = _chromium()
    html = _executed_html(tmp_path, "viewer", "n = 20", "import numpy as np\n"
                          "from hfmi_kit.domains.radiology.plots import orthoviews\n"
                          "vol = np.random.default_rng(0).random((n, n + 4, n - 4)).astype('float32')\n"
                          "orthoviews(vol, {'true': (vol > 0.9).astype('uint8')}, positions=[25, 50, 75], size=120,\n"
                          "           affine=np.diag([0.8, 0.8, 2.5, 1.0]))\n")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True)
        page = b.new_page(viewport={"width": 1000, "height": 1400})
        page.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort())
        page.goto(html.as_uri())
        page.wait_for_selector("canvas", timeout=30_000)
        page.wait_for_timeout(1500)
        outs = page.locator(".jp-OutputArea-output").filter(has=page.locator("canvas"))
        assert outs.count() == 3  # sagittal, coronal, axial: each its own output
        planes = ("sagittal", "coronal", "axial")
        for i, plane in enumerate(planes):  # each output holds its plane's slider and no other
            assert [outs.nth(i).get_by_text(re.compile(f"^{q} \\[mm\\]:")).count() > 0 for q in planes] == [
                q == plane for q in planes], plane

        def state() -> tuple[list[list[str]], list[np.ndarray]]:  # the slider labels and pixels of each row
            return ([outs.nth(i).get_by_text(re.compile(r"\[mm\]:")).all_inner_texts() for i in range(3)],
                    [np.asarray(Image.open(io.BytesIO(outs.nth(i).screenshot())).convert("L"), np.int16)
                     for i in range(3)])

        labels, before = state()
        handle = outs.nth(1).locator(".noUi-handle").first
        handle.focus()
        handle.press("ArrowRight")
        page.wait_for_timeout(1500)
        moved, after = state()
        b.close()
    assert moved[1] != labels[1] and moved[0] == labels[0] and moved[2] == labels[2], (labels, moved)
    changed = [float(np.mean(a != b_)) if a.shape == b_.shape else 1.0 for a, b_ in zip(before, after)]
    # the coronal row shows another slice; the others keep theirs (but for a few anti-aliased pixels)
    assert changed[1] > 0.02 and changed[0] < 0.002 and changed[2] < 0.002, changed


def test_hfmi_run_says_which_cell_runs_at_least_every_10_s(tmp_path):
    """No silent minutes: a long cell is named on stderr while it runs."""
    nb = tmp_path / "slow.py"
    nb.write_text("# %% tags=[\"parameters\"]\nn = 1\n\n# %%\nimport time\ntime.sleep(11)\n")
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "run", str(nb), "-p", "n", "2",
                        "-o", str(tmp_path / "slow.ipynb")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "hfmi run slow.py: part 3/3, cell 2 ('import time')" in r.stderr, r.stderr
    assert "hfmi run slow.py: done, 3 part(s)" in r.stderr
