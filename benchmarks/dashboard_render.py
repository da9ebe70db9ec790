"""Time to first render of each domain's dashboard page, in a real browser (Chromium + playwright).

    python benchmarks/dashboard_render.py [--results DIR] [--repeats 3]

Without ``--results`` it first writes the example runs of every domain into a temporary
directory. For each page it prints the time from navigation to the first plot canvas, to the
last plot canvas of the page, and the bytes received over the websocket (what the page sent
to the browser besides the static assets).
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAGES = {"overview": "", "climate": "?run=runs/climate/pretrained_n1_s0", "climate what-if": "?run=runs/climate/whatif",
         "radiology": "?run=runs/radiology/pretrained_n1_s0", "carbon": "?run=runs/carbon/pretrained_n10_s0",
         "materials (cv)": "?run=runs/materials/pretrained_n150_s0",
         "materials (discovery)": "?run=runs/materials/discovery", "compare": "?page=compare"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", help="a results directory with the example runs (default: make them)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = None
    if a.results:
        root = Path(a.results)
    else:
        from hfmi_kit.viz.examples import make_example_results

        tmp = tempfile.mkdtemp(prefix="hfmi_dash_")
        root = Path(tmp) / "results"
        t0 = time.time()
        make_example_results(root)
        print(f"example runs written in {time.time() - t0:.0f} s")
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "hfmi_kit.cli", "dashboard", "--results", str(root), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/favicon.ico")
                c.getresponse()
                break
            except OSError:
                if time.time() - t0 > 60:
                    raise
                time.sleep(0.2)
        print(f"server up in {time.time() - t0:.1f} s")
        exe = shutil.which("chromium")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, headless=True)
            print(f"{'page':24s} {'first plot [s]':>15s} {'all plots [s]':>14s} {'websocket [kB]':>15s}  (median of "
                  f"{a.repeats}; first visit)")
            for name, q in PAGES.items():
                firsts, alls, kbs, cold = [], [], [], None
                for _ in range(a.repeats):
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    got = [0]
                    page.on("websocket", lambda ws, got=got: ws.on(
                        "framereceived", lambda f, got=got: got.__setitem__(0, got[0] + len(f))))
                    t = time.time()
                    page.goto(f"http://127.0.0.1:{port}/{q}")
                    if name == "overview":
                        page.get_by_text("runs/climate/pretrained_n1_s0").first.wait_for(timeout=60_000)
                        first = time.time() - t
                        full = first
                    else:
                        page.wait_for_selector("canvas", timeout=60_000)
                        first = time.time() - t
                        page.wait_for_load_state("networkidle")
                        n, stable = -1, 0
                        while stable < 3:  # no new canvas for 3 x 200 ms
                            page.wait_for_timeout(200)
                            m = page.locator("canvas").count()
                            stable, n = (stable + 1, n) if m == n else (0, m)
                        full = time.time() - t - 0.6
                    cold = first if cold is None else cold
                    firsts.append(first)
                    alls.append(full)
                    kbs.append(got[0] / 1e3)
                    page.close()
                print(f"{name:24s} {statistics.median(firsts):15.2f} {statistics.median(alls):14.2f} "
                      f"{statistics.median(kbs):15.0f}  ({cold:.2f})")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
