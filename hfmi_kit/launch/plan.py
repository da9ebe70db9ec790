"""Pre-flight planning: will a configuration fit, and how long will it take?

:func:`plan` estimates, for the transformer encoder + MAE decoder of a size in the size table
(or any :class:`~hfmi_kit.models.EncoderConfig`), the parameter count, the training FLOPs per
sample, the memory per device under DDP or FSDP (weights, gradients, AdamW state, activations,
communication buffers) and the step time and total hours for a sample budget at an assumed MFU.

Memory model, per device (bytes): fp32 master weights, gradients and two AdamW moments are
16 per parameter, divided by the number of devices under FSDP (plus two gathered blocks in
flight); DDP adds a gradient bucket copy (4 per parameter); bf16 autocast keeps a bf16 copy of
the weights (2 per parameter). Activations saved for backward per token and layer are
``ACT_PER_TOKEN_LAYER * width`` values (layer norms, q/k/v and attention output, the
projections, the MLP's hidden and GELU output), 4 bytes in fp32 and about 2.5 in bf16 (norms
stay fp32); with activation checkpointing a layer keeps only its input, and one layer at a time
is recomputed. The encoder sees ``(1 - mask_ratio)`` of the tokens, the decoder all of them.
Attention kernels that materialise the scores (``attention="math"``: PyTorch's fallback where the
fused kernels cannot run, e.g. an unsupported head size or the fused back-ends switched off) also
keep the softmax output, a ``heads x T x T`` array per layer and sample; the flash and
memory-efficient kernels (CUDA, and the CPU's flash kernel, which PyTorch picks with or without a
padding mask) do not. The optimiser step is the other peak: all gradients are alive, the
activations freed, and AdamW's default multi-tensor (``foreach``) update on a GPU allocates one
more fp32 value per parameter of a group (``optimizer="foreach"``; the fused and per-tensor
updates do not). The end of the backward is the third candidate: every gradient is alive with the
first block's activations (recomputed there under activation checkpointing). So the peak is the
fixed states plus the largest of the activations, the gradients with the first block's
activations, and the gradients with the step temporary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hfmi_kit.errors import ConfigError
from hfmi_kit.models.config import EncoderConfig, get_size

ACT_PER_TOKEN_LAYER = 17.0  # values saved per token per block, in units of the block width
GB = 1024**3
STEP_TEMP = "optimiser step (foreach)"
OPTIMIZERS = ("foreach", "fused", "loop")
PEAK_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}  # H100 SXM dense; pass peak_tflops for yours


def block_params(cfg: EncoderConfig) -> tuple[int, int, int]:
    """(one encoder block, one decoder block, all transformer blocks + the encoder-to-decoder
    projection) in parameters, from :meth:`EncoderConfig.num_params`."""
    enc = cfg.num_params() // cfg.depth
    dec = dataclasses.replace(cfg, dim=cfg.decoder_dim, depth=1, heads=1).num_params()
    return enc, dec, cfg.depth * enc + cfg.decoder_depth * dec + cfg.dim * cfg.decoder_dim


@dataclass
class Plan:
    """The estimate; :meth:`report` prints it."""

    params: int
    flops_per_sample: float
    memory: dict[str, float]  # bytes per device by component
    devices: int
    device_memory: float  # bytes
    step_time_s: float
    total_hours: float
    steps: int
    first_block_activations: float = 0.0  # bytes alive with every gradient at the end of the backward
    assumptions: dict[str, Any] = field(default_factory=dict)

    @property
    def total_memory(self) -> float:
        """The peak per device: gradients are freed before the next forward (``zero_grad(set_to_none)``)
        and activations during the backward, so the two overlap only in part: the larger of the
        activations, the end of the backward (every gradient and the first block's activations,
        recomputed under activation checkpointing) and the optimiser step (gradients plus its
        temporaries) counts."""
        m = self.memory
        g, a, t = (m.get(k, 0.0) for k in ("gradients (fp32)", "activations", STEP_TEMP))
        tail = self.first_block_activations
        return sum(m.values()) - g - a - t + max(a, g + tail, g + t)

    @property
    def peak_memory(self) -> float:
        return self.total_memory

    @property
    def fits(self) -> bool:
        return self.total_memory <= self.device_memory

    def report(self) -> str:
        a = self.assumptions
        lines = [f"model: {self.params / 1e6:.1f} M parameters ({a['size']}), {a['tokens']} tokens per sample "
                 f"(encoder sees {a['encoder_tokens']})",
                 f"training FLOPs per sample: {self.flops_per_sample / 1e9:.2f} GFLOP",
                 f"memory per device ({a['strategy']}, {a['dtype']}, batch {a['batch_per_device']} per device"
                 f"{', activation checkpointing' if a['activation_checkpointing'] else ''}):"]
        lines += [f"  {k:24s} {v / GB:9.2f} GiB" for k, v in self.memory.items()]
        lines.append(f"  {'peak (acts or step)':24s} {self.total_memory / GB:9.2f} GiB of "
                     f"{self.device_memory / GB:.1f} GiB")
        if self.fits:
            lines.append(f"FITS with {(self.device_memory - self.total_memory) / GB:.1f} GiB to spare")
        else:
            hints = [h for h, ok in (("--strategy fsdp", a["strategy"] != "fsdp"),
                                     ("--activation-checkpointing", not a["activation_checkpointing"]),
                                     ("a smaller --batch-size", a["batch_per_device"] > 1)) if ok]
            tip = f"; try {', '.join(hints)}" if hints else ""
            lines.append(f"DOES NOT FIT: needs {self.total_memory / GB:.1f} GiB per device, "
                         f"{self.device_memory / GB:.1f} GiB available{tip}")
        lines.append(f"time: {self.step_time_s:.3f} s per step at {a['mfu']:.0%} MFU of {a['peak_tflops']:.0f} TFLOP/s "
                     f"per device; {self.steps} steps for {a['samples']:.3g} samples = {self.total_hours:.2f} h "
                     f"on {self.devices} device(s)")
        return "\n".join(lines)


def plan(size: str | EncoderConfig, *, tokens: int, batch_per_device: int = 8, devices: int = 1,
         device_memory_gb: float = 80.0, dtype: str = "bf16", strategy: str = "ddp",
         activation_checkpointing: bool = False, mask_ratio: float = 0.75, samples: float = 1e6,
         mfu: float = 0.4, peak_tflops: float | None = None, extra_params: int = 0,
         overhead_gb: float = 0.0, attention: str = "flash", optimizer: str = "foreach") -> Plan:
    """Estimate memory per device and time of pretraining ``size`` (see the module docstring).

    Args:
        tokens: tokens per sample (all groups and positions the tokenizer makes).
        extra_params: parameters outside the transformer blocks (embeddings, heads), if known.
        overhead_gb: fixed per-device overhead (CUDA context, allocator); 0 counts only the model.
        attention: ``flash`` (fused kernels, no T x T storage) or ``math`` (scores kept).
        optimizer: how AdamW updates: ``foreach`` (PyTorch's default on a GPU: one fp32 temporary
            per parameter at the step), ``fused`` or ``loop`` (the CPU's default; no whole-model
            temporary).
    """
    cfg = get_size(size) if isinstance(size, str) else size
    if dtype not in PEAK_TFLOPS:
        raise ConfigError(f"dtype must be one of {sorted(PEAK_TFLOPS)}, got {dtype!r}")
    if attention not in ("flash", "math"):
        raise ConfigError(f"attention must be flash or math, got {attention!r}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"strategy must be ddp or fsdp, got {strategy!r}")
    if tokens < 1 or batch_per_device < 1 or devices < 1 or not 0.0 <= mask_ratio < 1.0 or not 0.0 < mfu <= 1.0:
        raise ConfigError("tokens, batch and devices must be >= 1, mask_ratio in [0, 1), mfu in (0, 1]")
    enc_block, dec_block, blocks = block_params(cfg)
    params = blocks + extra_params
    t_enc = max(1, int(round(tokens * (1 - mask_ratio))))
    # forward FLOPs: 2 per weight per token, plus attention scores and mixing (4 T D per token and layer)
    fwd = (cfg.depth * (2 * enc_block * t_enc + 4 * t_enc * t_enc * cfg.dim)
           + cfg.decoder_depth * (2 * dec_block * tokens + 4 * tokens * tokens * cfg.decoder_dim)
           + 2 * (cfg.dim * cfg.decoder_dim + extra_params) * tokens)
    flops = 3.0 * fwd  # forward + backward (twice the forward)
    shard = devices if strategy == "fsdp" else 1
    mem: dict[str, float] = {}
    mem["weights (fp32)"] = 4.0 * params / shard
    mem["gradients (fp32)"] = 4.0 * params / shard
    mem["AdamW moments (fp32)"] = 8.0 * params / shard
    if optimizer == "foreach":
        mem[STEP_TEMP] = 4.0 * params / shard
    if strategy == "fsdp" and devices > 1:
        mem["gathered blocks (FSDP)"] = 2 * 4.0 * enc_block
    if strategy == "ddp" and devices > 1:
        mem["gradient buckets (DDP)"] = 4.0 * params
    if dtype != "fp32":
        mem["bf16 weight copies"] = 2.0 * params / shard
    act_bytes = 4.0 if dtype == "fp32" else 2.5
    per_layer_enc = ACT_PER_TOKEN_LAYER * cfg.dim * t_enc * act_bytes
    per_layer_dec = ACT_PER_TOKEN_LAYER * cfg.decoder_dim * tokens * act_bytes
    if attention == "math":  # the softmax output, (heads, T, T)
        dec_heads = max(1, cfg.decoder_dim // 32)  # as make_decoder sizes it
        per_layer_enc += cfg.heads * t_enc * t_enc * act_bytes
        per_layer_dec += dec_heads * tokens * tokens * act_bytes
    if activation_checkpointing:
        acts = (cfg.depth * cfg.dim * t_enc + cfg.decoder_depth * cfg.decoder_dim * tokens) * act_bytes \
            + max(per_layer_enc, per_layer_dec)
    else:
        acts = cfg.depth * per_layer_enc + cfg.decoder_depth * per_layer_dec
    mem["activations"] = acts * batch_per_device
    if overhead_gb:
        mem["runtime overhead"] = overhead_gb * GB
    peak = (peak_tflops if peak_tflops is not None else PEAK_TFLOPS[dtype]) * 1e12
    step = flops * batch_per_device / (peak * mfu)
    steps = int(-(-samples // (batch_per_device * devices)))
    return Plan(params=params, flops_per_sample=flops, memory=mem, devices=devices,
                device_memory=device_memory_gb * GB, step_time_s=step, total_hours=steps * step / 3600, steps=steps,
                first_block_activations=per_layer_enc * batch_per_device,
                assumptions={"size": size if isinstance(size, str) else "custom", "tokens": tokens,
                             "encoder_tokens": t_enc, "strategy": strategy, "dtype": dtype,
                             "batch_per_device": batch_per_device, "activation_checkpointing": activation_checkpointing,
                             "mfu": mfu, "peak_tflops": peak / 1e12, "samples": samples, "attention": attention,
                             "optimizer": optimizer})


def parse_memory(text: str) -> float:
    """``80GB``, ``80G``, ``40gib``, ``80`` -> GB as a float."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = 1.0
    if t.endswith("t"):
        mult, t = 1024.0, t[:-1]
    elif t.endswith("g"):
        t = t[:-1]
    elif t.endswith("m"):
        mult, t = 1 / 1024, t[:-1]
    try:
        return float(t) * mult
    except ValueError as e:
        raise ConfigError(f"cannot read the memory size {text!r}; expected e.g. 80GB") from e
