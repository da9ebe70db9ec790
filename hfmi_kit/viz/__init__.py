"""HoloViews plots shared by the notebooks and the dashboards (imported lazily: needs ``[viz]``)."""

from __future__ import annotations

from typing import Any


def require_holoviews() -> Any:
    """Import holoviews with the bokeh backend, or say which extra to install."""
    try:
        import holoviews as hv
    except ImportError as e:
        raise ImportError("plots need holoviews; install them with `pip install hfmi_kit[viz]`") from e
    if not hv.Store.renderers:
        hv.extension("bokeh", logo=False)
    return hv
