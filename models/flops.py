"""Model FLOPs of a training step, for achieved TFLOP/s and MFU in the training logs.

Counted once, on a copy of the net on the meta device: no memory, no compute, and no collectives
under FSDP. Model FLOPs: matmuls and convolutions of the forward and of the backward the trained
parameters need (frozen layers' weight gradients are not computed, so not counted), attention as
plain matmuls, nothing that gradient checkpointing recomputes.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.nn.attention import SDPBackend
from torch.utils.flop_counter import FlopCounterMode

from models.layers import Attention
from models.stages import WRAPPERS

# dense bf16 tensor-core FLOP/s by device name; the first key found in the name wins (PCIe and NVL first)
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_bf16(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device, if its name is in PEAK_BF16."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


@contextlib.contextmanager
def math_attention(net: nn.Module):
    """Every fused-attention layer of `net` on the math kernel while in the block: the counter's
    formula for the fused kernels' backward counts their recomputation of the scores."""
    changed = [(m, m.kernels) for m in net.modules() if isinstance(m, Attention) and m.kernels is not None]
    for m, _ in changed:
        m.kernels = (SDPBackend.MATH,)
    try:
        yield
    finally:
        for m, kernels in changed:
            m.kernels = kernels


def meta_like(value):
    """A tensor's shape, dtype and strides on the meta device; anything else as it is."""
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta") \
        if isinstance(value, torch.Tensor) else value


def train_step_flops(net: nn.Module, args: tuple, kwargs: dict | None = None) -> float:
    """FLOPs of net's forward on inputs shaped like `args`/`kwargs` (tensors on any device) and of
    the backward that net's trained parameters need. `net` needs `kwargs` to be rebuilt (UNet,
    DiffusionPrior); a copy is built on the meta device with the same parameters trained."""
    trained = {WRAPPERS.sub("", name) for name, p in net.named_parameters() if p.requires_grad}
    kwargs_of_net = dict(net.kwargs) | ({"grad_checkpoint": False} if "grad_checkpoint" in net.kwargs else {})
    with torch.device("meta"):
        copy = type(net)(**kwargs_of_net)
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
    if dtype is not None:  # a *-true precision runs the net in float64, float16 or bfloat16 throughout
        copy.to(dtype)
    for name, p in copy.named_parameters():
        p.requires_grad_(name in trained)

    counter = FlopCounterMode(display=False)
    with counter, math_attention(copy):
        out = copy(*map(meta_like, args), **{k: meta_like(v) for k, v in (kwargs or {}).items()})
        if out.requires_grad:
            out.backward(torch.empty_like(out))
    return float(counter.get_total_flops())


class StepFlops:
    """The model FLOPs per sample of the training step that `net` runs next: records the shapes of
    net's next forward inputs (as meta tensors: no reference to the batch is kept), then unhooks
    itself; `per_sample()` counts them once. (A net compiled whole traces the hook once: one graph
    break on its first call.)"""

    def __init__(self, net: nn.Module):
        self.net = net
        self.inputs: tuple[tuple, dict] | None = None
        self.value: float | None = None
        self.hook = net.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, net, args, kwargs):
        self.inputs = tuple(meta_like(a) for a in args), {k: meta_like(v) for k, v in kwargs.items()}
        self.hook.remove()

    def per_sample(self) -> float | None:
        """None before the net's first forward, or where the count failed (said once: a diagnostic
        never stops a training run)."""
        if self.value is None and self.inputs is not None:
            args, kwargs = self.inputs
            self.inputs = None
            try:
                self.value = train_step_flops(self.net, args, kwargs) / args[0].shape[0]
            except Exception as err:  # noqa: BLE001 - whatever a meta-device copy of a new net trips on
                warnings.warn(f"model FLOPs not counted, so no train/tflops or train/mfu: {err!r}", stacklevel=2)
        return self.value
