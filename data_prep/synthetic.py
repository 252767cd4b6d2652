"""Synthetic moving-shapes videos written in the ingest's dataset format (docs/dataset-format.md).

For tests and bench/learn.py: each clip is one coloured circle or square moving in a
straight line (bouncing off the walls) over a plain background, with a caption such
as "a red circle moving right". Deterministic for a given seed.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

# (not data_prep.clips: OpenCV, ffmpeg-python and PySceneDetect are the ingest's, and a GPU
# host running the training tests need not have them)
from data_prep.dataset import clip_id_for, commit_version

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
           "white": (240, 240, 240)}
BACKGROUNDS = [(20, 20, 30), (60, 60, 70), (30, 50, 40)]


def moving_shape_frames(rng: np.random.Generator, frames: int, size: int) -> tuple[np.ndarray, str]:
    """-> (uint8 [T,size,size,3], caption)."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = ["circle", "square"][rng.integers(2)]
    radius = size * rng.uniform(0.12, 0.22)
    pos = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * np.pi)
    vel = np.array([np.cos(angle), np.sin(angle)]) * size * rng.uniform(0.02, 0.05)
    direction = ("right" if vel[0] > 0 else "left") if abs(vel[0]) > abs(vel[1]) else ("down" if vel[1] > 0 else "up")
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    out = np.empty((frames, size, size, 3), np.uint8)
    out[:] = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    for t in range(frames):
        if shape == "circle":
            inside = (xx - pos[0]) ** 2 + (yy - pos[1]) ** 2 <= radius**2
        else:
            inside = (abs(xx - pos[0]) <= radius) & (abs(yy - pos[1]) <= radius)
        out[t][inside] = COLOURS[colour]
        pos = pos + vel
        for k in range(2):  # bounce
            if not radius <= pos[k] <= size - radius:
                vel[k] = -vel[k]
                pos[k] = np.clip(pos[k], radius, size - radius)
    return out, f"a {colour} {shape} moving {direction}"


def write_synthetic_dataset(data_root: str | Path, name: str = "synthetic", num_clips: int = 16, frames: int = 24,
                            size: int = 64, fps: float = 12.0, seed: int = 0, captions: bool = True,
                            clips_per_shard: int = 8) -> Path:
    """Write DATA_ROOT/datasets/NAME (clips, one version with manifest + shards, latest). -> dataset folder."""
    from models.video_io import write_mp4

    root = Path(data_root) / "datasets" / name
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_clips):
        video, caption = moving_shape_frames(rng, frames, size)
        source = f"synthetic://{name}/{seed}/{i}"
        source_sha = hashlib.sha256(source.encode()).hexdigest()
        clip_id = clip_id_for(source_sha, 0, frames, f"{size}:{fps}")
        write_mp4(video, root / "clips" / f"{clip_id}.mp4", fps=fps, crf=10)
        rows.append(dict(clip_id=clip_id, source=source, source_sha256=source_sha, start_frame=0, end_frame=frames,
                         start_s=0.0, end_s=frames / fps, fps=float(fps), num_frames=frames, width=size,
                         height=size, clip_path=f"clips/{clip_id}.mp4", caption=caption if captions else ""))
    # the ingest's own commit: same manifest, shards and dataset.json as real data
    commit_version(root, rows, [], {"synthetic": True, "frames": frames, "size": size, "fps": fps, "seed": seed},
                   shard_max_clips=clips_per_shard)
    return root
