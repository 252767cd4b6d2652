"""Which kernel for the base decoder's hot ops: each op's forward + backward at the base config's
shapes (batch 16 clips of 16 frames at 64x64), timed for every way torch can run it.

    python bench/kernels.py                  # CUDA, bf16
    python bench/kernels.py --device cpu --scale 8   # a smoke run: 8x fewer clips, float32

- Temporal attention (16 tokens per pixel, very many sequences) and spatial attention (1024
  pixels + 4 context tokens per frame) through each scaled_dot_product_attention backend, and
  the temporal one also as the model runs it (models.layers.matmul_attention).
- The frozen 3x3 convolutions of each level (forward + input gradient: video mode trains only
  the temporal layers).
- The temporal convolution as a (3,1,1) Conv3d on channels_last_3d frames (what TemporalConv
  does) and as a (3,1) Conv2d on a [b, c, t, (h w)] view of the same memory.
Each variant's output and input gradients are checked against the first one's. The last line
is the ratio of the slowest to the fastest temporal-attention variant.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.layers import matmul_attention  # noqa: E402

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() (forward + backward), after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def attention_variants(q, k, v):
    variants = {}
    for name, backend in SDPA_BACKENDS.items():
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        variants[f"sdpa {name}"] = run
    variants["matmuls"] = lambda: matmul_attention(q, k, v)
    return variants


def conv_variants(x, weight, bias, frames):
    def conv3d():  # TemporalConv today
        y = rearrange(x, "(b t) c h w -> b c t h w", t=frames)
        y = F.conv3d(y, weight[..., None, None], bias, padding=(1, 0, 0))
        return rearrange(y, "b c t h w -> (b t) c h w")

    def conv2d():  # the same memory as [b, c, t, (h w)] in channels_last: a (3, 1) Conv2d
        h = x.shape[-2]
        y = rearrange(x, "(b t) c h w -> b c t (h w)", t=frames)
        y = F.conv2d(y, weight[..., None], bias, padding=(1, 0))
        return rearrange(y, "b c t (h w) -> (b t) c h w", h=h)

    return {"conv3d (3,1,1)": conv3d, "conv2d (3,1)": conv2d}


def compare(title, variants, inputs, device, repeats, dtype, flops=None):
    """Time forward + backward of each variant; check its output and the inputs' gradients against
    the first variant's. flops: the model FLOPs of one forward + backward, for the rate achieved."""
    print(f"== {title}", flush=True)
    reference, grad_out, results = None, None, {}
    for name, fn in variants.items():
        def step(fn=fn):
            nonlocal grad_out
            with torch.autocast(device.type, dtype, enabled=device.type == "cuda"):
                out = fn()
            if grad_out is None:  # one random upstream gradient for every variant
                grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
            out.backward(grad_out)
            return out
        try:
            for t in inputs:
                t.grad = None
            out = step().detach().float()
            checked = torch.cat([out.flatten()] + [t.grad.float().flatten() for t in inputs])
            seconds = timed(step, device, repeats)
        except RuntimeError as err:  # a backend that does not take this shape or dtype
            print(f"  {name:18s} not available: {str(err).splitlines()[0][:100]}", flush=True)
            continue
        if reference is None:
            reference = checked
        error = ((checked - reference).norm() / reference.norm()).item()
        results[name] = seconds
        rate = f"  {flops / seconds / 1e12:6.1f} TFLOP/s" if flops else ""
        print(f"  {name:18s} {seconds * 1e3:9.2f} ms{rate}  (relative difference {error:.1e})", flush=True)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=int, default=1, help="divide the batch of clips by this (smoke runs)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    clips, frames, heads, dim_head = max(16 // args.scale, 1), 16, 8, 64

    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    summary = {}
    for side, dim in ((32, 256), (16, 384), (8, 512)):  # the attention levels of the base decoder
        pixels = side * side
        q, k, v = (leaf(clips * pixels, heads, frames, dim_head) for _ in range(3))
        # forward: two matmuls of 2*n*m*d each; backward: twice that (no recomputation counted)
        flops = 3 * 4 * clips * pixels * heads * frames * frames * dim_head
        summary[side] = compare(f"temporal attention, {side}x{side}: {clips * pixels} x {heads} heads x "
                                f"{frames} tokens x {dim_head}", attention_variants(q, k, v), (q, k, v),
                                device, args.repeats, dtype, flops)
        q = leaf(clips * frames, heads, pixels, dim_head)
        k, v = (leaf(clips * frames, heads, pixels + 4, dim_head) for _ in range(2))
        flops = 3 * 4 * clips * frames * heads * pixels * (pixels + 4) * dim_head
        compare(f"spatial attention, {side}x{side}: {clips * frames} x {heads} heads x {pixels} queries x "
                f"{pixels + 4} keys", attention_variants(q, k, v), (q, k, v), device, args.repeats, dtype, flops)
    for side, dim in ((64, 128), (32, 256), (16, 384), (8, 512)):  # frozen in video mode: input gradients only
        x = leaf(clips * frames, dim, side, side).detach().to(memory_format=torch.channels_last).requires_grad_()
        weight = leaf(dim, dim, 3, 3).detach().to(memory_format=torch.channels_last)
        flops = 2 * 2 * clips * frames * side * side * dim * dim * 9
        compare(f"frozen spatial 3x3 conv, {side}x{side}, {dim} channels, channels_last",
                {"conv2d": lambda x=x, weight=weight: F.conv2d(x, weight, padding=1)}, (x,), device, args.repeats,
                dtype, flops)
    for side, dim in ((64, 128), (32, 256)):
        x = leaf(clips * frames, dim, side, side).detach().to(memory_format=torch.channels_last).requires_grad_()
        weight, bias = leaf(dim, dim, 3), leaf(dim)
        flops = 3 * 2 * clips * frames * side * side * dim * dim * 3
        compare(f"temporal conv, {side}x{side}, {dim} channels, channels_last", conv_variants(x, weight, bias, frames),
                (x, weight, bias), device, args.repeats, dtype, flops)
    times = summary[32]
    fastest, slowest = min(times, key=times.get), max(times, key=times.get)
    print(f"temporal attention 32x32: {slowest} / {fastest} = {times[slowest] / times[fastest]:.1f}x")


if __name__ == "__main__":
    main()
