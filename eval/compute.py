"""Score sets of video files: clip selection, decoding in threads, batching by frame size.

Plain library code (no Prefect, no MLflow): the evaluate flow and the protocols call it.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import torch

from eval.clipsim import CLIPSIM
from eval.fvd import FrechetVideoDistance
from eval.i3d import MIN_FRAMES
from eval.inception_score import VideoInceptionScore
from eval.sheets import GRID_TILE, fit_square
from eval.video_io import VideoTooShort, count_frames, read_video, read_whole_video, read_whole_video_and_head

Clip = Union[np.ndarray, tuple[np.ndarray, ...]]  # a clip, or (a whole video, its clip) for CLIPSIM and FVD


@dataclass(frozen=True)
class ClipSpec:
    """Which frames of each video are scored: `length` frames, every `stride`-th, from
    offset 0 or (random_offset) one random offset per video, as StyleGAN-V does for real videos.
    fps None: frames as decoded, whatever the video's rate (as the references); fps F: of the video
    resampled in time to F frames a second (eval.video_io.on_screen), so that clips of real and fake
    videos made at other rates span the same time. from_keyframe: the videos are ingest clips (a
    constant rate by construction), so without fps a clip is decoded from the keyframe before it
    (models.video_io.read_window) rather than from the video's start."""
    length: int = 16
    stride: int = 1
    random_offset: bool = False
    seed: int = 0
    fps: float | None = None
    from_keyframe: bool = False

    def __post_init__(self) -> None:
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"clip fps must be > 0, got {self.fps}")

    @property
    def span(self) -> int:
        return (self.length - 1) * self.stride + 1

    def too_short(self, path: str | Path, frames: int) -> VideoTooShort:
        at = f" at {self.fps:g} fps" if self.fps is not None else ""
        return VideoTooShort(f"{path}: {frames} frames{at}, shorter than one clip ({self.length} frames, "
                             f"stride {self.stride})")


def read_clip(path: str | Path, spec: ClipSpec | None, index: int = 0) -> np.ndarray:
    """One clip of a video (spec None: all of it) as uint8 [T,H,W,3]; a clear error when the
    video is too short."""
    if spec is None:
        return read_whole_video(path)
    offset = 0
    if spec.random_offset:
        total = count_frames(path, fps=spec.fps)
        if total < spec.span:
            raise spec.too_short(path, total)
        # one generator per (seed, video index): the choice does not depend on thread timing
        offset = int(np.random.default_rng([spec.seed, index]).integers(0, total - spec.span + 1))
    try:
        return read_video(path, spec.length, spec.stride, offset, spec.fps, spec.from_keyframe)
    except VideoTooShort:
        if offset == 0:
            raise
        # container over-reported its length
        return read_video(path, spec.length, spec.stride, 0, spec.fps, spec.from_keyframe)


def read_whole_and_head(path: str | Path, spec: ClipSpec, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every frame of a video (CLIPSIM's) and its first `spec.span` frames at spec.fps, or fewer where
    it is shorter (its clip at offset 0 is taken from them), decoded once."""
    return read_whole_video_and_head(path, spec.span, spec.fps)


def iter_clips(paths: Sequence[str | Path], spec: ClipSpec, workers: int | None = None,
               ahead: int | None = None, read: Callable[..., Clip] | None = None) -> Iterator[tuple[str, Clip]]:
    """(path, clip) in order, each from read(path, spec, index) (default read_clip); decoding runs
    ahead in threads (PyAV releases the GIL), at most `ahead` clips (default 2 per thread) beyond
    the one consumed, so a slow consumer holds only that many decoded clips in memory
    (Executor.map would decode every file into memory)."""
    workers = workers or min(8, os.cpu_count() or 2)
    read = read or read_clip
    ahead = ahead or 2 * workers
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for index, path in enumerate(paths):
                pending.append((path, pool.submit(read, path, spec, index)))
                if len(pending) > ahead:
                    path, clip = pending.popleft()
                    yield str(path), clip.result()
            while pending:
                path, clip = pending.popleft()
                yield str(path), clip.result()
        finally:  # an error or an early stop: do not decode the rest
            for _, clip in pending:
                clip.cancel()


def batches_by_shape(items: Iterator[tuple[str, Clip]], batch_size: int) \
        -> Iterator[tuple[list[str], torch.Tensor | tuple[torch.Tensor, ...]]]:
    """Group consecutive clips of one shape into uint8 batches (videos of other sizes start a
    new batch, so every clip is resized straight from its own size, as the reference does).
    Tuples of arrays (a whole video and its clip) are grouped by all their shapes and stacked apiece."""
    names: list[str] = []
    clips: list[Clip] = []
    for name, clip in items:
        if clips and (_shapes(clip) != _shapes(clips[0]) or len(clips) == batch_size):
            yield names, _stack(clips)
            names, clips = [], []
        names.append(name)
        clips.append(clip)
    if clips:
        yield names, _stack(clips)


def _shapes(clip: Clip) -> tuple:
    return tuple(part.shape for part in clip) if isinstance(clip, tuple) else clip.shape


def _stack(clips: list[Clip]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    if isinstance(clips[0], tuple):
        return tuple(torch.from_numpy(np.stack(parts)) for parts in zip(*clips))
    return torch.from_numpy(np.stack(clips))


def score_files(fake: Sequence[str | Path], fake_spec: ClipSpec, *, fvd: FrechetVideoDistance | None = None,
                real: Sequence[str | Path] = (), real_spec: ClipSpec | None = None, clipsim: CLIPSIM | None = None,
                prompts: Sequence[str] | None = None, inception: VideoInceptionScore | None = None,
                batch_size: int = 16, keep_clips: list | None = None, max_keep: int = 16) -> None:
    """Feed the metrics given (read their result() afterwards): the real videos are decoded once,
    for FVD, and the fake ones once for all of them (CLIPSIM gets every frame, FVD and IS the
    clip `fake_spec` takes from the start, at its fps if set), batch by batch (decoding a large sample set,
    not the networks, is the slow part on a GPU). The first `max_keep` fake clips are appended to
    `keep_clips` (for pictures) when a list is given. Every input is checked before any decoding."""
    if fvd is not None:
        real_spec = real_spec or fake_spec
        if real_spec.length != fake_spec.length:
            raise ValueError(f"real and fake clips must have one length, got {real_spec.length} and {fake_spec.length}")
        if real_spec.length < MIN_FRAMES:
            raise ValueError(f"clip length {real_spec.length} is below {MIN_FRAMES}, the shortest clip I3D accepts")
        for kind, paths in (("real", real), ("fake", fake)):
            if len(paths) < 2:
                raise ValueError(f"FVD needs at least 2 {kind} videos, got {len(paths)}")
    if clipsim is not None and (prompts is None or len(prompts) != len(fake)):
        raise ValueError(f"CLIPSIM: {len(fake)} videos but {0 if prompts is None else len(prompts)} prompts")
    if clipsim is not None and fake_spec.random_offset:  # fake clips come from whole videos, at offset 0
        raise ValueError("CLIPSIM scores whole fake videos; their FVD clips start at offset 0")
    if inception is not None and fake_spec.length != 16:
        raise ValueError(f"inception score: C3D takes 16-frame clips, got a clip length of {fake_spec.length}")
    if fvd is not None:
        for names, batch in batches_by_shape(iter_clips(real, real_spec), batch_size):
            fvd.update(batch, real=True, names=names)
    done = 0
    whole = clipsim is not None  # CLIPSIM scores every frame of a fake video, FVD and IS a clip of it
    read = read_whole_and_head if whole else read_clip
    for names, batch in batches_by_shape(iter_clips(fake, fake_spec, read=read), batch_size):
        video, head = batch if whole else (None, batch)
        clip = head[:, :: fake_spec.stride].contiguous() if whole else batch  # (offset 0)
        if clip.shape[1] < fake_spec.length and (fvd is not None or inception is not None):
            raise fake_spec.too_short(names[0], head.shape[1])
        if fvd is not None:
            fvd.update(clip, real=False, names=names)
        if clipsim is not None:
            clipsim.update(video, prompts[done: done + len(names)], names=names)
        if inception is not None:
            inception.update(clip)
        if keep_clips is not None and len(keep_clips) < max_keep:  # at the pictures' size, not the videos'
            keep_clips.extend(fit_square(c, GRID_TILE) for c in clip.unbind(0)[: max_keep - len(keep_clips)])
        done += len(names)
