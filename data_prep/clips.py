"""One decode pass per source: detect cuts on small frames and write the clips from the same frames.

ffmpeg (a separate process, so it runs beside Python on another core) decodes,
rotates to the display orientation, crops the centre square (unless crop: none) and
scales to the training size; we read raw I420 frames from its pipe (half the bytes of
RGB, and no colour conversion before the H.264 encoder), feed a half-size BGR copy to
the cut detector and a 16x16 copy of the luma to the dissolve detector, and route
the frames into one encoder process per clip. Frames wait in a delay line so that
cuts the detectors report late (a dissolve once it has ended), and trims around
them, still land on exact frame boundaries.
"""
from __future__ import annotations

import math
import subprocess
import tempfile
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import ffmpeg
import numpy as np

from data_prep.atomic import durable_replace, fsync_path
from data_prep.config import ClipConfig, IngestConfig
from data_prep.dataset import clip_id_for
from data_prep.ffmpeg_bin import ffmpeg_exe, writes_frame_stats
from data_prep.probe import Probe
from data_prep.scenes import CutDetector, DissolveDetector, dissolve_frame


class DecodeError(RuntimeError):
    pass


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Size with the short side at `short_side` (never upscaled), both even for H.264."""
    scale = min(1.0, short_side / min(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def frame_change(frame: np.ndarray, previous: np.ndarray | None, width: int, height: int) -> float:
    """Mean absolute luma difference (0-255) from the previous I420 frame: a clip's mean of it is its
    `motion`: 0 for a still image, 0.2 (a fixed camera, a hand moving a bottle) to 2.5 on data/samples
    at 256 px, 10 on the shared corpus' bikes.mp4 (a cyclist filmed from a moving car). (cv2.norm: 5 us
    at 256 px, no temporary array.)"""
    if previous is None:
        return 0.0
    pixels = width * height
    return cv2.norm(frame[:pixels], previous[:pixels], cv2.NORM_L1) / pixels


def detection_frame(frame: np.ndarray, width: int, height: int, detect_width: int) -> np.ndarray:
    """A half-size BGR frame from I420: luma subsampled 2x to match the chroma planes."""
    flat = frame.reshape(-1)
    quarter = width * height // 4
    luma = flat[: width * height].reshape(height, width)[::2, ::2]
    u = flat[width * height: width * height + quarter].reshape(height // 2, width // 2)
    v = flat[width * height + quarter:].reshape(height // 2, width // 2)
    bgr = cv2.cvtColor(cv2.merge([luma, u, v]), cv2.COLOR_YUV2BGR)
    if bgr.shape[1] > detect_width:
        bgr = cv2.resize(bgr, (detect_width, max(2, round(bgr.shape[0] * detect_width / bgr.shape[1]))),
                         interpolation=cv2.INTER_LINEAR)
    return bgr


# Every clip is limited-range BT.601 YUV, converted from whatever the source is (full-range
# phone video, BT.709 HD) and tagged so: untagged, a reader assumes exactly this anyway.
CLIP_COLOUR = {"color_range": "tv", "colorspace": "smpte170m"}


def decode_command(path: Path, width: int, height: int, square: bool = False, threads: int = 1,
                   interlaced: bool = False, anamorphic: bool = False, stream_index: int | None = None,
                   times: Path | None = None) -> list[str]:
    """Decode, deinterlace (if `interlaced`), rotate (ffmpeg's autorotate), make pixels square
    (if `anamorphic`), optionally crop the centre square (fewer pixels through the scaler and the
    pipe), scale to width x height and convert to the clips' colour (CLIP_COLOUR); pipe raw I420.
    With `times`, ffmpeg writes there each frame's time in seconds, a line per frame (DecodedTimes)."""
    stream = ffmpeg.input(str(path), threads=threads)["v:0" if stream_index is None else str(stream_index)]
    if interlaced:  # one frame per frame, from both fields; progressive frames pass through
        stream = stream.filter("bwdif", mode="send_frame", deint="interlaced")
    if anamorphic:  # to display proportions, or the crop and scale distort them
        stream = stream.filter("scale", "trunc(iw*sar/2)*2", "ih").filter("setsar", 1)
    if square:
        stream = stream.filter("crop", "min(iw,ih)", "min(iw,ih)")
    # in_range / in_color_matrix come from the frames (yuvj* formats and colour tags)
    stream = stream.filter("scale", width, height, flags="bilinear", out_range="tv", out_color_matrix="bt601")
    stats = {"stats_enc_pre": str(times), "stats_enc_pre_fmt": "{t}"} if times else {}
    out = stream.output("pipe:", format="rawvideo", pix_fmt="yuv420p", fps_mode="passthrough", **stats)
    return out.global_args("-v", "error", "-nostdin").compile(cmd=ffmpeg_exe())


class ClipWriter:
    """Encodes frames of one clip to a temporary mp4 (H.264, yuv420p, no audio).

    The encoder is an ffmpeg process fed raw I420 frames through a pipe: it runs beside
    Python on another core, where an in-process encoder would hold the GIL."""

    def __init__(self, directory: Path, width: int, height: int, fps: float, cfg: ClipConfig):
        self.path = directory / f".tmp-{uuid.uuid4().hex}.mp4"
        rate = _as_fraction(fps)
        raw = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="yuv420p", s=f"{width}x{height}",
                           framerate=f"{rate.numerator}/{rate.denominator}")
        out = raw.output(str(self.path), vcodec="libx264", preset=cfg.preset, crf=cfg.crf, g=cfg.keyframe_every,
                         pix_fmt="yuv420p", threads=1, an=None, movflags="+faststart", f="mp4", **CLIP_COLOUR)
        command = out.global_args("-v", "error", "-nostdin", "-y").compile(cmd=ffmpeg_exe())
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=self.stderr)
        self.count = 0

    def write(self, i420: np.ndarray) -> None:
        try:
            self.process.stdin.write(memoryview(i420).cast("B"))
        except BrokenPipeError:  # the encoder quit (its file cannot be written: no space, no permission)
            self.process.wait()
            raise self._failure() from None
        self.count += 1

    def finish(self) -> Path:
        self.process.stdin.close()
        if self.process.wait() != 0:
            raise self._failure()
        self.stderr.close()
        return self.path

    def _failure(self) -> DecodeError:
        """The encoder's own last word (a bare "Broken pipe" named nothing)."""
        self.stderr.seek(0)
        detail = self.stderr.read().decode(errors="replace").strip().splitlines()
        self.path.unlink(missing_ok=True)
        reason = detail[-1] if detail else f"ffmpeg exit code {self.process.returncode}"
        return DecodeError(f"encoding a clip into {self.path.parent} failed: {reason}")

    def abort(self) -> None:
        self.process.kill()
        self.process.wait()
        self.stderr.close()
        self.path.unlink(missing_ok=True)


def _as_fraction(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001 * 1000 if fps % 1 else 1)


class DecodedTimes:
    """The time of each frame that ffmpeg decodes, from first frame: a corrupt stretch of a source
    loses frames in the decoder (not in the probe's list of packets), so the probe's times of
    every later frame were early, and a clip over the stretch jumped forward in time unseen.
    ffmpeg writes each frame's line (and flushes it) before the frame's bytes reach the pipe, so
    a frame read has its time; where a line is missing, get() says None."""

    def __init__(self, path: Path):
        self.path, self.handle, self.pending, self.times = path, None, "", []

    def get(self, i: int) -> float | None:
        if i >= len(self.times):
            self._read()
        return self.times[i] - self.times[0] if i < len(self.times) else None

    def lost_before(self, i: int, fps: float) -> bool:
        """Were frames lost before frame i (over 1.5 frame intervals after the one before)?"""
        now, before = self.get(i), self.get(i - 1) if i else None
        return now is not None and before is not None and now - before > 1.5 / fps

    def _read(self) -> None:
        if self.handle is None:
            if not self.path.exists():
                return
            self.handle = self.path.open()
        lines = (self.pending + self.handle.read()).split("\n")
        self.pending = lines.pop()  # a line not yet whole
        for line in lines:
            try:
                self.times.append(float(line))
            except ValueError:  # a frame without a time ("N/A"): later frames would be misnumbered
                self.times.append(self.times[-1] if self.times else 0.0)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


@dataclass
class CutResult:
    cuts: list[int]  # frames where the detector saw a new shot start (before length filtering)
    clips: list[dict] = field(default_factory=list)  # manifest fields of each written clip
    frames_decoded: int = 0
    clips_dir: Path | None = None


def cut_source(
    path: Path, probe: Probe, source_sha: str, clips_dir: Path, cfg: IngestConfig,
    on_frames: Callable[[int], None] | None = None,
) -> CutResult:
    """Decode `path` once; return the cuts and the clips written into clips_dir."""
    scfg, ccfg = cfg.scenes, cfg.clips
    width, height = scaled_size(probe.width, probe.height, ccfg.short_side)
    square = ccfg.crop == "center_square"
    if square:  # ffmpeg crops; cut detection then sees the centre square too
        width = height = min(width, height)
    out_fps = ccfg.fps if ccfg.fps and ccfg.fps < probe.fps else probe.fps
    # frames on an out_fps time grid: fewer frames for a lower fps, and a constant rate from a
    # variable-rate source (frames repeated where it is slower, dropped where faster; written as
    # they come, a clip would play its slow parts fast, and min/max scene lengths would be wrong)
    on_grid = probe.variable_fps or out_fps < probe.fps - 1e-6
    min_frames = max(1, math.ceil(scfg.min_scene_s * out_fps - 1e-6))
    max_frames = max(min_frames, math.floor(scfg.max_scene_s * out_fps + 1e-6))
    trim = scfg.trim_frames
    times = probe.frame_times_s

    detector = CutDetector(scfg, probe.fps)
    dissolves = DissolveDetector(probe.fps) if scfg.dissolves else None
    delay = max(detector.lag, dissolves.lag if dissolves else 0) + trim + 1
    settings = cfg.clip_settings_hash()
    result = CutResult(cuts=[], clips_dir=clips_dir)
    clips_dir.mkdir(parents=True, exist_ok=True)

    def time_of(i: int) -> float:
        decoded_time = decoded.get(i) if decoded else None
        if decoded_time is not None:
            return decoded_time
        return times[i] if i < len(times) else i / probe.fps

    gaps: set[int] = set()  # frames after frames lost in the decoder

    def end_time(end: int) -> float:  # of the frame before `end`
        if end >= index:
            return probe.duration_s
        return time_of(end - 1) + 1.0 / probe.fps if end in gaps else time_of(end)

    writer: ClipWriter | None = None
    clip_start = 0
    next_time = 0.0
    # encoded clips keep their temporary names until the whole source is cut: a killed run leaves
    # only .tmp-* files (which the next run removes), never clips that no record lists
    encoded: list[tuple[Path, Path]] = []
    placed = 0

    def close(end: int) -> None:
        nonlocal writer
        if writer is None:
            return
        if writer.count < min_frames:
            writer.abort()
        else:
            clip_id = clip_id_for(source_sha, clip_start, end, settings)
            encoded.append((writer.finish(), clips_dir / f"{clip_id}.mp4"))
            result.clips.append({
                "clip_id": clip_id, "start_frame": clip_start, "end_frame": end,
                "start_s": time_of(clip_start), "end_s": end_time(end),
                "fps": float(out_fps), "num_frames": writer.count,
                "width": width, "height": height,
                "clip_path": f"clips/{clip_id}.mp4",
                # between the clip's own frames (the first one's change crosses the cut or split)
                "motion": float(np.mean(changes[clip_start + 1:end])) if end - clip_start > 1 else 0.0,
            })
        writer = None

    def emit(i: int, frame: np.ndarray) -> None:
        nonlocal writer, clip_start, next_time
        boundary = i in cut_set
        trimmed = i in trim_set
        if writer is not None and (boundary or trimmed or writer.count >= max_frames):
            close(i)
        if trimmed:
            return
        if writer is None:
            writer = ClipWriter(clips_dir, width, height, out_fps, ccfg)
            clip_start, next_time = i, time_of(i)
        if not on_grid:
            writer.write(frame)
            return
        while time_of(i) + 1e-6 >= next_time and writer.count < max_frames:  # each grid point takes
            writer.write(frame)  # the first frame at or after it
            next_time += 1.0 / out_fps

    cut_set: set[int] = set()
    trim_set: set[int] = set()  # frames within `trim` of a cut: one lookup per frame, not a scan of the cuts

    def add_cuts(cuts: list[int]) -> None:
        cut_set.update(cuts)
        for c in cuts:
            trim_set.update(range(c - trim, c + trim))

    def add_dissolves(spans: list[tuple[int, int]]) -> None:
        for first, last in spans:  # its frames are in no clip: each holds both shots
            cut_set.add((first + last + 1) // 2)
            trim_set.update(range(first - trim, last + 1 + trim))

    pending: deque[tuple[int, np.ndarray]] = deque()
    changes: list[float] = []  # per decoded frame: frame_change from the one before
    previous = None
    frame_bytes = width * height * 3 // 2
    decoded: DecodedTimes | None = None
    with tempfile.TemporaryFile() as stderr, tempfile.TemporaryDirectory() as scratch:
        if writes_frame_stats():
            decoded = DecodedTimes(Path(scratch) / "times.txt")
        command = decode_command(path, width, height, square, interlaced=probe.interlaced,
                                 anamorphic=abs(probe.pixel_aspect - 1) > 1e-3, stream_index=probe.stream_index,
                                 times=decoded.path if decoded else None)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr)
        index = 0
        try:
            while True:
                data = process.stdout.read(frame_bytes)
                if len(data) < frame_bytes:
                    break
                frame = np.frombuffer(data, np.uint8)
                if decoded and not probe.variable_fps and decoded.lost_before(index, probe.fps):
                    gaps.add(index)  # a corrupt stretch: a clip would jump forward here
                    add_cuts([index])
                changes.append(frame_change(frame, previous, width, height))
                previous = frame
                add_cuts(detector.push(index, detection_frame(frame, width, height, scfg.detect_width)))
                if dissolves:
                    add_dissolves(dissolves.push(index, dissolve_frame(frame[:width * height].reshape(height, width))))
                pending.append((index, frame))
                if len(pending) > delay:
                    emit(*pending.popleft())
                index += 1
                if on_frames and index % 32 == 0:
                    on_frames(32)
            process.stdout.close()
            code = process.wait()
            if code != 0 or index == 0:
                stderr.seek(0)
                message = stderr.read().decode(errors="replace").strip().splitlines()
                detail = message[-1] if message else f"ffmpeg exit code {code}"
                raise DecodeError(f"decode failed after {index} frames: {detail}")
            add_cuts(detector.finish())
            if dissolves:
                add_dissolves(dissolves.finish())
            while pending:
                emit(*pending.popleft())
            close(index)
            for temp, final in encoded:
                durable_replace(temp, final)
                placed += 1
            # the renames on disk before the caller writes the record that lists these clips (the
            # record is in another folder: its rename could otherwise reach the disk first)
            fsync_path(clips_dir)
        except BaseException:
            process.kill()
            process.wait()
            if writer is not None:
                writer.abort()
            for i, (temp, final) in enumerate(encoded):  # nothing half-done is left behind under a final name
                (final if i < placed else temp).unlink(missing_ok=True)
            raise
        finally:
            if decoded:
                decoded.close()
    if on_frames:
        on_frames(index % 32)
    result.frames_decoded = index
    result.cuts = sorted(cut_set)
    return result
