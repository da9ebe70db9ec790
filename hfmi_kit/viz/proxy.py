"""jupyter-server-proxy entry point: a launcher icon in JupyterLab that starts the dashboard
behind the Jupyter server (``<base_url>hfmi-dashboard/``), so it works on an HPC portal
where only the notebook server is reachable.

The results directory is ``$HFMI_RESULTS`` (default: ``runs`` under the directory Jupyter was
started in). The dashboard runs with the full prefix (``absolute_url``): every asset and the
websocket load under the proxy path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

NAME = "hfmi-dashboard"


def setup_dashboard() -> dict[str, Any]:
    """The server process description jupyter-server-proxy reads (``jupyter_serverproxy_servers``)."""
    results = os.environ.get("HFMI_RESULTS", "runs")
    return {
        "command": [sys.executable, "-m", "hfmi_kit.cli", "dashboard", "--results", results, "--port", "{port}",
                    "--prefix", "{base_url}" + NAME, "--allow-websocket-origin", "*"],
        "absolute_url": True,
        "timeout": 120,
        "launcher_entry": {"enabled": True, "title": "hfmi dashboard",
                           "icon_path": str(Path(__file__).with_name("static") / "hfmi.svg")},
        "new_browser_tab": True,
    }
