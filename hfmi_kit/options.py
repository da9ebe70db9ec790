"""The task options every domain shares, declared once: a domain's task signature uses them as
annotations (``steps: opt.Steps = 300``) beside its own (``Annotated[int, opt.Opt(...)]``).

Each is ``Annotated[type, Opt(help, range)]``: :func:`hfmi_kit.config.task_options` reads them,
the CLI shows them (``hfmi options DOMAIN COMMAND``) and :func:`typed` (or ``@recorded``) checks
every call against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from hfmi_kit.config import Opt, typed  # noqa: F401  (re-exported: opt.Opt, opt.typed)

Data = Annotated[str | Path, Opt("the data: a file, a folder or a named bundled set (see the domain's data formats)")]
Out = Annotated[str | Path, Opt("the output folder (a checkpoint under out/model, out/metrics.json)")]
Parent = Annotated[str | Path | None, Opt("the checkpoint to start from (a pretrained model folder); None: "
                                          "from scratch")]
Checkpoint = Annotated[str | Path, Opt("a checkpoint folder written by hfmi (config.json, model.safetensors)")]
Size = Annotated[str, Opt("encoder size", choices=("tiny", "small", "base", "1b"))]
ParentSize = Annotated[str | None, Opt("encoder size (None: the parent checkpoint's, else tiny)",
                                       choices=("tiny", "small", "base", "1b"))]
Steps = Annotated[int, Opt("optimiser steps", low=1)]
BatchSize = Annotated[int, Opt("samples per optimiser step", low=1)]
LearningRate = Annotated[float, Opt("peak learning rate (AdamW, cosine schedule after a warm-up)", above=0)]
FinetuneRate = Annotated[float | None, Opt("peak learning rate (None: the domain's default for the mode)", above=0)]
LayerDecay = Annotated[float | None, Opt("layer-wise learning-rate decay of the encoder (None: 0.8 for a pretrained "
                                         "encoder trained in full, else 1)", above=0, high=1)]
Seed = Annotated[int, Opt("seed of the initialisation, the label pick and the data order")]
Resume = Annotated[bool, Opt("continue from the last step checkpoint under out/")]
CheckpointEvery = Annotated[int, Opt("steps between step checkpoints (0: half-way)", low=0)]
Labels = Annotated[int | None, Opt("labelled samples to train on, a count of the labelled pool (overrides "
                                   "--label-fraction)", low=1)]
LabelFraction = Annotated[float, Opt("share of the labelled pool to train on", above=0, high=1)]
Mode = Annotated[str, Opt("what trains: the whole model (full), the head on a frozen encoder (frozen), or a "
                          "linear probe", choices=("full", "frozen", "linear_probe"))]
Baselines = Annotated[bool | Sequence[str], Opt("baselines scored on the same split (True: every one the "
                                                "domain offers)")]
Variables = Annotated[Sequence[str] | None, Opt("the variables (or sources) to read (None: every one the "
                                                "domain knows that the data holds)")]
MaskRatio = Annotated[float, Opt("share of the patches the masked autoencoder hides", above=0, high=0.99)]
Precision = Annotated[str, Opt("numeric precision (auto: bf16 on a GPU that has it, else fp32)",
                               choices=("auto", "fp32", "bf16", "fp16"))]
Device = Annotated[str, Opt("auto, cpu, cuda or cuda:N")]
Progress = Annotated[bool, Opt("show a progress bar")]
Workers = Annotated[int, Opt("DataLoader worker processes reading samples (0: in the training process)", low=0)]
