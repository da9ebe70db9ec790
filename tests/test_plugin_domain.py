"""A fifth science as a plugin: ``tests/plugins/hfmi_timeseries`` (1-D time series, masked
pretext task, a regression task) is installed with pip into a folder of its own, and, with that
folder on ``PYTHONPATH`` and no file of hfmi_kit changed, it appears in ``hfmi --help``,
pretrains, fine-tunes at two label budgets with its baselines, evaluates, is scored by
``hfmi scorecard`` and has its own section on its dashboard page in a real browser.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = Path(__file__).with_name("plugins") / "hfmi_timeseries"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a user who installed the plugin (pip, offline, into its own folder)."""
    site = tmp_path_factory.mktemp("plugin") / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(PLUGIN)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (site / "hfmi_timeseries").is_dir()
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}


def hfmi(env: dict[str, str], *args: str, timeout: int = 600) -> str:
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (args, r.stderr[-3000:])
    return r.stdout


@pytest.fixture(scope="module")
def runs(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ts")
    hfmi(env, "pretrain", "timeseries", "--out", str(root / "pre"), "--steps", "150")
    for n in (10, 40):
        hfmi(env, "finetune", "timeseries", "--from", str(root / "pre" / "model"), "--out", str(root / f"ft{n}"),
             "--labels", str(n), "--baselines", "--steps", "80")
    hfmi(env, "evaluate", "timeseries", "--ckpt", str(root / "ft40" / "model"), "--out", str(root / "ev"))
    return root


def test_the_plugin_appears_in_the_command_line(env):
    out = hfmi(env, "--help")
    assert "timeseries" in out
    assert "timeseries" in hfmi(env, "pretrain", "--help")


def test_the_plugin_pretrains_finetunes_at_two_budgets_and_evaluates(runs):
    m10 = json.loads((runs / "ft10" / "metrics.json").read_text())
    m40 = json.loads((runs / "ft40" / "metrics.json").read_text())
    assert m10["labels"] == 10 and m40["labels"] == 40
    assert {"mae", "mae_scratch", "mae_ridge"} <= set(m40)
    with open(runs / "ft40" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    truth = [float(r["target"]) for r in rows]
    trivial = sum(abs(t - sum(truth) / len(truth)) for t in truth) / len(truth)  # predict the mean
    assert m40["mae"] < 0.8 * trivial, (m40, trivial)  # learning happened
    ev = json.loads((runs / "ev" / "metrics.json").read_text())
    assert ev["mae"] == pytest.approx(m40["mae"], rel=1e-5)  # the saved model is the scored one
    assert ev["test_series"] == m40["test_series"]  # the bundle's count, added by the shared evaluation
    with open(runs / "ev" / "predictions.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == ev["test_series"]  # the plugin's write_outputs
    cfg = json.loads((runs / "ft40" / "model" / "config.json").read_text())
    assert cfg["reproduce"]["entry"] == "timeseries.finetune"  # the core records the plugin's runs too


def test_the_shared_evaluation_refuses_a_pretrained_checkpoint_of_the_plugin(env, runs, tmp_path):
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "evaluate", "timeseries", "--ckpt",
                        str(runs / "pre" / "model"), "--out", str(tmp_path / "ev")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert "not a fine-tuned timeseries model" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "ev" / "metrics.json").exists()
    # a domain without an attribution method: the shared explanation says so in one line
    r = subprocess.run([sys.executable, "-m", "hfmi_kit.cli", "explain", "timeseries", "--ckpt",
                        str(runs / "ft40" / "model"), "--out", str(tmp_path / "ex")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "the timeseries domain has no explanation method" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "ex").exists()


def test_the_plugin_is_scored_and_shown_on_the_dashboard(env, tmp_path):
    out = tmp_path / "card"
    text = hfmi(env, "scorecard", "--domains", "timeseries", "--out", str(out), "--seeds", "0,1,2")
    assert "## timeseries: frequency (mae" in text
    with open(out / "scorecard.csv", newline="") as fh:
        methods = {r["method"] for r in csv.DictReader(fh)}
    assert methods == {"pretrained", "scratch", "ridge"}
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from test_dashboard import _port, _start, _stop

    port = _port()
    proc = _start([sys.executable, "-m", "hfmi_kit.cli", "dashboard", "--results", str(out), "--port", str(port)],
                  port, env=env)
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=exe, headless=True)
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/?run=runs/timeseries/pretrained_n40_s0")
            page.get_by_text("Frequency: predicted against true").first.wait_for(timeout=60_000)
            page.wait_for_selector("canvas", timeout=60_000)
            page.goto(f"http://127.0.0.1:{port}/?page=compare")
            page.get_by_text("Label efficiency: timeseries").first.wait_for(timeout=60_000)
            b.close()
    finally:
        _stop(proc)
