"""Radiology runs on the dashboard (orthogonal slices of each test case with predicted and true
labels, per-case scores), drawn by the functions the ``03_visualize`` notebook uses; files are
read through ``run.file`` (inside the results folder)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hfmi_kit.viz.dashboard import guard, panel, published, show
from hfmi_kit.viz.results import AccessRefusedError, Run, resolve_under


class _OneAtATime(Mapping[str, Any]):
    """Modality volumes read from their (already opened, canonical) NIfTI images when shown, one
    held in memory at a time: a CT is hundreds of MB as float32, and a page offers every modality."""

    def __init__(self, images: Mapping[str, Any]) -> None:
        self.images = dict(images)
        self._held: tuple[str | None, Any] = (None, None)

    def __getitem__(self, name: str) -> Any:
        import numpy as np

        if self._held[0] != name:
            self._held = (None, None)  # the previous volume goes before the next is read
            self._held = (name, np.asarray(self.images[name].dataobj, dtype=np.float32))
        return self._held[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)


def _radiology_case(root: Path, run: Run, case_id: str) -> Any:
    import nibabel as nib
    import numpy as np

    from hfmi_kit.domains.radiology import discover
    from hfmi_kit.domains.radiology.plots import legend_html, orthoviews

    pn = panel()

    def nifti(p: Path) -> Any:  # canonical (RAS) orientation, read only inside the results directory
        return nib.as_closest_canonical(nib.load(str(resolve_under(root, _rel(root, p)))))

    pred_file = run.file(f"predictions/{case_id}_pred.nii.gz")
    if pred_file is None:
        raise AccessRefusedError(f"refused: no prediction of {case_id!r} in the run")
    pred_img = nifti(pred_file)
    pred = np.asarray(pred_img.dataobj).astype(np.uint8)
    notes, found, masks = [], {}, {"predicted": pred}
    data = ((run.config or {}).get("card", {}).get("data") or [{}])[0].get("path")
    if data:
        try:
            sub = {s.id: s for s in discover(resolve_under(root, _rel(root, Path(data))))}.get(case_id)
            mods = (run.config or {}).get("geometry", {}).get("modalities") or list(sub.images if sub else [])
            if sub is not None:
                for m in [m for m in mods if m in sub.images]:  # every modality on the prediction's grid
                    img = nifti(Path(sub.images[m]))
                    if img.shape[:3] == pred.shape:  # from the header: nothing read yet
                        found[m] = img
                if sub.label:
                    lab = nifti(Path(sub.label))
                    if lab.shape[:3] == pred.shape:
                        masks["true"] = np.asarray(lab.dataobj).astype(np.uint8)
                if found:
                    notes.append(f"{', '.join(found)} of {case_id}")
        except AccessRefusedError:
            notes.append("the input images lie outside the results directory: the prediction is shown alone")
    images: Mapping[str, Any] = _OneAtATime(found) if found else {"prediction": (pred > 0).astype(np.float32)}
    ref = masks.get("true", pred)
    centre = np.argwhere(ref > 0).mean(0).round().astype(int) if ref.any() else None
    plot = orthoviews(images, masks, title=case_id, centre=centre, positions=list(range(30, 71, 5)), size=220,
                      dynamic=True, affine=pred_img.affine)
    return pn.Column(pn.pane.Markdown("; ".join(notes)), pn.pane.HTML(f"masks: {legend_html()}"), show(plot))


def _rel(root: Path, p: Path) -> str:
    """``p`` relative to ``root`` (resolved); ``..`` when outside, which :func:`resolve_under` refuses."""
    try:
        return str(Path(os.path.abspath(p)).resolve().relative_to(root.resolve()))
    except ValueError:
        return "../" + p.name


def section(run: Run) -> list[Any]:
    """Per test case: orthogonal slices with the predicted (and true) label overlay, a slice slider."""
    import pandas as pd

    pn = panel()
    root = run.root or run.path
    out: list[Any] = []
    pred_dir = published(run, "predictions", out)
    preds = sorted(pred_dir.glob("*_pred.nii.gz")) if pred_dir is not None else []
    if not preds:
        return out

    def build() -> Any:
        ids = [p.name[: -len("_pred.nii.gz")] for p in preds]
        case = pn.widgets.Select(name="test case", options=ids, value=ids[0])
        items = ["### Segmentation", case, pn.bind(lambda c: guard(c, lambda: _radiology_case(root, run, c)), case)]
        cj = run.file("cases.json")
        if cj is not None:
            per = json.loads(cj.read_text(encoding="utf-8")).get("per_case", {}).get("model", [])
            if per:
                cols = [c for c in ("id", "dice", "hd95_mm", "centroid_error_mm", "volume_ml_pred", "volume_ml_true")
                        if c in per[0]]
                items += ["### Per-case scores", pn.pane.DataFrame(pd.DataFrame(per)[cols], index=False,
                                                                   float_format="{:.3g}".format)]
        return pn.Column(*items)

    return [*out, guard("predictions", build)]
