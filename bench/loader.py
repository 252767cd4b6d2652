"""Training-data decode cost: a random window of an ingest clip, read from its keyframe or from the start.

(a) from the start: clips cut with x264's own keyframe interval (250 frames, `clips.keyframe_every:
    250`, what ingest wrote before), each window decoded from the clip's first frame with PyAV's
    threads (read_frames: how a loader that has no frame numbers for a seek reads a window)
(b) ours:           clips cut with the default `keyframe_every` (32), each window decoded from the
                    keyframe before it, one thread (read_window, models/data.py's ClipSampler)

Both cut the same corpus into the same clips; the same windows (the same seeds) are drawn from
each, by the base configs' ClipSampler: the video decoder (16 frames at a Beta-drawn stride, resized
to 64 px, plus the 224 px CLIP frame) and the image decoder (one frame). CPU seconds per sample in
one process (`time.process_time`, decoder threads included): a DataLoader's samples per second are
its cores over this. Each timing is the fastest of --repeats. Also printed: the clips' bytes.

    python bench/loader.py [--videos DIR] [--samples 300] [--repeats 3]
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep.clips import cut_source  # noqa: E402
from data_prep.config import VIDEO_EXTENSIONS, IngestConfig  # noqa: E402
from data_prep.probe import probe  # noqa: E402
from models.config import load_config  # noqa: E402
from models.data import ClipSampler  # noqa: E402
from models.video_io import read_frames, read_window  # noqa: E402


def cut_corpus(videos: Path, out: Path, keyframe_every: int) -> list[dict]:
    cfg = IngestConfig.model_validate({"clips": {"keyframe_every": keyframe_every}})
    rows = []
    for n, video in enumerate(sorted(p for p in videos.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)):
        result = cut_source(video, probe(video), f"{n:064d}", out, cfg)
        rows += [{**row, "path": out / row["clip_path"].split("/", 1)[1]} for row in result.clips]
    return rows


def from_the_start(src, indices: list[int]):
    return read_frames(src, indices)[0]


def cpu_per_sample(sampler, rows: list[dict], samples: int, repeats: int, reader) -> tuple[float, float]:
    """(CPU s per sample, of which decoding), the fastest of `repeats`; the sampler reads through `reader`."""
    spent = [0.0]

    def timed_reader(src, indices):
        start = time.process_time()
        try:
            return reader(src, indices)
        finally:
            spent[0] += time.process_time() - start

    sampler.read = timed_reader
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        rng, spent[0] = random.Random(0), 0.0
        start = time.process_time()
        for i in range(samples):
            row = rows[i % len(rows)]
            sampler(row["path"], row, rng)
        best = min(best, ((time.process_time() - start) / samples, spent[0] / samples))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, default=REPO.parent / "shared" / "data" / "videos")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.videos.is_dir():
        args.videos = REPO / "data" / "samples"
    with tempfile.TemporaryDirectory() as tmp:
        before = cut_corpus(args.videos, Path(tmp) / "keyframe_every_250", 250)
        ours = cut_corpus(args.videos, Path(tmp) / "keyframe_every_32", 32)
        assert [(r["num_frames"], r["fps"]) for r in before] == [(r["num_frames"], r["fps"]) for r in ours]
        size = {name: sum(r["path"].stat().st_size for r in rows) for name, rows in (("250", before), ("32", ours))}
        print(f"{len(ours)} clips of {args.videos}, {sum(r['num_frames'] for r in ours)} frames; bytes: "
              f"{size['250'] / 1e6:.1f} MB at keyframe_every 250, {size['32'] / 1e6:.1f} MB at 32 "
              f"(+{100 * (size['32'] / size['250'] - 1):.0f} %)")
        ratios = {}
        for mode in ("video", "image"):
            sampler = ClipSampler(load_config(REPO / "configs" / "base" / "decoder.yaml", {"mode": mode}))
            ours_s, ours_decode = cpu_per_sample(sampler, ours, args.samples, args.repeats, read_window)
            before_s, before_decode = cpu_per_sample(sampler, before, args.samples, args.repeats, from_the_start)
            ratios[mode] = before_s / ours_s
            print(f"decoder {mode:5s} sample, CPU ms (of which decoding) | from the start {1000 * before_s:5.1f} "
                  f"({1000 * before_decode:5.1f}) | ours {1000 * ours_s:5.1f} ({1000 * ours_decode:5.1f}) | "
                  f"{ratios[mode]:.2f}x ({before_decode / ours_decode:.2f}x decoding)")
    print(f"from the start / ours, CPU per sample: video {ratios['video']:.2f}x, image {ratios['image']:.2f}x")


if __name__ == "__main__":
    main()
