"""Read and write video: decode clips (path or bytes) with PyAV, write mp4 (libx264) and gif with ffmpeg."""
from __future__ import annotations

import io
import math
import signal
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch

from data_prep.atomic import replacing
from data_prep.ffmpeg_bin import ffmpeg_exe
from data_prep.probe import main_video_stream


class VideoWriteError(OSError):
    """ffmpeg could not write a video (a full disk, a file size limit): an OSError, as a failed write
    of any other file is, so callers that report write errors report this one too."""


class TooFewFrames(ValueError):
    def __init__(self, available: int, asked: int):
        super().__init__(f"video has only {available} frames, frame {asked} was asked for")
        self.available = available


class VideoReader:
    """A video's main stream (a path or bytes), decoded in order: `frames()` gives PyAV frames, `rgb()`
    turns one into upright RGB (phone videos carry a rotation) and checks it has the earlier frames' size."""

    def __init__(self, src: str | Path | bytes, threads: bool = True):
        self.container = av.open(io.BytesIO(src) if isinstance(src, bytes) else str(src))
        self.stream = main_video_stream(self.container)
        if self.stream is None:
            self.container.close()
            raise ValueError("no video stream")
        if threads:
            self.stream.thread_type = "AUTO"
        else:  # DataLoader workers decode side by side: a thread pool per clip cost 20-40 % more CPU there
            self.stream.thread_type, self.stream.thread_count = "NONE", 1
        self.fps = float(self.stream.average_rate or self.stream.guessed_rate or 0) or 25.0
        self._shape: tuple | None = None

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.container.close()

    def frames(self) -> Iterator[av.VideoFrame]:
        return self.container.decode(self.stream)

    def seek_frames(self, indices: list[int]) -> dict[int, np.ndarray] | None:
        """RGB frames at `indices` (ascending), decoded from the keyframe before the first; None where
        timestamps do not number the frames (frame i at start + i frame durations)."""
        stream = self.stream
        # constant rate: the rate that every timestamp fits (ffmpeg's r_frame_rate) is the average one
        if not (stream.average_rate and stream.time_base) or stream.start_time is None \
                or stream.guessed_rate != stream.average_rate:
            return None
        ticks = 1 / (Fraction(stream.average_rate) * Fraction(stream.time_base))  # of a frame
        first, last = indices[0], indices[-1]
        self.container.seek(stream.start_time + math.floor(first * ticks), stream=stream, backward=True,
                            any_frame=False)
        wanted, found, expected = set(indices), {}, None
        for frame in self.frames():
            position = None if frame.pts is None else (frame.pts - stream.start_time) / ticks
            if position is None or abs(position - round(position)) > 0.25:
                return None
            i = round(position)
            # the seek landed at or before the first wanted frame, and each frame follows the last
            if i > first if expected is None else i != expected:
                return None
            expected = i + 1
            if i in wanted:
                found[i] = self.rgb(frame, i)
            if i >= last:
                break
        return found if len(found) == len(wanted) else None

    def rgb(self, frame: av.VideoFrame, index: int) -> np.ndarray:
        rgb = frame.to_ndarray(format="rgb24")
        k = round(frame.rotation or 0) // 90 % 4  # ffmpeg's angle is counter-clockwise, like np.rot90's k
        if k:
            rgb = np.ascontiguousarray(np.rot90(rgb, k))
        if self._shape is not None and rgb.shape != self._shape:
            raise ValueError(f"frame {index} is {rgb.shape[1]}x{rgb.shape[0]} but earlier frames are "
                             f"{self._shape[1]}x{self._shape[0]} (mixed frame sizes in one video)")
        self._shape = rgb.shape
        return rgb


def read_window(src: str | Path | bytes, indices: list[int]) -> np.ndarray:
    """Frames at `indices` (ascending) of a clip the ingest wrote -> uint8 [T,H,W,3], decoding from the
    keyframe before the first rather than from the start (a training window is a few frames somewhere in
    a clip of up to 10 s). Seeking needs frame numbers from timestamps, so a constant rate, which ingest
    clips have by construction; where a stream's header or any frame decoded shows otherwise, the frames
    come from read_frames, which counts them as decoded. (A file whose rate changed and changed back
    before the window could pass those checks: hence for ingest clips.) One decoder thread: its callers
    decode many clips side by side (DataLoader workers, evaluation's threads)."""
    with VideoReader(src, threads=False) as video:
        frames = video.seek_frames(indices)
    return np.stack([frames[i] for i in indices]) if frames is not None else read_frames(src, indices, threads=False)[0]


def frame_time(frame: av.VideoFrame) -> Fraction | None:
    """A decoded frame's presentation time in seconds, exact (None where it has no timestamp)."""
    if frame.pts is None or frame.time_base is None:
        return None
    return frame.pts * Fraction(frame.time_base)


def read_frames(src: str | Path | bytes, indices: list[int] | None = None,
                threads: bool = True) -> tuple[np.ndarray, float]:
    """Decode frames (all, or those at `indices` in decode order) -> (uint8 [T,H,W,3] upright, fps).

    Frames come out in their display orientation (phone videos carry a rotation). Raises
    ValueError if the file has fewer frames than asked for or changes frame size mid-stream.
    `threads`: PyAV's decoder threads (off in DataLoader workers, which run side by side)."""
    wanted = None if indices is None else set(indices)
    last = None if indices is None else max(indices, default=-1)
    frames: dict[int, np.ndarray] = {}
    with VideoReader(src, threads) as video:
        decoded = 0
        for i, frame in enumerate(video.frames()):
            decoded = i + 1
            if wanted is None or i in wanted:
                frames[i] = video.rgb(frame, i)
            if last is not None and i >= last:  # stop decoding once the last wanted frame is in
                break
        fps = video.fps
    if indices is None:
        return (np.stack([frames[i] for i in sorted(frames)]) if frames else np.zeros((0, 0, 0, 3), np.uint8)), fps
    missing = sorted(wanted - frames.keys())
    if missing:
        raise TooFewFrames(decoded, missing[0])
    return np.stack([frames[i] for i in indices]), fps


def _as_uint8(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError("frames must be uint8 [T,H,W,3]")
    return frames


def write_mp4(frames, path: str | Path, fps: float = 8.0, crf: int = 18) -> Path:
    """uint8 [T,H,W,3] -> H.264 mp4 (yuv420p: sizes are padded to even numbers).

    ffmpeg's libx264, not PyAV's: inside a process that had sampled, PyAV's encoder wrote other
    bytes for the same frames from call to call (up to 12 grey levels apart once decoded), so the
    same chain and seed gave different files."""
    frames = _as_uint8(frames)
    t, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return _ffmpeg_from_frames(frames, path, fps, ["-c:v", "libx264", "-crf", str(crf), "-pix_fmt", "yuv420p",
                                                   "-f", "mp4"])


def write_gif(frames, path: str | Path, fps: float = 8.0) -> Path:
    """uint8 [T,H,W,3] -> animated gif with a 256-colour palette made for this video (ffmpeg's
    palettegen + paletteuse; a fixed 3-3-2 palette keeps only 8 x 8 x 4 levels)."""
    return _ffmpeg_from_frames(_as_uint8(frames), path, fps, [
        "-filter_complex", "split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse", "-loop", "0", "-f", "gif"])


def _ffmpeg_from_frames(frames: np.ndarray, path: str | Path, fps: float, output_args: list[str]) -> Path:
    """RGB frames piped raw into ffmpeg, which writes `path` (through a temp file beside it)."""
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1000)
    with replacing(path) as temp:
        command = [ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                   "-s", f"{frames.shape[2]}x{frames.shape[1]}", "-framerate", f"{rate.numerator}/{rate.denominator}",
                   "-i", "pipe:", *output_args, str(temp)]
        done = subprocess.run(command, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
        if done.returncode != 0:
            raise VideoWriteError(f"writing {path}: ffmpeg failed: {_ffmpeg_failure(done)}")
    return path


def _ffmpeg_failure(done: subprocess.CompletedProcess) -> str:
    """What ffmpeg said, else how it ended (a signal leaves stderr empty: SIGXFSZ at a file size limit)."""
    said = done.stderr.decode(errors="replace").strip()[-500:]
    if said:
        return said
    if done.returncode < 0:
        try:
            return f"killed by {signal.Signals(-done.returncode).name}"
        except ValueError:
            return f"killed by signal {-done.returncode}"
    return f"exit status {done.returncode}"
