"""The dashboard section of a time-series run: predicted against true frequency."""

from __future__ import annotations

from typing import Any

from hfmi_kit.viz.dashboard import guard, panel, published, show


def section(run: Any) -> list[Any]:
    import holoviews as hv
    import pandas as pd

    out: list[Any] = []
    f = published(run, "predictions.csv", out)
    if f is not None:
        def parity() -> Any:
            frame = pd.read_csv(f)
            pts = hv.Points(frame, ["target", "prediction"], label="test series").opts(
                width=360, height=320, xlabel="true frequency [cycles per series]",
                ylabel="predicted [cycles per series]", tools=["hover"])
            return panel().Column("### Frequency: predicted against true", show(pts), name="timeseries parity")
        out.append(guard("predictions.csv", parity))
    return out
