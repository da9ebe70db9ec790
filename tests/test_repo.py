"""Repository hygiene: ruff clean, environments parse, no unpickling loads."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the dev extra"
    r = subprocess.run([ruff, "check", "hfmi_kit", "tests", "benchmarks", "notebooks"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_environment_files_are_valid():
    for f in ("environment.yml", "environment-cuda.yml"):
        env = yaml.safe_load((REPO / "environments" / f).read_text())
        assert env["name"] and "python=3.11" in env["dependencies"]
        pip = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
        assert any(p.startswith("torch") for p in pip) and any("-e .." in p for p in pip)
    for script in ("environments/hpc_setup.sh", "scripts/install.sh", "binder/postBuild", ".ci/run"):
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0, script
    recipe = (REPO / "environments" / "hfmi_kit.def").read_text()
    assert "Bootstrap:" in recipe and "%post" in recipe and "pip install" in recipe


def test_no_code_executing_loads():
    needle = "torch." + "load("  # spelled apart so this file does not match itself
    for py in (REPO / "hfmi_kit").rglob("*.py"):
        text = py.read_text()
        assert "pickle." + "load" not in text, py
        for line in text.splitlines():
            if needle in line:
                assert "weights_only=True" in line, f"{py}: {line.strip()}"
