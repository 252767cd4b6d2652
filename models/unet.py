"""One U-Net for images `[B,C,H,W]` and videos `[B,C,T,H,W]`.

ResNet blocks (GroupNorm, scale-shift by the timestep + conditioning embedding)
built from pseudo-3D convolutions, pseudo-3D attention at the lower resolutions.
With `temporal=False` the net is the image model (no temporal parameters at all);
with `temporal=True` it is the video model, and video input runs the temporal
layers. Conditioning (unCLIP style): the CLIP image embedding is added to the
time embedding and projected to `context_tokens` extra attention keys. The video
model also embeds fps (sinusoidal, added to the time embedding, zero-initialised).
Extra input channels (masked frames + mask, upsampled low-res video) are simply
concatenated by the caller; `in_channels` counts them. A super-resolution net trained with
noise conditioning augmentation also embeds the low-res input's noise level.
"""
from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.layers import (
    GroupNorm,
    PseudoConv3d,
    ScalarEmbedding,
    SpatialAttention,
    TemporalAttention,
    zero_,
)


class ResBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, emb_dim: int, temporal: bool, temporal_kernel: int,
                 dropout: float, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(min(groups, dim_in), dim_in)
        self.conv1 = PseudoConv3d(dim_in, dim_out, temporal=temporal, temporal_kernel=temporal_kernel)
        self.emb_proj = nn.Linear(emb_dim, 2 * dim_out)
        self.norm2 = GroupNorm(min(groups, dim_out), dim_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = PseudoConv3d(dim_out, dim_out, temporal=temporal, temporal_kernel=temporal_kernel)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x, emb, context=None, frames=None):
        h = self.conv1(self.act(self.norm1(x)), frames)
        scale, shift = self.emb_proj(self.act(emb))[..., None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(self.act(h)), frames)
        return h + self.skip(x)


class AttentionBlock(nn.Module):
    """Attn_P3D: spatial attention (with context tokens), then temporal attention on videos."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, temporal: bool, groups: int):
        super().__init__()
        self.spatial = SpatialAttention(dim, heads, dim_head, context_dim, groups)
        self.temporal = TemporalAttention(dim, heads, dim_head) if temporal else None

    def forward(self, x, emb=None, context=None, frames=None):
        x = self.spatial(x, context)
        if frames is not None and self.temporal is not None:
            x = self.temporal(x, frames)
        return x


class Downsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x, *args, **kwargs):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x, *args, **kwargs):
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        channels: int = 64,
        channel_mults: tuple[int, ...] = (1, 2, 4),
        num_res_blocks: int = 2,
        attn_levels: tuple[int, ...] = (1, 2),
        heads: int = 4,
        dim_head: int = 32,
        cond_dim: int = 0,
        context_tokens: int = 4,
        temporal: bool = False,
        temporal_kernel: int = 3,
        dropout: float = 0.0,
        groups: int = 32,
        grad_checkpoint: bool = False,
        noise_level_cond: bool = False,
    ):
        super().__init__()
        # everything needed to rebuild this net (inflation, checkpoints)
        self.kwargs = dict(
            in_channels=in_channels, out_channels=out_channels, channels=channels,
            channel_mults=tuple(channel_mults), num_res_blocks=num_res_blocks, attn_levels=tuple(attn_levels),
            heads=heads, dim_head=dim_head, cond_dim=cond_dim, context_tokens=context_tokens, temporal=temporal,
            temporal_kernel=temporal_kernel, dropout=dropout, groups=groups, grad_checkpoint=grad_checkpoint,
            noise_level_cond=noise_level_cond,
        )
        self.temporal = temporal
        self.grad_checkpoint = grad_checkpoint
        self.channels = channels
        self.context_tokens = context_tokens
        emb_dim = channels * 4
        self.emb_dim = emb_dim

        self.time_embed = ScalarEmbedding(channels, emb_dim)
        if temporal:  # new in the video model: must add zero at init
            self.temporal_fps_embed = ScalarEmbedding(channels, emb_dim, zero_init=True)
        if noise_level_cond:  # super-resolution: how noised the low-res input is (noise augmentation)
            self.noise_level_embed = ScalarEmbedding(channels, emb_dim)
        context_dim = None
        if cond_dim:
            context_dim = emb_dim
            self.image_embed = nn.Linear(cond_dim, emb_dim)
            self.image_tokens = nn.Linear(cond_dim, context_tokens * emb_dim)
            self.context_norm = nn.LayerNorm(emb_dim)

        def res(a, b):
            return ResBlock(a, b, emb_dim, temporal, temporal_kernel, dropout, groups)

        def attn(d):
            return AttentionBlock(d, heads, dim_head, context_dim, temporal, groups)

        self.conv_in = PseudoConv3d(in_channels, channels, temporal=temporal, temporal_kernel=temporal_kernel)
        dims = [channels * m for m in channel_mults]
        self.down, skip_dims, d = nn.ModuleList(), [channels], channels
        for level, dim in enumerate(dims):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([res(d, dim)] + ([attn(dim)] if level in attn_levels else [])))
                d = dim
                skip_dims.append(d)
            if level < len(dims) - 1:
                self.down.append(nn.ModuleList([Downsample(d)]))
                skip_dims.append(d)
        self.mid = nn.ModuleList([res(d, d), attn(d), res(d, d)])
        self.up = nn.ModuleList()
        for level, dim in reversed(list(enumerate(dims))):
            for i in range(num_res_blocks + 1):
                blocks = [res(d + skip_dims.pop(), dim)] + ([attn(dim)] if level in attn_levels else [])
                d = dim
                if level > 0 and i == num_res_blocks:
                    blocks.append(Upsample(d))
                self.up.append(nn.ModuleList(blocks))
        self.norm_out = GroupNorm(min(groups, d), d)
        self.conv_out = PseudoConv3d(d, out_channels, temporal=temporal, temporal_kernel=temporal_kernel)
        zero_(self.conv_out.spatial)

    def _run(self, blocks, x, emb, context, frames):
        for block in blocks:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, emb, context, frames, use_reentrant=False)
            else:
                x = block(x, emb, context, frames)
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor, image_emb: torch.Tensor | None = None,
                fps: torch.Tensor | None = None, noise_level: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,C,H,W] or [B,C,T,H,W]; t [B]; image_emb [B,cond_dim] (zeros = unconditional); fps [B];
        noise_level [B]: the timestep the extra low-res channels were noised to (None: 0)."""
        video = x.ndim == 5
        b = x.shape[0]
        frames = x.shape[2] if video else None
        if video:
            x = rearrange(x, "b c t h w -> (b t) c h w")

        emb = self.time_embed(t.expand(b) if t.ndim == 0 else t, x.dtype)
        if self.temporal and fps is not None:
            emb = emb + self.temporal_fps_embed(fps, x.dtype)
        if hasattr(self, "noise_level_embed"):
            level = torch.zeros(b, device=x.device) if noise_level is None else noise_level
            emb = emb + self.noise_level_embed(level, x.dtype)
        context = None
        if hasattr(self, "image_embed"):
            if image_emb is None:
                image_emb = torch.zeros(b, self.kwargs["cond_dim"], device=x.device, dtype=x.dtype)
            image_emb = image_emb.to(emb.dtype)
            emb = emb + self.image_embed(image_emb)
            context = self.context_norm(rearrange(self.image_tokens(image_emb), "b (n d) -> b n d",
                                                  n=self.context_tokens))
        if video:  # each frame sees its clip's conditioning
            emb = repeat(emb, "b d -> (b t) d", t=frames)
            context = None if context is None else repeat(context, "b n d -> (b t) n d", t=frames)

        h = self.conv_in(x, frames)
        skips = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb, context, frames)
            skips.append(h)
        h = self._run(self.mid, h, emb, context, frames)
        for blocks in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(blocks, h, emb, context, frames)
        h = self.conv_out(nn.functional.silu(self.norm_out(h)), frames)
        if video:
            h = rearrange(h, "(b t) c h w -> b c t h w", b=b)
        return h

    def compile_blocks(self, channels_last: bool = False) -> None:
        """torch.compile each ResBlock and AttentionBlock (regional compilation), in place. Blocks of
        the same shape share one compiled graph and the graphs are small: the base decoder compiled
        in 147 s on an H100 host, where the whole U-Net as one graph had not finished after 200 s
        (1.5x faster on CPU too). Within a block the same work is fused (norms, SiLU, scale-shift,
        residuals, layout copies); only fusion across block boundaries is given up.

        channels_last: keep every block's convolutions channels_last. On CUDA inductor does so only
        where its heuristic expects a gain, and it expects none for a convolution with at least
        twice as many input channels as outputs, which 9 of the 12 up-path ResBlocks have (the skip
        concatenation). The activation copies in the base decoder's compiled step on an H200 (18
        at 64x64, 12 at 32x32: 7 % of the step) match 6 per step from each such block
        (bench/RESULTS.md; the forced layout is not yet measured there). The CPU's inductor always
        keeps channels_last."""
        blocks = [m for m in self.modules() if isinstance(m, (ResBlock, AttentionBlock))]
        # one cache entry per distinct block shape, over the default 8 per code object
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(blocks))
        options = {"force_layout_optimization": True} if channels_last else None
        for block in blocks:
            block.compile(dynamic=False, options=options)  # static shapes: a new shape recompiles

    def temporal_parameters(self):
        return [p for n, p in self.named_parameters() if "temporal" in n]

    def spatial_parameters(self):
        return [p for n, p in self.named_parameters() if "temporal" not in n]
