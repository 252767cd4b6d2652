"""Pseudo-3D building blocks (Make-A-Video, Sec. 3.2).

Videos travel through the U-Net folded as frames, `[(b t), c, h, w]`, so every
spatial layer is exactly the image layer. Temporal layers unfold the frames
(`frames=T`) and are skipped when `frames is None` (image input). Both temporal
layers start as the identity, so an inflated image model is unchanged at step 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# scaled_dot_product_attention's kernels for attention over a frame's pixels, fastest first: cuDNN's
# is 1.5x flash at 1024 tokens, forward + backward at the base decoder's shapes on an H200
# (bench/kernels.py; bench/RESULTS.md). CPUs have flash and math.
PIXEL_KERNELS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as two batched matmuls. Over 16 frames faster than every fused
    kernel (3.7x flash, 1.5x the memory-efficient one on an H200), which tile 64 or more queries at
    a time. einsum, not @: inductor's pattern matcher turns softmax(q @ k^T) @ v back into
    scaled_dot_product_attention where it matches (it does for a bare function of q, k, v)."""
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(dim=-1).to(v.dtype), v)


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] (timesteps, fps, positions) -> [N, dim] sin/cos features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def autocast_would_widen(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device and x is narrower than the float32 it runs norms in.
    (The meta device, where models.flops counts, has no autocast: asking torch about it raises.)"""
    return x.dtype != torch.float32 and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)


class GroupNorm(nn.GroupNorm):
    """GroupNorm that keeps its input's dtype under autocast. Autocast runs group_norm in float32
    and returns float32, so every norm -> SiLU -> conv would move twice the bytes of bf16; the
    kernel accumulates its statistics in float32 either way."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        if num_channels % num_groups:  # torch's own message names neither the setting nor the layer
            raise ValueError(f"unet.groups: {num_groups} groups do not divide a layer's {num_channels} channels "
                             "(unet.channels x each channel_mult, and the sums where the decoder joins skips)")
        super().__init__(num_groups, num_channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not autocast_would_widen(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that keeps its input's dtype under autocast (CUDA autocast runs layer_norm in
    float32 and returns float32, which the next projections cast back), as GroupNorm above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not autocast_would_widen(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class ScalarEmbedding(nn.Sequential):
    """One number per sample (diffusion timestep, fps) -> sinusoidal features -> MLP."""

    def __init__(self, dim: int, out_dim: int, zero_init: bool = False):
        super().__init__(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.dim = dim
        if zero_init:  # adds nothing at first (a new input to a trained net)
            zero_(self[2])

    def forward(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return super().forward(sinusoidal_embedding(values, self.dim).to(dtype))


class TemporalConv(nn.Conv1d):
    """1D conv over time at each pixel of `[(b t), c, h, w]` frames; Dirac init: the identity."""

    def __init__(self, dim: int, kernel: int = 3):
        super().__init__(dim, dim, kernel, padding=kernel // 2)
        nn.init.dirac_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        # runs as a (k, 1, 1) Conv3d: on channels_last frames, [(b t) h w c] in memory is
        # [b c t h w] in channels_last_3d, so both rearranges are views, not copies
        x = rearrange(x, "(b t) c h w -> b c t h w", t=frames)
        x = F.conv3d(x, self.weight[..., None, None], self.bias, padding=(self.padding[0], 0, 0))
        return rearrange(x, "b c t h w -> (b t) c h w")


class PseudoConv3d(nn.Module):
    """Conv2d over each frame, then a 1D conv over time at each pixel."""

    def __init__(self, dim_in: int, dim_out: int, kernel: int = 3, temporal: bool = False, temporal_kernel: int = 3):
        super().__init__()
        self.spatial = nn.Conv2d(dim_in, dim_out, kernel, padding=kernel // 2)
        self.temporal = TemporalConv(dim_out, temporal_kernel) if temporal else None

    def forward(self, x: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        x = self.spatial(x)
        if frames is None or self.temporal is None:
            return x
        return self.temporal(x, frames)


class Attention(nn.Module):
    """Multi-head attention over token sequences via scaled_dot_product_attention, through the first
    of `kernels` that takes the inputs; kernels=None: as plain matmuls (a few tokens)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 kernels: tuple[SDPBackend, ...] | None = PIXEL_KERNELS):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.kernels = kernels
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        # extra context tokens (CLIP image embedding, unCLIP style) join the keys and values
        self.context_to_kv = nn.Linear(context_dim, 2 * inner, bias=False) if context_dim else None
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q = self.to_q(x)
        kv = self.to_kv(x)
        if context is not None and self.context_to_kv is not None:
            kv = torch.cat([kv, self.context_to_kv(context)], dim=1)
        k, v = kv.chunk(2, dim=-1)
        q, k, v = (rearrange(z, "b n (h d) -> b h n d", h=self.heads) for z in (q, k, v))
        if self.kernels is None:
            out = matmul_attention(q, k, v)
        else:
            with sdpa_kernel(list(self.kernels), set_priority=True):
                out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class SpatialAttention(nn.Module):
    """Self-attention over the pixels of each frame, with conditioning tokens as extra keys."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None, groups: int = 32):
        super().__init__()
        self.norm = GroupNorm(min(groups, dim), dim)
        self.attn = Attention(dim, heads, dim_head, context_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        out = self.attn(tokens, context)
        return x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


class TemporalAttention(nn.Module):
    """Self-attention over frames at each pixel; zero-initialised output projection => identity at init."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.dim = dim
        self.norm = LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, kernels=None)
        zero_(self.attn.to_out)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(x, "(b t) c h w -> (b h w) t c", t=frames)
        # absolute sinusoidal frame positions: work for any clip length (16 train, 76 interpolated)
        pos = sinusoidal_embedding(torch.arange(frames, device=x.device), self.dim).to(tokens.dtype)
        out = self.attn(self.norm(tokens + pos))
        return x + rearrange(out, "(b h w) t c -> (b t) c h w", h=h, w=w)
