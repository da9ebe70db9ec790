"""Inference in one place (hfmi_kit.train.infer): checked stacking, batching and the predictor."""

import numpy as np
import pytest
import torch

from hfmi_kit.errors import DataError
from hfmi_kit.train.infer import Predictor, batches, collate


def test_collate_stacks_and_names_a_sample_that_differs():
    items = [{"inputs": torch.zeros(3, 4), "target": torch.tensor(1.0)} for _ in range(5)]
    b = collate(items)
    assert b["inputs"].shape == (5, 3, 4) and b["target"].shape == (5,)
    with pytest.raises(DataError, match=r"'inputs' of sample 2 has shape \(3, 5\), sample 0 \(3, 4\)"):
        collate([*items[:2], {"inputs": torch.zeros(3, 5), "target": torch.tensor(1.0)}])
    with pytest.raises(DataError, match="sample 1 has no 'target'"):
        collate([items[0], {"inputs": torch.zeros(3, 4)}])
    assert list(collate(items, keys=("target",))) == ["target"]


def test_batches_cover_the_indices_in_order():
    data = [{"inputs": torch.tensor([float(i)])} for i in range(10)]
    got = [b["inputs"][:, 0].tolist() for b in batches(data, batch_size=4, indices=[9, 1, 2, 3, 4])]
    assert got == [[9, 1, 2, 3], [4]]


def test_the_trainer_stacks_with_the_checked_collate(tmp_path):
    from hfmi_kit.train import TrainConfig, Trainer

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"inputs": torch.zeros(2 if i % 2 else 3)}

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, b):
            return {"loss": (b["inputs"].sum() * self.w) ** 2}

    with pytest.raises(DataError, match="training batch: 'inputs' of sample"):
        Trainer(M(), Bad(), config=TrainConfig(steps=2, batch_size=4, progress=False), out_dir=None).fit()


def test_a_predictor_applies_pre_and_post_around_the_model():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight[:] = torch.tensor([[1.0, 2.0]])
    p = Predictor(model, model_fn=lambda b: model(b["x"]), pre=lambda b: {"x": b["x"] * 2},
                  post=lambda y: y.numpy() + 10)
    outs = p.over_arrays({"x": np.ones((5, 2), np.float32)}, batch_size=2)
    assert [o.shape for o in outs] == [(2, 1), (2, 1), (1, 1)]
    assert np.allclose(np.concatenate(outs), 16.0)
    with pytest.raises(DataError, match="other lengths"):
        p.over_arrays({"x": np.ones((5, 2)), "y": np.ones(4)})


def test_collate_stacks_named_sources_inside_inputs():
    items = [{"inputs": {"s2": torch.zeros(4, 4), "chm": torch.ones(4, 4)}, "target": torch.zeros(4, 4)}
             for _ in range(3)]
    b = collate(items, device="cpu")
    assert b["inputs"]["s2"].shape == (3, 4, 4) and b["inputs"]["chm"].sum() == 48
    items[1]["inputs"]["chm"] = torch.ones(5, 4)
    with pytest.raises(DataError, match=r"batch: 'inputs': 'chm' of sample 1 has shape \(5, 4\)"):
        collate(items)


def test_a_domain_builds_the_predictor_of_its_tasks_module():
    from hfmi_kit.domains import get_domain
    from hfmi_kit.domains.materials.model import MaterialsNet
    from hfmi_kit.models import SIZES

    net = MaterialsNet(size=SIZES["tiny"])
    p = get_domain("materials").predictor(net, {"processors": {"calibration": {"uncertainty_scale": 2.0}}})
    arrays = {"elements": np.array([[1, 8, 0]]), "fractions": np.array([[0.5, 0.5, 0.0]], np.float32),
              "padding": np.array([[False, False, True]])}
    (mu, sc), = p.over_arrays(arrays, keys=("elements", "fractions", "padding"))
    raw = get_domain("materials").predictor(net, {})
    (mu0, sc0), = raw.over_arrays(arrays, keys=("elements", "fractions", "padding"))
    assert np.allclose(sc, 2 * sc0) and np.allclose(mu, mu0)  # one member: the mean is unchanged
    from hfmi_kit.domains.base import Domain
    from hfmi_kit.domains.climate.tasks import ClimatePredictor
    from hfmi_kit.domains.radiology.tasks import SegmentationPredictor
    from hfmi_kit.errors import CheckpointError

    clim = get_domain("climate").predictor(net, {"processors": {"normalisation": {"tas": {"mean": 1.0, "std": 2.0}}}})
    assert isinstance(clim, ClimatePredictor) and clim.normaliser.stats["tas"]["std"] == 2.0
    with pytest.raises(CheckpointError, match="no processors.normalisation"):
        get_domain("climate").predictor(net, {})
    assert isinstance(get_domain("radiology").predictor(net, {}), SegmentationPredictor)

    class Bare(Domain):  # a domain whose tasks module defines no predictor: the model as it is
        name, tasks, data_formats, tasks_module = "bare", ("x",), "", "hfmi_kit.domains.base"

        def example_data(self, out_dir, *, seed=0, small=True, years=None):
            return out_dir

    assert type(Bare().predictor(net, {})) is Predictor
