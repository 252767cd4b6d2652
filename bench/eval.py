"""FVD throughput: batched I3D + float64 sum statistics + eigh Fréchet distance, beside a naive loop.

    python bench/eval.py --device cuda            # 2048 + 2048 clips of 16x224x224 (random uint8 made on the GPU)
    python bench/eval.py --device cpu --n 24      # CPU: a smaller N

The naive loop is what many repos do: one clip at a time, a resize call per frame,
float32, features to numpy, np.cov + scipy.linalg.sqrtm. It runs on `--naive-n`
clips and is extrapolated to N + N (its per-clip cost is flat). Random weights:
the timing does not depend on them. The batched path runs in float32 too unless --amp
bf16 (the flow's option). The LAST line is the speed-up ratio.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.fvd import FrechetVideoDistance  # noqa: E402
from eval.i3d import load_i3d  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_clips(n, t, size, device, gen):
    return torch.randint(0, 256, (n, t, size, size, 3), dtype=torch.uint8, device=device, generator=gen)


def fast_fvd(detector, n, t, size, batch, device, seed=0):
    """End to end: make clips on the device, features, float64 states, Fréchet distance."""
    gen = torch.Generator(device=device).manual_seed(seed)
    metric = FrechetVideoDistance(detector, keep_features=False).to(device)
    sync(device)
    start = time.perf_counter()
    for real in (True, False):
        for i in range(0, n, batch):
            metric.update(random_clips(min(batch, n - i), t, size, device, gen), real=real)
    value = float(metric.compute())
    sync(device)
    return time.perf_counter() - start, value


def naive_features(net, clips, device):
    feats = []
    for clip in clips:  # one clip at a time
        frames = [F.interpolate(f.permute(2, 0, 1)[None].float(), size=(224, 224), mode="bilinear",
                                align_corners=False)[0] for f in clip]  # one resize call per frame
        x = torch.stack(frames, dim=1)[None] / 127.5 - 1
        with torch.no_grad():
            feats.append(net(x.to(device)).cpu().numpy())
    sync(device)
    return np.concatenate(feats)


def naive_frechet(a, b):
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False, bias=True), np.cov(b, rowvar=False, bias=True)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean  # older scipy returned (sqrtm, err)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=None, help="clips per set (default 2048 on cuda, 16 on cpu)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224, help="frame size of the generated clips")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="the batched path's precision; none (float32) is what mav evaluate uses by default, "
                        "and what the naive loop runs, so the ratio compares like with like")
    p.add_argument("--naive-n", type=int, default=None, help="clips for the naive loop (default 32 cuda / 2 cpu)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (2048 if cuda else 16)
    batch = args.batch_size or (64 if cuda else 4)
    amp = args.amp
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    naive_n = args.naive_n or (32 if cuda else 2)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # statistics stay exact; convs use amp_dtype
    name = torch.cuda.get_device_name(device) if cuda else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {name}; N={n}+{n} clips of {args.frames}x{args.size}x{args.size}; batch {batch}; amp {amp}")

    detector = load_i3d(device=device, batch_size=batch, amp_dtype=amp_dtype, channels_last=cuda)
    exact = load_i3d(device=device, batch_size=batch)  # fp32 reference for the accuracy check
    gen = torch.Generator(device=device).manual_seed(1)
    warm = random_clips(batch, args.frames, args.size, device, gen)
    for _ in range(2):  # cudnn autotune (per shape: the full batch) + lazy init out of the timings
        detector(warm), exact(warm)
    if amp_dtype is not None:
        a, b = detector(warm).double(), exact(warm).double()
        print(f"feature error of {amp} vs fp32: {float((a - b).norm() / b.norm()):.2e} (relative, Frobenius)")

    # fast path: I3D alone, then the whole FVD
    clips = random_clips(batch, args.frames, args.size, device, gen)
    reps = max(1, min(8, n // batch))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        detector(clips)
    sync(device)
    fast_fps = reps * batch / (time.perf_counter() - t0)
    print(f"batched I3D: {fast_fps:.1f} clips/s")
    fast_total, value = fast_fvd(detector, n, args.frames, args.size, batch, device)
    print(f"batched FVD over {n}+{n} clips: {fast_total:.2f} s end to end (fvd {value:.3f}, smoke: random weights)")

    # naive path on a few clips, extrapolated
    naive_clips = random_clips(naive_n, args.frames, args.size, device, gen)
    naive_features(exact.net, naive_clips[:1], device)  # warm-up
    t0 = time.perf_counter()
    feats = naive_features(exact.net, naive_clips, device)
    naive_per_clip = (time.perf_counter() - t0) / naive_n
    # sqrtm on realistic covariances: features of 2 x (>= 401) clips are cheap to fake from real ones
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(max(len(feats), 2), 600)) / np.sqrt(len(feats))
    fa = (feats.T @ mix[: len(feats)]).T + rng.normal(size=(600, 400)) * 0.1
    fb = fa + rng.normal(size=fa.shape) * 0.2
    t0 = time.perf_counter()
    naive_frechet(fa, fb)
    sqrtm_s = time.perf_counter() - t0
    naive_total = naive_per_clip * 2 * n + sqrtm_s
    print(f"naive loop: {1 / naive_per_clip:.1f} clips/s; FVD over {n}+{n} clips ~ {naive_total:.2f} s "
          f"(extrapolated from {naive_n} clips; sqrtm {sqrtm_s:.2f} s)")
    print(f"speed-up (naive / batched, FVD end to end): {naive_total / fast_total:.1f}x")


if __name__ == "__main__":
    main()
