"""The engine: training loop, checkpoints, seeding and distributed set-up."""

from hfmi_kit.train.dist import DistInfo, init_distributed, pick_device
from hfmi_kit.train.loop import ResumableSampler, TrainConfig, Trainer, TrainResult, param_groups
from hfmi_kit.train.pretrained import (
    LoadReport,
    load_pretrained,
    read_config,
    render_model_card,
    save_pretrained,
    transfer_weights,
)
from hfmi_kit.train.seed import seed_everything

__all__ = [
    "DistInfo", "LoadReport", "ResumableSampler", "TrainConfig", "TrainResult", "Trainer",
    "init_distributed", "load_pretrained", "param_groups", "pick_device", "read_config",
    "render_model_card", "save_pretrained", "seed_everything", "transfer_weights",
]
