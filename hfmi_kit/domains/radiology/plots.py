"""Radiology plots (HoloViews): a three-plane viewer with mask overlays (orientation labels,
positions in mm, the voxel spacing's aspect, window presets, every modality), masked-patch
reconstructions, and the label-efficiency curve. Notebooks and dashboards share them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hfmi_kit.viz import require_holoviews

MASK_COLOURS = ["#f4a261", "#e63946"]  # oedema, core
MASK_CLASSES = {1: "oedema", 2: "tumour core"}
#: CT window presets (level, width) in HU, as radiology viewers offer them
CT_WINDOWS = {"soft tissue": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0)}
PLANES = ("sagittal", "coronal", "axial")
# per plane, the two displayed axes of a RAS grid (horizontal, vertical) and the edge labels
# (left, right, bottom, top): neurological convention, the patient's right on the viewer's right
_AXES = {0: (1, 2), 1: (0, 2), 2: (0, 1)}
_EDGES = {0: ("P", "A", "I", "S"), 1: ("L", "R", "I", "S"), 2: ("L", "R", "P", "A")}


def _slice(vol: np.ndarray, axis: int, idx: int) -> np.ndarray:
    return np.take(vol, idx, axis=axis).T  # rows = second remaining axis (image "up")


def _legend_entries(classes: Mapping[int, str] | None = None) -> list[tuple[str, str]]:
    """(``"1 oedema"``, its overlay colour) per mask class, in label order."""
    return [(f"{k} {name}", MASK_COLOURS[(k - 1) % len(MASK_COLOURS)])
            for k, name in sorted(dict(classes or MASK_CLASSES).items())]


def legend_html(classes: Mapping[int, str] | None = None) -> str:
    """The mask legend as HTML (coloured squares and class names), for a page that shows the
    live viewer (:func:`orthoviews` with ``dynamic``) and need not send it with every slice."""
    return " ".join(f'<span style="color:{colour}">&#9632;</span> {label}'
                    for label, colour in _legend_entries(classes))


def windows(image: np.ndarray, modality: str = "") -> dict[str, tuple[float, float]]:
    """Display ranges (low, high) by name: for a CT in Hounsfield units (its name says CT and its
    values reach below -500) the presets of :data:`CT_WINDOWS` and the percentiles; otherwise
    (MR, or intensities already normalised) the 1st-99.5th percentiles."""
    finite = image[np.isfinite(image)]
    lo, hi = (np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0))
    out = {"percentiles": (float(lo), float(hi))}
    if "ct" in modality.lower() and finite.size and float(finite.min()) < -500:
        out = {k: (lv - w / 2, lv + w / 2) for k, (lv, w) in CT_WINDOWS.items()} | out
    return out


def orthoviews(image: np.ndarray | Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray] | None = None, *,
               title: str = "", spacing: Sequence[float] = (1.0, 1.0, 1.0), origin: Sequence[float] | None = None,
               positions: Sequence[int] | None = None, size: int = 240, centre: Sequence[int] | None = None,
               dynamic: bool = False, classes: Mapping[int, str] | None = None,
               affine: np.ndarray | None = None) -> Any:
    """A three-plane viewer of ``image`` (I, J, K on a RAS-ordered grid; or modality name -> such
    an array, every one selectable), a row per plane, with label overlays (name -> label map, one
    column per name).

    What radiology viewers show: orientation labels on every edge (L/R, P/A, I/S; the patient's
    right on the viewer's right; on the first panel of each row); one slider per plane with the
    position in mm (``origin`` + index x ``spacing``, the grid's spacing in mm per axis; both from
    ``affine``, axis-aligned RAS, when given); the aspect of the voxel spacing; window presets
    (CT in HU: soft tissue, lung, bone; otherwise percentiles); a legend of the mask's
    ``classes`` (default 1 oedema, 2 tumour core; live, :func:`legend_html` gives it to the page).
    ``positions``: the slider's stops in % of each axis (default every 5 % from 10 to 90; around
    ``centre``, an index per axis, when given).
    ``dynamic`` makes DynamicMaps that cut (and send to a browser) only the slices shown, as the
    dashboard does, with one slider per plane and a window dropdown, in one layout. Otherwise every
    slice at the stops is precomputed so that a saved notebook keeps its widgets: an
    :class:`OrthoViews`, one row per plane, each displayed as its own output with its own slider
    (the plane's position in mm) and modality menu; the window is the first preset (every
    combination would multiply the notebook's size)."""
    hv = require_holoviews()
    # a mapping is kept as given: one that reads each volume when it is asked for keeps memory low
    images = image if isinstance(image, Mapping) else {"image": np.asarray(image)}
    masks = dict(masks or {})
    classes = dict(classes or MASK_CLASSES)
    first = next(iter(images.values()))
    n = first.shape
    if affine is not None:
        a = np.asarray(affine, dtype=np.float64)
        spacing, origin = np.linalg.norm(a[:3, :3], axis=0), a[:3, 3]
    sp = [float(s) for s in spacing]
    org = [0.0, 0.0, 0.0] if origin is None else [float(o) for o in origin]
    pct = list(positions or range(10, 95, 5))
    wins = {m: windows(v, m) for m, v in images.items()}

    def index(ax: int, p: int) -> int:
        if centre is None:
            return int(round((n[ax] - 1) * p / 100))
        return int(np.clip(centre[ax] + round((p - 50) / 100 * n[ax]), 0, n[ax] - 1))

    def mm(ax: int, idx: int) -> float:
        return round(org[ax] + idx * sp[ax], 1)

    stops = [sorted({index(ax, p) for p in pct}) for ax in range(3)]
    at = [{mm(ax, i): i for i in stops[ax]} for ax in range(3)]
    pos_dims = [hv.Dimension(f"{PLANES[ax]} [mm]", values=list(at[ax]), default=list(at[ax])[len(at[ax]) // 2])
                for ax in range(3)]
    mod_dim = hv.Dimension("modality", values=list(images), default=list(images)[0])
    win_names = list(dict.fromkeys(w for m in wins.values() for w in m))
    win_dim = hv.Dimension("window", values=win_names, default=win_names[0])

    def axes_of(ax: int) -> list[str]:
        """The plane's axes, named per plane: the panels of a row zoom together, and the planes
        (of different extents in mm) keep their own ranges."""
        h, v = _AXES[ax]
        return [f"{PLANES[ax]} {'RAS'[h]} [mm]", f"{PLANES[ax]} {'RAS'[v]} [mm]"]

    def extent(ax: int) -> tuple[float, float, float, float]:
        h, v = _AXES[ax]
        return (0.0, 0.0, n[h] * sp[h], n[v] * sp[v])

    def edge_labels(ax: int) -> Any:
        """A bokeh hook adding the plane's four orientation letters as screen-placed annotations
        (a few hundred bytes each, where a glyph would send kilobytes with every slice)."""
        left, right, bottom, top = _EDGES[ax]

        def hook(plot: Any, element: Any) -> None:
            from bokeh.models import Label

            style = {"text_color": "yellow", "text_font_size": "11pt", "text_font_style": "bold",
                     "x_units": "screen", "y_units": "screen", "name": "orientation"}
            fw, fh = plot.state.frame_width or size, plot.state.frame_height or size
            for text, x, y, ha, va in ((left, 4, fh / 2, "left", "middle"), (right, fw - 4, fh / 2, "right", "middle"),
                                       (bottom, fw / 2, 4, "center", "bottom"), (top, fw / 2, fh - 4, "center", "top")):
                plot.state.add_layout(Label(x=x, y=y, text=text, text_align=ha, text_baseline=va, **style))

        return hook

    def base(ax: int, pos: float, mod: str, win: str, edges: bool = True) -> Any:
        idx = at[ax][pos]
        lo, hi = wins[mod].get(win, wins[mod]["percentiles"])
        x0, y0, x1, y1 = extent(ax)
        f = size / max(x1 - x0, y1 - y0)  # the frame in proportion to the plane's extent in mm
        img = hv.Image(_slice(images[mod], ax, idx)[::-1], bounds=(x0, y0, x1, y1),
                       kdims=axes_of(ax)).opts(
            cmap="gray", clim=(lo, hi), xaxis=None, yaxis=None, frame_width=max(1, round(f * (x1 - x0))),
            frame_height=max(1, round(f * (y1 - y0))), title=f"{PLANES[ax]} {pos:g} mm ({idx})", tools=["hover"],
            fontsize={"title": "9pt"}, hooks=[edge_labels(ax)] if edges else [])
        return hv.Overlay([img])

    def legend() -> Any:
        entries = _legend_entries(classes)  # one glyph, a legend entry per class
        return hv.Points([(np.nan, np.nan, label) for label, _ in entries], axes_of(2), "class").opts(
            color="class", cmap=dict(entries), marker="square", size=9, show_legend=True)

    def overlaid(ax: int, mname: str, pos: float, mod: str, win: str) -> Any:
        idx = at[ax][pos]
        sl = _slice(masks[mname], ax, idx)[::-1].astype(np.float32)
        sl[sl == 0] = np.nan
        over = hv.Image(sl, bounds=extent(ax), kdims=axes_of(ax)).opts(
            cmap=MASK_COLOURS, clim=(0.5, 2.5), alpha=0.55)
        # the row's first panel carries the orientation labels, the last row the legend (fewer
        # glyphs to send to a browser)
        shown = base(ax, pos, mod, win, edges=False) * over
        if ax == 2 and not dynamic:  # live (the dashboard), the page shows it once: :func:`legend_html`
            shown = (shown * legend()).opts(legend_position="bottom")
        return shown.opts(title=f"{PLANES[ax]} {pos:g} mm: {mname}")

    makers = []
    for ax in range(3):
        makers.append((ax, lambda pos, mod, win, ax=ax: base(ax, pos, mod, win)))
        makers.extend((ax, lambda pos, mod, win, ax=ax, m=m: overlaid(ax, m, pos, mod, win)) for m in masks)
    panels: list[Any] = []
    if dynamic:  # one slider per plane: every panel takes the three positions and shows its own
        kdims = [*pos_dims, mod_dim, win_dim]
        for ax, f in makers:
            panels.append(hv.DynamicMap(lambda s, c, a, mod, win, ax=ax, f=f: f((s, c, a)[ax], mod, win),
                                        kdims=kdims))
        return hv.Layout(panels).cols(1 + len(masks)).opts(title=title)
    # a saved notebook: per plane, its own slider over the plane's stops (in mm) and the modality
    # (a HoloMap per panel, the frames of one row only: the three planes need not be combined)
    for ax, f in makers:
        panels.append(hv.HoloMap({(pos, m): f(pos, m, win_names[0]) for pos in at[ax] for m in images},
                                 kdims=[pos_dims[ax], mod_dim]))
    return OrthoViews(panels, columns=1 + len(masks), title=title)


class OrthoViews(list):
    """The three-plane viewer of a saved notebook: the panels (HoloMaps) in plane order (sagittal,
    coronal, axial; per plane the image, then the image with each mask), shown as one output per
    plane, so that each plane keeps its own slider when the notebook is saved and reopened."""

    def __init__(self, panels: Sequence[Any], *, columns: int, title: str = "") -> None:
        super().__init__(panels)
        self.columns, self.title = columns, title

    def rows(self) -> list[Any]:
        """One HoloViews layout per plane (the first titled with the viewer's title)."""
        hv = require_holoviews()
        out = []
        for i in range(0, len(self), self.columns):
            row = hv.Layout(list(self[i:i + self.columns])).cols(self.columns)
            out.append(row.opts(title=self.title) if i == 0 and self.title else row)
        return out

    def _ipython_display_(self) -> None:
        from IPython.display import display

        for row in self.rows():
            display(row)


def reconstruction_panels(out: Mapping[str, np.ndarray], original: np.ndarray, *, size: int = 200) -> Any:
    """Middle axial slice of a crop: original, masked input, MAE reconstruction."""
    hv = require_holoviews()
    k = original.shape[2] // 2
    lo, hi = np.percentile(original, [1, 99.5])
    items = [("original", original), ("masked input", out["masked_input"]), ("reconstruction", out["reconstruction"])]
    return hv.Layout([hv.Image(v[:, :, k].T[::-1], bounds=(0, 0, 1, 1)).opts(
        cmap="gray", clim=(float(lo), float(hi)), width=size, height=size, xaxis=None, yaxis=None, title=t)
        for t, v in items]).cols(3)
