"""The dashboard on results of short real runs of every domain: the results reader (status,
traversal), the file server, and the pages in a real browser (Debian's Chromium driven by
playwright) served by ``hfmi dashboard``, by ``panel serve`` and behind jupyter-server-proxy.

Screenshots go to ``$HFMI_TEST_ARTIFACTS`` (default ``test-artifacts/`` at the repository root).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("panel")

from hfmi_kit.viz.results import AccessRefusedError, label_rows, load_run, resolve_under, scan_results

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("HFMI_TEST_ARTIFACTS", REPO / "test-artifacts"))
DOMAIN_RUNS = {"climate": "runs/climate/pretrained_n1_s0", "radiology": "runs/radiology/pretrained_n1_s0",
               "carbon": "runs/carbon/pretrained_n10_s0", "materials": "runs/materials/discovery"}


@pytest.fixture(scope="module")
def results(small_scorecard: Path) -> Path:
    """The small scorecard's runs of every domain with the what-if and discovery runs, plus a
    malformed run, one still being written and links that point outside the directory."""
    root = small_scorecard
    bad = root / "broken"
    bad.mkdir()
    (bad / "metrics.json").write_text("{not json", encoding="utf-8")
    busy = root / "busy"
    (busy / "model").mkdir(parents=True)
    (busy / "model" / "config.json").write_text(json.dumps({"domain": "climate", "task": "forecast"}))
    (busy / ".metrics.json.tmp").write_text("{")
    secret = root.parent / "secret.txt"
    secret.write_text("not for the browser")
    (root / "runs" / "climate" / "leak.txt").symlink_to(secret)
    (root / "outside").symlink_to(root.parent)
    return root


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(port: int, path: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", path)
            if c.getresponse().status < 500:
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"no HTTP answer on port {port} after {timeout} s")


def _start(cmd: list[str], port: int, path: str = "/", env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})
    try:
        _wait_http(port, path, proc)
    except Exception:
        proc.kill()
        raise
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(results: Path):
    port = _port()
    proc = _start([sys.executable, "-m", "hfmi_kit.cli", "dashboard", "--results", str(results), "--port", str(port)],
                  port)
    yield f"http://127.0.0.1:{port}"
    _stop(proc)


def _get(url: str, path: str) -> tuple[int, bytes]:
    """A raw GET (no client-side normalisation of ``..``)."""
    host, port = url.split("//", 1)[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read()


# ---------------------------------------------------------------- without a browser


def test_results_reader_status_and_traversal(results: Path):
    runs = {r.rel: r for r in scan_results(results)}
    for rel in DOMAIN_RUNS.values():
        assert runs[rel].status == "ok", (rel, runs[rel].problems)
    assert runs["broken"].status == "malformed" and "metrics.json" in runs["broken"].problems[0]
    assert runs["busy"].status == "in progress"
    clim = runs["runs/climate/pretrained_n1_s0"]
    assert clim.domain == "climate" and clim.method == "pretrained" and clim.kind == "finetune"
    assert runs["runs/climate/scratch_n1_s0"].method == "scratch" and runs["runs/climate/pretrain"].kind == "pretrain"
    assert not any("checkpoints" in f or f.endswith("metrics.jsonl") for r in runs.values() for f in r.files)
    assert not any(rel.startswith("outside") for rel in runs)  # links are not followed out
    for bad in ("../secret.txt", "/etc/passwd", "runs/../../secret.txt", "runs/climate/leak.txt", "outside",
                "no/such/run"):
        with pytest.raises(AccessRefusedError, match="refused"):
            resolve_under(results, bad)
    with pytest.raises(AccessRefusedError):
        load_run(results, "../")
    rows = label_rows(list(runs.values()))
    clim = {(r["method"], r["labels"]) for r in rows if r["domain"] == "climate"}
    assert {("pretrained", 0.25), ("scratch", 0.25), ("pretrained", 1.0), ("persistence", 1.0)} <= clim
    assert {r["method"] for r in rows if r["domain"] == "carbon"} == {"pretrained", "rf", "scratch"}


def test_a_run_page_shows_the_loss_curve_of_its_training_logs(results: Path):
    """A pretraining run page is not empty: its loss curve, from metrics.jsonl (and, for a run
    trained in stages, from each stage's log); a half-written last line is skipped."""
    import panel as pn

    from hfmi_kit.viz.dashboard import run_page

    def labels(rel: str) -> list[str]:
        page = run_page(results, load_run(results, rel))
        panes = [o for o in page.select(pn.pane.HoloViews) if o.name == "training curve"]
        assert len(panes) == 1, rel
        return [el.label for el in panes[0].object if el.label]

    log = results / "runs/climate/pretrain/metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 99, "split": "tr')  # a run still writing
    assert "training loss" in labels("runs/climate/pretrain")
    staged = labels("runs/materials/pretrain")
    assert "stage1_mlm training loss" in staged and "stage2_supervised training loss" in staged
    assert not [o for o in run_page(results, load_run(results, "broken")).select(pn.pane.HoloViews)
                if o.name == "training curve"]


def test_the_model_card_comes_in_sections_with_long_lists_summarised(results: Path):
    import panel as pn

    from hfmi_kit.viz.dashboard import run_page, shorten

    assert shorten(list(range(20))) == [0, 1, 2, "... 16 more ...", 19] and shorten([1, 2]) == [1, 2]
    assert shorten({f"k{i}": i for i in range(30)}, keys=24)["..."] == "6 more"
    page = run_page(results, load_run(results, "runs/climate/pretrain"))
    card = next(o for o in page.select(pn.pane.Markdown) if o.name == "model card").object
    assert "<details open><summary><b>Overview</b></summary>" in card
    assert "<details><summary><b>Geometry the model expects</b></summary>" in card
    geometry = card.split("Geometry the model expects", 1)[1].split("</details>", 1)[0]
    lat = load_run(results, "runs/climate/pretrain").config["geometry"]["grid"]["lat"]
    assert len(lat) > 8 and f"{len(lat) - 4} more" in geometry and str(lat[4]) not in geometry


def test_display_sized_arrays():
    """Maps go to the browser at display size; slices, not volumes."""
    import holoviews as hv
    import xarray as xr

    from hfmi_kit.domains.radiology.plots import orthoviews
    from hfmi_kit.viz.core import DISPLAY_PX, fit_display, map_with_slider

    big = np.random.default_rng(0).random((2000, 1500)).astype(np.float32)
    big[:3, :3] = np.nan  # inside one 4x4 block: the block mean skips them
    small = fit_display(big)
    assert max(small.shape) <= DISPLAY_PX and np.isfinite(small).all()
    assert abs(float(np.nanmean(small)) - float(np.nanmean(big))) < 1e-3
    da = xr.DataArray(np.zeros((3, 721, 1440), np.float32), dims=("lead", "lat", "lon"),
                      coords={"lead": [1, 2, 3], "lat": np.linspace(-90, 90, 721), "lon": np.arange(1440) * 0.25},
                      name="tas")
    dm = map_with_slider(da, "lead", dynamic=True)
    assert isinstance(dm, hv.DynamicMap) and len(dm.data) == 0  # nothing computed until shown
    img = dm[2].get(0)  # the map under its coastline
    assert isinstance(img, hv.Image)
    assert max(img.data["tas"].shape if isinstance(img.data, dict) else img.dimension_values(2, flat=False).shape) \
        <= DISPLAY_PX
    vol = np.random.default_rng(1).random((60, 70, 50)).astype(np.float32)
    lay = orthoviews(vol, {"m": (vol > 0.99).astype(np.uint8)}, dynamic=True, positions=[40, 50, 60])
    sag, cor, ax = (d.values[1] for d in lay[0].kdims[:3])  # each plane at its middle stop, in mm
    frame = lay[0][(sag, cor, ax, "image", "percentiles")].get(0)  # the sagittal image under its labels
    assert frame.dimension_values(2, flat=False).shape == (50, 70)  # one slice (K x J), not the volume


def test_file_server_refuses_traversal_and_internals(server: str, results: Path):
    status, body = _get(server, "/files/runs/climate/pretrained_n1_s0/metrics.json")
    assert status == 200 and "rmse" in json.loads(body)
    for path in ("/files/../secret.txt", "/files/runs/../../secret.txt", "/files/%2e%2e/secret.txt",
                 "/files/runs/climate/leak.txt", "/files/outside/secret.txt", "/files//etc/passwd",
                 "/files/runs/radiology/pretrained_n1_s0/train_segmenter/metrics.jsonl", "/files/runs/climate"):
        status, body = _get(server, path)
        assert status in (403, 404), (path, status)
        assert b"not for the browser" not in body


def test_component_route_answers_bad_paths_with_404(server: str):
    # Panel's own handler answered 500 on a relative module name and imported any installed module
    for path in ("/components/..%2f..%2fetc%2fpasswd", "/components/..%2f..", "/components/x",
                 "/components/antigravity/x/__javascript__/y.js", "/components/os/path/__css__/x"):
        status, _ = _get(server, path)
        assert status in (403, 404), (path, status)


def test_cli_dashboard_bad_arguments(tmp_path: Path, capsys):
    from hfmi_kit.cli import main

    assert main(["dashboard", "--results", str(tmp_path / "nope")]) == 1
    assert "directory not found" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    assert main(["dashboard", "--results", str(tmp_path / "x"), "--example"]) == 1
    assert "not empty" in capsys.readouterr().err


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True)
        yield b
        b.close()


class Page:
    """A browser page that records failed requests and websocket traffic."""

    def __init__(self, browser, url: str):
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.bad: list[str] = []
        self.ws_bytes = 0
        self.page.on("requestfailed", lambda r: self.bad.append(f"failed {r.url}"))
        self.page.on("response", lambda r: self.bad.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        self.page.on("websocket", self._ws)
        self.page.on("console", lambda m: self.bad.append(f"console {m.text}") if m.type == "error" else None)
        self.t0 = time.time()
        self.page.goto(url)

    def _ws(self, ws) -> None:
        def add(payload) -> None:
            self.ws_bytes += len(payload)
        ws.on("framereceived", add)

    def rendered(self, timeout: float = 60_000) -> float:
        """Wait for the first plot canvas; return the seconds since navigation."""
        self.page.wait_for_selector("canvas", timeout=timeout)
        return time.time() - self.t0

    def text(self, s: str, timeout: float = 30_000) -> None:
        self.page.get_by_text(s).first.wait_for(timeout=timeout)

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        p = ARTIFACTS / f"dashboard_{name}.png"
        self.page.screenshot(path=str(p), full_page=True)
        return p


def _plot_png(pg: Page, index: int = 0) -> bytes:
    return pg.page.locator(".bk-Canvas, canvas").nth(index).screenshot()


@pytest.mark.parametrize("domain", list(DOMAIN_RUNS))
def test_each_domain_page_renders(browser, server: str, results: Path, domain: str):
    rel = DOMAIN_RUNS[domain]
    pg = Page(browser, f"{server}/?run={rel}")
    pg.rendered()
    pg.text(rel)
    pg.text("Model card" if domain != "materials" else "Candidates")
    expect = {"climate": "Skill against lead", "radiology": "Per-case scores", "carbon": "Regional carbon budget",
              "materials": "Active learning"}[domain]
    pg.text(expect)
    pg.page.wait_for_timeout(1500)
    assert pg.page.locator("canvas").count() >= 2
    assert pg.shot(domain).stat().st_size > 20_000
    assert not pg.bad, pg.bad
    if domain == "radiology":
        import nibabel as nib

        vol = nib.load(str(next((results / rel / "predictions").glob("*_pred.nii.gz"))))
        # the page got slices, not volumes: less than one float32 copy of the scan in all
        assert pg.ws_bytes < np.prod(vol.shape) * 4, (pg.ws_bytes, vol.shape)
    pg.page.close()


def test_a_pretrain_page_draws_its_loss_curve(browser, server: str):
    pg = Page(browser, f"{server}/?run=runs/climate/pretrain")
    pg.rendered()  # the first canvas: before the loss curve, a pretraining page had no plot at all
    pg.text("runs/climate/pretrain")
    assert pg.page.locator("canvas").count() >= 1
    assert pg.shot("pretrain").stat().st_size > 10_000
    assert not pg.bad, pg.bad
    pg.page.close()


def _slider_changes_plot(pg: Page, label: str) -> None:
    handle = pg.page.locator(".noUi-handle").first
    handle.wait_for(timeout=30_000)
    pg.page.wait_for_timeout(1000)
    before = _plot_png(pg)
    lab = pg.page.get_by_text(re.compile("^" + re.escape(label) + ":")).first
    text_before = lab.inner_text()
    handle.focus()
    for _ in range(2):
        handle.press("ArrowRight")
    pg.page.wait_for_function("() => true")
    deadline = time.time() + 20
    while time.time() < deadline:
        pg.page.wait_for_timeout(500)
        if _plot_png(pg) != before:
            break
    assert _plot_png(pg) != before, "the plot did not change when the slider moved"
    assert lab.inner_text() != text_before


_BOKEH_NAMES = """() => { const out = {legend: [], labels: [], axes: [], factors: []};
  for (const d of window.Bokeh.documents) for (const m of d._all_models.values()) {
    if (m.type === 'LegendItem' && m.label) out.legend.push(m.label.value);
    else if (m.type === 'Label') out.labels.push(m.text);
    else if (m.type.endsWith('Axis')) out.axes.push(m.axis_label);
    else if (m.type === 'FactorRange') out.factors.push(...m.factors.map(f => [].concat(f).join(' / ')));
  } return out; }"""


def _bokeh_names(pg: Page) -> dict[str, set[str]]:
    """Legend entries, annotation labels, axis titles and factors of every plot on the page."""
    pg.page.wait_for_timeout(1500)
    return {k: {str(x) for x in v} for k, v in pg.page.evaluate(_BOKEH_NAMES).items()}


def test_plots_name_every_baseline_their_units_and_the_patients_orientation(browser, server: str, results: Path):
    """What a reader of each page needs to trust a plot: every baseline the metrics hold is in
    the comparison's legend (or its factors), axes carry units, maps their geography or CRS, and
    the radiology viewer the patient's orientation."""
    from hfmi_kit.domains import get_domain
    from hfmi_kit.viz.core import method_name

    pages = {d: f"?run={rel}" for d, rel in DOMAIN_RUNS.items()}
    pages["materials"] = "?run=" + sorted(p.relative_to(results).as_posix()
                                         for p in (results / "runs" / "materials").glob("pretrained_n*_s0"))[0]
    seen = {}
    for name, query in {**pages, "compare": "?page=compare"}.items():
        pg = Page(browser, f"{server}/{query}")
        pg.rendered()
        seen[name] = _bokeh_names(pg)
        assert not pg.bad, (name, pg.bad)
        pg.page.close()
    # the forecast maps in another projection: the graticule appears
    pg = Page(browser, f"{server}/{pages['climate']}")
    pg.rendered()
    lines = ("() => [...window.Bokeh.documents].some(d => [...d._all_models.values()].some("
             "m => m.type === 'GlyphRenderer' && m.glyph.type === 'MultiLine'))")
    assert not pg.page.evaluate(lines)  # the generator's idealised planet: no coastline
    pg.page.locator("select:has(option[value='robinson'])").first.select_option("robinson")
    pg.page.wait_for_function(lines, timeout=60_000)
    assert not pg.bad, pg.bad
    pg.page.close()
    # a forecast of the Earth (its input named as such) gets the shipped coastline
    import xarray as xr

    earth = results / "runs" / "climate" / "earth_view"
    shutil.copytree(results / DOMAIN_RUNS["climate"], earth, ignore=shutil.ignore_patterns("checkpoints", "model"))
    with xr.open_dataset(earth / "forecast.nc") as ds:
        fc = ds.load()
    fc.attrs["hfmi_input_title"] = "ERA5 monthly averaged data on single levels"
    fc.to_netcdf(earth / "forecast.nc")
    pg = Page(browser, f"{server}/?run={earth.relative_to(results).as_posix()}")
    pg.rendered()
    pg.page.wait_for_function(lines, timeout=60_000)  # plate-carree draws no graticule: this is the coastline
    assert not pg.bad, pg.bad
    pg.page.close()
    shutil.rmtree(earth)
    clim = seen["climate"]
    assert {"model", "persistence", "damped persistence", "climatology"} <= clim["legend"], clim["legend"]
    assert {"longitude (°E)", "latitude (°N)", "lead [steps of 1 month]"} <= clim["axes"], clim["axes"]
    rad = seen["radiology"]
    assert {"L", "R", "A", "P", "S", "I"} <= rad["labels"], rad["labels"]
    assert all("[mm]" in a for a in rad["axes"] if a), rad["axes"]
    carb = seen["carbon"]
    assert any(a.startswith("easting [km] (EPSG:") for a in carb["axes"]), carb["axes"]
    assert {"stock (Mg C)", "change (Mg C)"} <= carb["axes"], carb["axes"]  # stocks and changes on their own axes
    mat = seen["materials"]
    methods = {f.split(" / ")[-1] for f in mat["factors"]}
    assert {"model", "from scratch", "random forest (Magpie)", "mean predictor"} <= methods, methods
    assert "MAE [eV]" in mat["axes"]
    comp = seen["compare"]
    for dom in map(get_domain, ("climate", "radiology", "materials", "carbon")):
        assert {method_name(b) for b in dom.baselines if b != "scratch"} | {"pretrained"} <= comp["legend"], dom.name
        assert {dom.metric_title, dom.label_title} <= comp["axes"], (dom.name, comp["axes"])


def test_sliders_change_the_plots(browser, server: str):
    pg = Page(browser, f"{server}/?run={DOMAIN_RUNS['radiology']}")
    pg.rendered()
    _slider_changes_plot(pg, "sagittal [mm]")  # one slider per plane, in mm
    for widget in ("coronal [mm]", "axial [mm]", "modality", "window"):
        pg.text(widget)
    pg.page.close()
    pg = Page(browser, f"{server}/?run={DOMAIN_RUNS['climate']}")
    pg.rendered()
    _slider_changes_plot(pg, "lead")
    assert not pg.bad, pg.bad
    pg.page.close()


def test_a_filter_changes_the_candidate_table(browser, server: str):
    pg = Page(browser, f"{server}/?run={DOMAIN_RUNS['materials']}")
    pg.rendered()
    count = pg.page.get_by_text(re.compile(r"^\d+ of \d+ candidates$")).first
    count.wait_for(timeout=30_000)
    total = count.inner_text()
    n_all, n_total = (int(x) for x in total.split(" candidates")[0].split(" of "))
    assert n_all == n_total > 0
    pg.page.locator("select").filter(has_text="known only").first.select_option("new only")
    pg.page.wait_for_function("() => true")
    deadline = time.time() + 20
    while time.time() < deadline and count.inner_text() == total:
        pg.page.wait_for_timeout(300)
    shown = int(count.inner_text().split(" of ")[0])
    assert shown < n_total, count.inner_text()
    rows = pg.page.locator(".tabulator-row")
    assert 0 < rows.count() <= 15
    known = pg.page.locator(".tabulator-cell[tabulator-field=known]").all_inner_texts()
    assert known and "true" not in [c.lower() for c in known]
    assert not pg.bad, pg.bad
    pg.page.close()


def test_traversal_and_bad_runs_are_shown_not_crashing(browser, server: str):
    for q, text in (("?run=../secret.txt", "refused"), ("?run=runs/climate/leak.txt", "refused"),
                    ("?run=%2e%2e%2f%2e%2e%2fetc", "refused"), ("?run=broken", "malformed"),
                    ("?run=busy", "in progress"), ("?page=compare", "Label efficiency: climate"), ("?", "broken")):
        pg = Page(browser, f"{server}/{q}")
        pg.text(text)
        assert "not for the browser" not in pg.page.content()
        pg.page.close()


def test_panel_serve_of_the_app_file(browser, results: Path):
    port = _port()
    proc = _start([sys.executable, "-m", "panel", "serve", str(REPO / "hfmi_kit" / "viz" / "app.py"), "--port",
                   str(port), "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}",
                   "--args", "--results", str(results)], port, "/app")
    try:
        pg = Page(browser, f"http://127.0.0.1:{port}/app?run={DOMAIN_RUNS['carbon']}")
        pg.rendered()
        pg.text("Regional carbon budget")
        assert not pg.bad, pg.bad
        pg.page.close()
    finally:
        _stop(proc)


def test_behind_jupyter_server_proxy(browser, results: Path, tmp_path: Path):
    """JupyterLab's server with a hub-like base URL; the launcher entry starts the dashboard, and
    every asset, the websocket and the file links load under the proxy prefix."""
    pytest.importorskip("jupyter_server_proxy")
    from importlib.metadata import entry_points

    assert "hfmi-dashboard" in {e.name for e in entry_points(group="jupyter_serverproxy_servers")}
    from hfmi_kit.viz.proxy import setup_dashboard

    spec = setup_dashboard()
    assert spec["absolute_url"] and Path(spec["launcher_entry"]["icon_path"]).is_file()
    port = _port()
    cmd = [sys.executable, "-m", "jupyter", "server", "--no-browser", "--allow-root", f"--port={port}",
           "--ServerApp.ip=127.0.0.1", "--ServerApp.base_url=/user/alice/", "--IdentityProvider.token=t0k",
           f"--ServerApp.root_dir={tmp_path}"]
    proc = _start(cmd, port, "/user/alice/api/status", env={"HFMI_RESULTS": str(results),
                                                            "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")})
    try:
        base = f"http://127.0.0.1:{port}/user/alice/hfmi-dashboard/"
        pg = Page(browser, f"{base}?token=t0k&run={DOMAIN_RUNS['radiology']}")
        assert pg.rendered(timeout=120_000) < 120
        pg.text("Per-case scores")
        _slider_changes_plot(pg, "sagittal [mm]")  # the websocket works through the proxy
        assert pg.ws_bytes > 0
        assert not pg.bad, pg.bad  # no 404 for any asset behind the proxy
        r = pg.page.request.get(f"{base}files/{DOMAIN_RUNS['radiology']}/metrics.json")
        assert r.status == 200 and "dice" in r.json()
        r = pg.page.request.get(f"{base}files/%2e%2e/%2e%2e/secret.txt")
        assert r.status in (403, 404)
        pg.shot("behind_proxy")
        pg.page.close()
    finally:
        _stop(proc)
