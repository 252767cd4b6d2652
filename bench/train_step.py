"""Training-step throughput per stage: samples/s, model FLOPs per step, MFU on CUDA.

    python bench/train_step.py --size base --device cuda      # GPU host, < 3 min on an H100
    python bench/train_step.py --size tiny --device cpu

Random batches of each stage's training shape (no data loading), bf16 autocast on
CUDA, forward + backward + AdamW step. Model FLOPs as training logs them (models.flops:
the net's forward and the backward its trained parameters need, counted on the meta device
from the first step's shapes, attention as matmuls), so MFU never counts the forward that
gradient checkpointing repeats. CLIP is the tiny local one (no downloads): its cost and the
embedding width (16 vs 512/768) are a negligible part of each stage's FLOPs.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
import sys  # noqa: E402

sys.path.insert(0, str(ROOT))
from models.config import STAGES, load_config, parse_overrides  # noqa: E402
from models.flops import StepFlops, peak_bf16  # noqa: E402
from models.stages import build_stage  # noqa: E402



def random_batch(cfg, device):
    b, s = cfg.data.batch_size, cfg.data.size
    shape = (b, 3, cfg.data.frames, s, s) if cfg.video else (b, 3, s, s)
    key = "video" if cfg.video else "image"
    return {key: torch.rand(shape, device=device) * 2 - 1, "fps": torch.full((b,), 8.0, device=device),
            "caption": ["a person riding a horse on the beach"] * b}


def step(module, opt, batch, device):
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        x0, cond = module.conditioning(batch)
        loss = module.diffusion.loss(lambda x, t: module.denoise(x, t, cond), x0)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_stage(size, stage, device, steps, warmup, batch_size=None, compile_net=False, channels_last=None,
                grad_checkpoint=None, profile=None, settings=(), heuristic_layout=False):
    overrides = {"clip": "tiny", "trainer.compile": compile_net, **parse_overrides(settings)}
    if channels_last is not None:
        overrides["trainer.channels_last"] = channels_last
    if stage != "prior" and grad_checkpoint is not None:
        overrides["unet.grad_checkpoint"] = grad_checkpoint
    if batch_size:
        overrides["data.batch_size"] = batch_size
    cfg = load_config(ROOT / "configs" / size / f"{stage}.yaml", overrides)
    module = build_stage(cfg).to(device).train()
    step_flops = StepFlops(module.net)  # as training counts them: from the first step's shapes
    module.configure_model()  # channels_last and compile, as training does
    if heuristic_layout and compile_net and hasattr(module.net, "compile_blocks"):
        module.net.compile_blocks(channels_last=False)  # compiling is lazy: these replace the forced-layout ones
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    batch = random_batch(cfg, device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(module, opt, batch, device)
    sync(device)
    warmup_s = time.perf_counter() - t0
    print(f"# {stage}: warm-up {warmup_s:.1f} s", flush=True)  # (a run cut short by a timeout keeps these)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(module, opt, batch, device)
    last_loss = loss.item()
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    if not math.isfinite(last_loss):  # a kernel that computes garbage fast is not a speed-up
        raise SystemExit(f"{stage}: the training loss is {last_loss} after {warmup + steps} steps")
    flops = step_flops.per_sample() * cfg.data.batch_size
    print(f"# {stage}: {dt:.3f} s/step, {flops / dt / 1e12:.1f} TFLOP/s", flush=True)
    if profile:
        write_profile(module, opt, batch, device, Path(profile))
    params = sum(p.numel() for p in module.net.parameters()) / 1e6
    trainable = sum(p.numel() for p in module.net.parameters() if p.requires_grad) / 1e6
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del module, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return dict(stage=f"{stage}({cfg.mode})", batch=cfg.data.batch_size, params=params, trainable=trainable,
                step_s=dt, samples_s=cfg.data.batch_size / dt, tflop_step=flops / 1e12, achieved=flops / dt, mem=mem,
                warmup_s=warmup_s)


def write_profile(module, opt, batch, device, path: Path):
    """Two steps by device time, for deciding what to optimise next: by kernel, then by op and
    input shapes (which tensors the copies move)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(2):
            step(module, opt, batch, device)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90) + "\n\n" +
                    prof.key_averages(group_by_input_shape=True).table(
                        sort_by=key, row_limit=40, max_name_column_width=60, max_shapes_column_width=110))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny", choices=["tiny", "base", "large"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stages", nargs="*", default=list(STAGES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="override each config's batch size")
    ap.add_argument("--compile", action="store_true", help="torch.compile the net, as trainer.compile does")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default: the config's")
    ap.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction,
                    help="recompute U-Net blocks in backward (larger batches); default: the config's")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    ap.add_argument("--profile", metavar="FILE", help="write the top kernels of two steps (last stage) to FILE")
    ap.add_argument("--heuristic-layout", action="store_true",
                    help="with --compile: inductor's own channels_last choice per block, as before 2026-11-28 "
                         "(an A/B of the forced layout that training uses)")
    args = ap.parse_args()
    device = torch.device(args.device)
    peak = None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once
        name = torch.cuda.get_device_name()
        peak = peak_bf16(device)
        print(f"device: {name}, bf16 dense peak: {peak / 1e12 if peak else 'unknown'} TFLOPs")
    print(f"{'stage':22s} {'batch':>5s} {'params M':>9s} {'train M':>8s} {'s/step':>8s} {'samples/s':>10s} "
          f"{'TFLOP/step':>11s} {'TFLOP/s':>8s} {'MFU':>6s} {'mem GiB':>8s} {'warmup s':>8s}")
    for stage in args.stages:
        profile = args.profile if stage == args.stages[-1] else None
        r = bench_stage(args.size, stage, device, args.steps, args.warmup, args.batch_size, args.compile,
                        args.channels_last, args.grad_checkpoint, profile, args.set, args.heuristic_layout)
        mfu = f"{r['achieved'] / peak:6.1%}" if peak else "   n/a"
        print(f"{r['stage']:22s} {r['batch']:5d} {r['params']:9.1f} {r['trainable']:8.1f} {r['step_s']:8.3f} "
              f"{r['samples_s']:10.2f} {r['tflop_step']:11.3f} {r['achieved'] / 1e12:8.2f} {mfu} {r['mem']:8.1f} "
              f"{r['warmup_s']:8.1f}",
              flush=True)
    # the ratio to the physical floor (the card's bf16 peak), last
    print(f"{r['stage']} MFU: {r['achieved'] / peak:.1%} of the {peak / 1e12:.0f} TFLOP/s bf16 peak" if peak
          else f"{r['stage']}: {r['samples_s']:.2f} samples/s (no peak known for {device.type}: no MFU)")


if __name__ == "__main__":
    main()
