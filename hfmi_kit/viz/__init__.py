"""HoloViews plots shared by the notebooks and the dashboards (imported lazily: needs ``[viz]``)."""

from __future__ import annotations

from typing import Any


def _in_kernel() -> bool:
    """Whether this runs in a Jupyter kernel (a notebook, live or executed by ``hfmi run``)."""
    import sys

    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and hasattr(shell, "kernel")


def _inline_stylesheets(viewable: Any, root: Any) -> None:
    """Panel hook: the CDN stylesheets of a rendered plot become inline CSS from Panel's own dist.

    ``pn.extension(inline=True)`` inlines them for Panel objects displayed directly, but a
    HoloViews object displayed in a notebook goes through HoloViews' renderer, which leaves
    them pointing at ``cdn.holoviz.org``: on an offline node every plot then asks for four CSS
    files that never come.
    """
    from bokeh.models import UIElement
    from panel.config import config
    from panel.io.notebook import patch_inline_stylesheets

    if config.inline:
        for model in root.select({"type": UIElement}):
            patch_inline_stylesheets(model)


def _inline_panel_stylesheets() -> None:
    from panel.viewable import Viewable

    if _inline_stylesheets not in Viewable._preprocessing_hooks:
        Viewable._preprocessing_hooks.append(_inline_stylesheets)


def require_holoviews() -> Any:
    """Import holoviews with the bokeh backend, or say which extra to install.

    In a notebook the BokehJS and Panel resources are inlined into the notebook's output
    (``inline=True``): by default they are requested from the Bokeh and HoloViz CDNs, which a
    compute node without internet cannot reach, and every plot stays blank, live and in
    executed notebooks. (The dashboard serves them itself.)
    """
    try:
        import holoviews as hv
    except ImportError as e:
        raise ImportError("plots need holoviews; install them with `pip install hfmi_kit[viz]`") from e
    if not hv.Store.renderers:
        if _in_kernel():
            import panel as pn

            hv.extension("bokeh", logo=False, inline=True)
            pn.extension(inline=True)
            _inline_panel_stylesheets()
        else:
            hv.extension("bokeh", logo=False)
    return hv
