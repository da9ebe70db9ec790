"""The dashboard as an app file for ``panel serve``::

    panel serve hfmi_kit/viz/app.py --args --results DIR
    HFMI_RESULTS=DIR panel serve hfmi_kit/viz/app.py

Published files (``files/...`` links) are served by ``hfmi dashboard``; under ``panel serve``
the pages work and the download links are not served.
"""

from __future__ import annotations

import argparse
import os
import sys

from hfmi_kit.viz.dashboard import build_app


def _results() -> str:
    p = argparse.ArgumentParser(prog="hfmi_kit/viz/app.py")
    p.add_argument("--results", default=os.environ.get("HFMI_RESULTS", "runs"))
    return p.parse_known_args(sys.argv[1:])[0].results


build_app(_results()).servable(title="hfmi_kit results")
