"""Score sets of video files: clip selection, decoding in threads, batching by frame size.

Plain library code (no Prefect, no MLflow): the evaluate flow and the protocols call it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from eval.clipsim import CLIPSIM, CLIPSIMResult
from eval.fvd import FrechetVideoDistance, FVDResult
from eval.i3d import MIN_FRAMES, I3DDetector
from eval.inception_score import ISResult, VideoInceptionScore
from eval.video_io import VideoTooShort, count_frames, read_video


@dataclass(frozen=True)
class ClipSpec:
    """Which frames of each video are scored: `length` frames, every `stride`-th, from
    offset 0 or (random_offset) one random offset per video, as StyleGAN-V does for real videos."""
    length: int = 16
    stride: int = 1
    random_offset: bool = False
    seed: int = 0

    @property
    def span(self) -> int:
        return (self.length - 1) * self.stride + 1


def read_clip(path: str | Path, spec: ClipSpec, index: int = 0) -> np.ndarray:
    """One clip of a video as uint8 [T,H,W,3]; a clear error when the video is too short."""
    offset = 0
    if spec.random_offset:
        total = count_frames(path)
        if total < spec.span:
            raise VideoTooShort(f"{path}: {total} frames, shorter than one clip ({spec.length} frames, "
                                f"stride {spec.stride})")
        # one generator per (seed, video index): the choice does not depend on thread timing
        offset = int(np.random.default_rng([spec.seed, index]).integers(0, total - spec.span + 1))
    try:
        return read_video(path, spec.length, spec.stride, offset)
    except VideoTooShort:
        if offset == 0:
            raise
        return read_video(path, spec.length, spec.stride, 0)  # container over-reported its frame count


def iter_clips(paths: Sequence[str | Path], spec: ClipSpec, workers: int = 2) -> Iterator[tuple[str, np.ndarray]]:
    """(path, clip) in order; decoding runs ahead in threads (PyAV releases the GIL)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, clip in zip(paths, pool.map(lambda a: read_clip(a[1], spec, a[0]), enumerate(paths))):
            yield str(path), clip


def batches_by_shape(items: Iterator[tuple[str, np.ndarray]], batch_size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Group consecutive clips of one shape into uint8 batches (videos of other sizes start a
    new batch, so every clip is resized straight from its own size, as the reference does)."""
    names: list[str] = []
    clips: list[np.ndarray] = []
    for name, clip in items:
        if clips and (clip.shape != clips[0].shape or len(clips) == batch_size):
            yield names, torch.from_numpy(np.stack(clips))
            names, clips = [], []
        names.append(name)
        clips.append(clip)
    if clips:
        yield names, torch.from_numpy(np.stack(clips))


def fvd_of_files(real: Sequence[str | Path], fake: Sequence[str | Path], detector: I3DDetector,
                 real_spec: ClipSpec, fake_spec: ClipSpec, batch_size: int = 16, num_resamples: int = 100,
                 unbiased: bool = False, keep_clips: list | None = None, max_keep: int = 16) -> FVDResult:
    """FVD between two lists of video files (one clip per video); the first `max_keep` fake
    clips are appended to `keep_clips` (for pictures) when a list is given."""
    if real_spec.length != fake_spec.length:
        raise ValueError(f"real and fake clips must have one length, got {real_spec.length} and {fake_spec.length}")
    if real_spec.length < MIN_FRAMES:  # before any decoding
        raise ValueError(f"clip length {real_spec.length} is below {MIN_FRAMES}, the shortest clip I3D accepts")
    metric = FrechetVideoDistance(detector, unbiased=unbiased, clip_stride=real_spec.stride).to(detector.device)
    for is_real, paths, spec in ((True, real, real_spec), (False, fake, fake_spec)):
        if len(paths) < 2:
            raise ValueError(f"FVD needs at least 2 {'real' if is_real else 'fake'} videos, got {len(paths)}")
        for names, batch in batches_by_shape(iter_clips(paths, spec), batch_size):
            metric.update(batch, real=is_real, names=names)
            if keep_clips is not None and not is_real and len(keep_clips) < max_keep:
                keep_clips.extend(batch.unbind(0)[: max_keep - len(keep_clips)])
    return metric.result(num_resamples=num_resamples)


def clipsim_of_files(paths: Sequence[str | Path], prompts: Sequence[str], metric: CLIPSIM, spec: ClipSpec,
                     num_resamples: int = 1000) -> CLIPSIMResult:
    if len(paths) != len(prompts):
        raise ValueError(f"CLIPSIM: {len(paths)} videos but {len(prompts)} prompts")
    # CLIPSIM scores every frame, so any length works (no 9-frame minimum)
    spec = ClipSpec(max(spec.length, 1), spec.stride, spec.random_offset, spec.seed)
    for (path, clip), prompt in zip(iter_clips(paths, spec), prompts):
        metric.update([torch.from_numpy(clip)], [prompt], names=[path])
    return metric.result(num_resamples=num_resamples)


def inception_score_of_files(paths: Sequence[str | Path], metric: VideoInceptionScore, spec: ClipSpec,
                             batch_size: int = 16) -> ISResult:
    """Video IS (C3D) of one clip per video file."""
    for _, batch in batches_by_shape(iter_clips(paths, spec), batch_size):
        metric.update(batch)
    return metric.result()
