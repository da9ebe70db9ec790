"""The shared evaluation (``recipe.evaluate``): every domain's ``hfmi evaluate`` is its ``load``,
``predictor``, ``score`` and ``write_outputs`` in one order, with the checks made once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from hfmi_kit.domains import Bundle, Domain, Scored, base
from hfmi_kit.errors import ConfigError, DataError
from hfmi_kit.models import register_model
from hfmi_kit.train import recipe
from hfmi_kit.train.pretrained import ModelConfig, save_pretrained


@register_model("toy_line")
class ToyLine(nn.Module):
    """y = w x + b."""

    def __init__(self, *, size: Any = None) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x[:, None])[:, 0]


class Toy(Domain):
    """Rows ``x,y`` in a text file; a fine-tuned model is scored on the rows it did not train on."""

    name: ClassVar[str] = "toy"
    tasks: ClassVar[tuple[str, ...]] = ("line",)
    data_formats: ClassVar[str] = "x,y rows"
    tasks_module: ClassVar[str] = __name__

    def __init__(self) -> None:
        self.calls: list[str] = []

    def example_data(self, out_dir: str | Path, **kw: Any) -> Path:
        return Path(out_dir)

    def load(self, data: str | Path, *, ckpt: str | Path, config: dict[str, Any], **options: Any) -> Bundle:
        self.calls.append("load")
        rows = np.loadtxt(data, delimiter=",", ndmin=2)
        seen = set(config["training"]["rows"])
        keep = [i for i in range(len(rows)) if i not in seen]
        return Bundle(Path(data), rows[keep], len(keep), unit="row", meta={"rows": len(keep)})

    def score(self, predictor: Any, bundle: Bundle, *, out: Path | None = None, **options: Any) -> Scored:
        self.calls.append("score")
        x, y = torch.from_numpy(bundle.items[:, 0]).float(), bundle.items[:, 1]
        pred = predictor(x).numpy()
        return Scored({"mae": float(np.abs(pred - y).mean())}, outputs=pred)

    def write_outputs(self, scored: Scored, out: str | Path) -> list[Path]:
        self.calls.append("write_outputs")
        path = Path(out) / "pred.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savetxt(path, scored.outputs)
        return [path]


DOMAIN = Toy()


@pytest.fixture(autouse=True)
def _toy_registered(monkeypatch):
    """The toy domain is found by name (``load_pretrained`` imports a checkpoint's domain) during
    each test only, so that other tests of this worker see the registry as it was."""
    monkeypatch.setitem(base._REGISTERED, "toy", f"{__name__}:DOMAIN")
    base.get_domain.cache_clear()
    DOMAIN.calls.clear()
    yield
    base.get_domain.cache_clear()


def _checkpoint(root: Path, task: str, trained_rows: list[int], domain: str = "toy") -> Path:
    model = ToyLine()
    with torch.no_grad():
        model.lin.weight.fill_(2.0)
        model.lin.bias.fill_(1.0)
    mc = ModelConfig(domain=domain, task=task, model_type="toy_line.tiny", model_kwargs={},
                     training={"rows": trained_rows})
    return save_pretrained(model, root / task / "model", config=mc)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    x = np.arange(6, dtype=float)
    y = 2 * x + 1 + np.array([0.0, 0.0, 0.5, -0.5, 1.0, -1.0])  # rows 2..5 are off the line by 0.5-1
    p = tmp_path / "rows.csv"
    np.savetxt(p, np.c_[x, y], delimiter=",")
    return p


def test_the_evaluation_scores_the_rows_left_out_of_training_and_publishes_them(tmp_path, data):
    dom = DOMAIN
    ckpt = _checkpoint(tmp_path, "line", trained_rows=[0, 1])
    m = recipe.evaluate(dom, ckpt=ckpt, data=data, out=tmp_path / "ev")
    assert dom.calls == ["load", "score", "write_outputs"]
    assert m == pytest.approx({"mae": 0.75, "rows": 4.0})  # |0.5|, |-0.5|, |1|, |-1| on the 4 held-out rows
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == pytest.approx(m)
    assert np.loadtxt(tmp_path / "ev" / "pred.txt") == pytest.approx([5.0, 7.0, 9.0, 11.0])


@pytest.mark.parametrize("task,domain,message", [
    ("pretrain", "toy", "not a fine-tuned toy model (task 'pretrain'"),
    ("line", "materials", "a 'materials' checkpoint, not a toy one"),
])
def test_a_checkpoint_of_another_task_or_domain_is_refused_before_the_data_is_read(tmp_path, data, task, domain,
                                                                                   message):
    dom = DOMAIN
    ckpt = _checkpoint(tmp_path, task, trained_rows=[], domain=domain)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        recipe.evaluate(dom, ckpt=ckpt, data=data, out=tmp_path / "ev")
    assert dom.calls == [] and not (tmp_path / "ev").exists()


def test_nothing_left_to_evaluate_is_one_line_and_writes_nothing(tmp_path, data):
    dom = DOMAIN
    ckpt = _checkpoint(tmp_path, "line", trained_rows=list(range(6)))
    with pytest.raises(DataError, match="every row was used to train"):
        recipe.evaluate(dom, ckpt=ckpt, data=data, out=tmp_path / "ev")
    assert dom.calls == ["load"] and not (tmp_path / "ev").exists()
