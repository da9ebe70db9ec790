"""Notebooks in a real JupyterLab, as a scientist on an offline compute node meets them.

``jupyter lab`` is started on localhost and driven by Debian's Chromium (playwright); every
request to a host other than localhost is refused, as on a node without internet. Each notebook
is run live ("Run All") or, when ``hfmi run`` executed it, opened as written. Every cell that
holds a HoloViews/Panel output must show a rendered Bokeh canvas, no cell may hold an error, and
the browser console may show no error. Screenshots go to ``$HFMI_TEST_ARTIFACTS`` (default
``test-artifacts/`` at the repository root) as ``jupyterlab_<name>.png``.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import nbformat
import pytest

from hfmi_kit.cli import main

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
ARTIFACTS = Path(os.environ.get("HFMI_TEST_ARTIFACTS", REPO / "test-artifacts"))
PLOT_MIME = "application/vnd.holoviews_exec.v0+json"
LOCAL = {"127.0.0.1", "localhost"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A real ``jupyter lab`` server on localhost with its own root, runtime and config folders."""

    def __init__(self, root: Path, home: Path):
        self.root, self.port, self.token = root, _port(), secrets.token_hex(8)
        self.log = home / "lab.log"
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "rt"),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", f"--port={self.port}",
               "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
               f"--LabApp.workspaces_dir={home / 'workspaces'}", "--LabApp.expose_app_in_browser=True",
               "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        # the news toast asks to reach jupyter.org; a compute node's user would answer "No"
        labconfig = home / "config" / "labconfig"
        labconfig.mkdir(parents=True, exist_ok=True)
        (labconfig / "page_config.json").write_text(json.dumps(
            {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
        self._logf = self.log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=env, cwd=root)
        t0 = time.time()
        while time.time() - t0 < 120:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", f"/api/status?token={self.token}")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"jupyter lab gave no answer on port {self.port} in 120 s: {self.log.read_text()[-3000:]}")

    def url(self, rel: str) -> str:
        """The notebook in a workspace of its own (a shared one would reopen every earlier tab)."""
        workspace = "".join(ch if ch.isalnum() else "-" for ch in rel)
        return f"http://127.0.0.1:{self.port}/lab/workspaces/{workspace}/tree/{rel}?token={self.token}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._logf.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, browser_exe):
    pytest.importorskip("jupyterlab")  # the [lab] extra
    root, home = tmp_path_factory.mktemp("lab-root"), tmp_path_factory.mktemp("lab-home")
    server = Lab(root, home)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser_exe() -> str:
    pytest.importorskip("playwright.sync_api")
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return exe


@pytest.fixture(scope="module")
def browser(browser_exe):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser_exe, headless=True)
        yield b
        b.close()


class NotebookPage:
    """A notebook opened in JupyterLab, recording console errors and refused requests."""

    def __init__(self, browser: Any, lab: Lab, rel: str):
        self.lab, self.rel = lab, rel
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.refused: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.failed: list[str] = []
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} {r.failure}"))
        self.page.on("response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.route("**/*", self._route)
        self.page.goto(lab.url(rel))
        self.page.wait_for_function("(rel) => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                    " && window.jupyterapp.shell.currentWidget.context"
                                    " && window.jupyterapp.shell.currentWidget.context.path === rel",
                                    arg=rel, timeout=120_000)
        # the kernel is started and the notebook's outputs are attached
        self.page.wait_for_function("() => { const w = window.jupyterapp.shell.currentWidget;"
                                    " return w.context.isReady && w.sessionContext.session"
                                    " && w.sessionContext.session.kernel; }", timeout=120_000)

    def _route(self, route: Any) -> None:
        if urlparse(route.request.url).hostname in LOCAL or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.refused.append(route.request.url)
            route.abort()

    def run_all(self, timeout_s: float = 420) -> None:
        """Run every cell (JupyterLab's "Run All") and wait until the last one has finished, or
        one has failed (JupyterLab then skips the rest)."""
        self.page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        self.page.wait_for_function(
            "() => { const w = window.jupyterapp.shell.currentWidget;"
            " const cells = w.content.widgets.filter(c => c.model.type === 'code');"
            " const failed = cells.some(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'));"
            " return w.sessionContext.session.kernel.status === 'idle'"
            " && (failed || cells.every(c => c.model.executionCount !== null)); }",
            timeout=timeout_s * 1000, polling=1000)

    def save(self) -> nbformat.NotebookNode:
        self.page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        self.page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty",
                                    timeout=60_000)
        return nbformat.read(self.lab.root / self.rel, as_version=4)

    def plot_cells(self) -> list[int]:
        """Indices of the code cells whose outputs carry a HoloViews/Panel plot."""
        return self.page.evaluate(
            "(mime) => window.jupyterapp.shell.currentWidget.content.widgets.flatMap((c, i) =>"
            " c.model.type === 'code' && c.model.outputs.toJSON().some(o => o.data && mime in o.data) ? [i] : [])",
            PLOT_MIME)

    def canvases(self, index: int) -> int:
        """Rendered Bokeh canvases in the output area of cell ``index``."""
        widget = self.page.evaluate("() => window.jupyterapp.shell.currentWidget.id")
        cell = self.page.locator(f"[id='{widget}'] .jp-Notebook .jp-Cell").nth(index)
        cell.scroll_into_view_if_needed()
        return cell.locator(".jp-OutputArea canvas").count()

    def check_plots(self) -> list[int]:
        """Every plot cell shows a canvas (waiting for BokehJS to draw it); returns the plot cells."""
        cells = self.plot_cells()
        for i in cells:
            t0 = time.time()
            while self.canvases(i) == 0 and time.time() - t0 < 60:
                self.page.wait_for_timeout(500)
            assert self.canvases(i) > 0, f"{self.rel}: cell {i} holds a plot but no rendered Bokeh canvas"
        return cells

    def close(self) -> None:
        """Shut the notebook's kernel down and close the page."""
        self.page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
        self.page.close()

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        p = ARTIFACTS / f"jupyterlab_{name}.png"
        self.page.screenshot(path=str(p))
        return p


def _errors(nb: nbformat.NotebookNode) -> list[str]:
    return [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for i, c in enumerate(nb.cells)
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def _prepare(src: Path, params: dict[str, Any], dest: Path) -> str:
    """Write ``src`` with ``params`` injected as papermill would (without running it), unpaired."""
    from papermill.parameterize import parameterize_notebook

    from hfmi_kit.launch.notebook import read_notebook

    nb = read_notebook(src)
    for c in nb.cells:
        c.metadata.setdefault("tags", [])
    nb.metadata.setdefault("papermill", {})
    nb = parameterize_notebook(nb, params)
    nb.metadata.pop("jupytext", None)
    nb.metadata.pop("papermill", None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    return dest.name


def _live(browser: Any, lab: Lab, src: Path, params: dict[str, Any], name: str) -> tuple[list[int], NotebookPage]:
    rel = _prepare(src, params, lab.root / f"{name}.ipynb")
    pg = NotebookPage(browser, lab, rel)
    pg.run_all()
    nb = pg.save()
    assert not _errors(nb), _errors(nb)
    cells = pg.check_plots()
    pg.canvases(cells[0]) if cells else None  # the screenshot shows the first plot
    pg.shot(name)
    assert not pg.refused, f"{name}: requests to other hosts {pg.refused}"
    assert not pg.errors, f"{name}: console errors {pg.errors}; failed requests {pg.failed}"
    return cells, pg


def _outputs_render(pg: NotebookPage, name: str) -> list[int]:
    """Every plot cell shows a canvas, no request left localhost, the console holds no error."""
    cells = pg.check_plots()
    pg.canvases(cells[0]) if cells else None  # the screenshot shows the first plot
    pg.shot(name)
    assert not pg.refused, f"{name}: requests to other hosts {pg.refused}"
    assert not pg.errors, f"{name}: console errors {pg.errors}; failed requests {pg.failed}"
    return cells


def _live(browser: Any, lab: Lab, src: Path, params: dict[str, Any], name: str) -> list[int]:
    """Open ``src`` (with ``params`` injected) in JupyterLab, Run All, save, and check what it shows."""
    rel = _prepare(src, params, lab.root / f"{name}.ipynb")
    pg = NotebookPage(browser, lab, rel)
    try:
        pg.run_all()
        nb = pg.save()
        assert not _errors(nb), f"{name}: {_errors(nb)}"
        return _outputs_render(pg, name)
    finally:
        pg.close()


# the notebooks' small settings (as in test_notebooks.py); paths are relative to the notebook
DOMAIN_NOTEBOOKS = {
    "climate": {"out_dir": "climate_pre", "steps": 20, "batch_size": 4, "years": 6,
                "variables": ["tas", "tos", "siconc", "rsdt"]},
    "radiology": {"out_dir": "radiology_pre", "steps": 6, "unlabelled": 2, "labelled": 5, "spacing_scale": 1.6,
                  "spacing": 4.5},
    "materials": {"out_dir": "materials_pre", "steps": 20, "supervised_steps": 20, "max_rows": 3000},
    "carbon": {"out_dir": "carbon_pre", "steps": 5, "size": 64, "plots": 60},
}
NEEDS = {"radiology": ("nilearn", "monai"), "materials": ("pymatgen",), "carbon": ("rasterio", "laspy")}


@pytest.mark.parametrize("domain", list(DOMAIN_NOTEBOOKS))
def test_each_domains_pretraining_notebook_runs_live_and_its_plots_render(browser, lab, domain: str):
    for module in NEEDS.get(domain, ()):
        pytest.importorskip(module)
    cells = _live(browser, lab, NOTEBOOKS / domain / "01_pretrain.py", DOMAIN_NOTEBOOKS[domain], domain)
    assert cells, f"{domain}/01_pretrain shows no plot"
    assert (lab.root / DOMAIN_NOTEBOOKS[domain]["out_dir"] / "model" / "model.safetensors").is_file()


def test_quickstart_runs_live_and_a_notebook_executed_by_hfmi_run_renders_when_opened(browser, lab):
    cells = _live(browser, lab, NOTEBOOKS / "00_quickstart.py",
                  {"out_dir": "qs", "years": 6, "pretrain_steps": 20, "finetune_steps": 20, "batch_size": 4},
                  "quickstart")
    assert len(cells) >= 2
    saved = json.dumps([c.get("outputs", []) for c in nbformat.read(lab.root / "quickstart.ipynb", as_version=4).cells])
    assert "rmse_persistence" in saved  # the fine-tuned forecaster's skill is printed beside its baselines
    run = lab.root / "qs" / "finetune"
    assert (run / "forecast.nc").is_file()
    # the batch path: `hfmi run` writes an executed notebook; opened afterwards it must render as is
    assert main(["run", str(NOTEBOOKS / "climate" / "03_visualize.py"), "-p", "run_dir", str(run),
                 "-p", "whatif_dir", "", "-o", str(lab.root / "climate_03_executed.ipynb")]) == 0
    pg = NotebookPage(browser, lab, "climate_03_executed.ipynb")
    try:
        assert len(_outputs_render(pg, "climate_03_executed")) >= 2
        # nothing was re-run: the cells hold the execution counts `hfmi run` wrote
        written = [c.get("execution_count") for c in nbformat.read(lab.root / "climate_03_executed.ipynb",
                                                                   as_version=4).cells if c.cell_type == "code"]
        shown = pg.page.evaluate("() => window.jupyterapp.shell.currentWidget.content.widgets"
                                 ".filter(c => c.model.type === 'code').map(c => c.model.executionCount)")
        assert shown == written and all(n is not None for n in written)
        assert not list(lab.root.glob("climate_03_executed.py")), "opening it wrote a paired .py"
    finally:
        pg.close()
    # a progress bar in an executed notebook shows where it ended, not the "0%" it started from
    src = lab.root / "bar.py"
    src.write_text("# %% tags=[\"parameters\"]\nn = 30\n\n# %%\nfrom tqdm.auto import tqdm\n"
                   "for i in tqdm(range(n), desc='train'):\n    pass\n")
    assert main(["run", str(src), "-o", str(lab.root / "bar_executed.ipynb")]) == 0
    pg = NotebookPage(browser, lab, "bar_executed.ipynb")
    try:
        widget = pg.page.locator(".jp-OutputArea-output").filter(has_text="train")
        widget.first.wait_for(timeout=30_000)
        text = widget.first.inner_text()
        assert "100%" in text and "30/30" in text, text
        assert not pg.errors, pg.errors
    finally:
        pg.close()
