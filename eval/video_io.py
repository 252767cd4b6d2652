"""Video files <-> uint8 arrays [T,H,W,3] through PyAV (decode) and PyAV/PIL (encode)."""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np

from data_prep.config import VIDEO_EXTENSIONS as INGESTED

VIDEO_EXTENSIONS = (*INGESTED, ".gif")  # what ingest reads, and the GIFs that samplers write


T = TypeVar("T")
# mkv/webm keep times in milliseconds: frame 2 of a 30 fps video is at 67 ms, after 1/15 s (66.7 ms)
TIMESTAMP_SLACK = Fraction(1, 1000)


class VideoTooShort(ValueError):
    """Fewer frames than a clip needs at the asked offset and stride."""


@contextmanager
def _naming(path: str | Path) -> Iterator[None]:
    """Decode errors (PyAV's are ValueErrors or OSErrors, "[Errno ...] ...") as ValueErrors naming the file."""
    try:
        yield
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: {_reason(err)}") from None


def read_video(path: str | Path, num_frames: int, stride: int = 1, offset: int = 0,
               fps: float | None = None, from_keyframe: bool = False) -> np.ndarray:
    """Decode frames offset, offset+stride, ... (num_frames of them) as RGB uint8 [T,H,W,3], upright.

    Frame numbers are in decode order, or with `fps` those of the video resampled to fps (see
    `on_screen`); decoding stops as soon as enough frames are read. `from_keyframe` (ingest clips,
    without fps): decoding starts at the keyframe before the first frame (read_window).
    Raises ValueError naming the file for mixed frame sizes, VideoTooShort for too few frames.
    """
    from models.video_io import TooFewFrames, read_frames, read_window

    if num_frames < 1 or stride < 1 or offset < 0:
        raise ValueError(f"{path}: num_frames and stride must be >= 1 and offset >= 0 "
                         f"(got {num_frames}, {stride}, {offset})")
    indices = list(range(offset, offset + num_frames * stride, stride))
    try:
        if fps is None:
            return read_window(path, indices) if from_keyframe else read_frames(path, indices)[0]
        frames = _read_at_fps(path, indices, fps)
    except TooFewFrames as err:
        readable = sum(i < err.available for i in indices)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: {_reason(err)}") from None
    else:
        if len(frames) == num_frames:
            return np.stack(frames)
        readable = len(frames)
    at = f" at {fps:g} fps" if fps is not None else ""
    raise VideoTooShort(f"{path}: needs {num_frames} frames{at} at offset {offset}, stride {stride}, "
                        f"but only {readable} could be read (video too short)")


def read_whole_video(path: str | Path) -> np.ndarray:
    """Every frame as RGB uint8 [T,H,W,3], upright; ValueError naming the file if it has none or cannot be read."""
    from models.video_io import read_frames

    with _naming(path):
        frames, _ = read_frames(path)
    if not len(frames):
        raise ValueError(f"{path}: no frames")
    return frames


def read_whole_video_and_head(path: str | Path, head: int, fps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every frame (as read_whole_video) and the first `head` frames of the video resampled to `fps`
    (None: as decoded; fewer where the video is shorter), from one decoding."""
    from models.video_io import VideoReader

    if fps is None:
        video = read_whole_video(path)
        return video, video[:head]
    frames, timing = [], []
    with _naming(path), VideoReader(path) as reader:
        for time, duration, (i, frame) in _timed(reader.frames()):
            frames.append(reader.rgb(frame, i))
            timing.append((time, duration, i))
        picks = on_screen(timing, fps, range(head))
    if not frames:
        raise ValueError(f"{path}: no frames")
    video = np.stack(frames)
    return video, video[picks]


def on_screen(timed: Iterable[tuple[Fraction, Fraction | None, T]], fps: float, wanted: Sequence[int]) -> list[T]:
    """The items of frames `wanted` (increasing) of a video resampled in time to `fps`.

    `timed` gives each decoded frame's (presentation time, duration or None, item) in order. Output
    frame k is the frame on screen at start + k/fps (start: the first frame's time), i.e. the latest
    frame whose time is at most that, within TIMESTAMP_SLACK (1 ms); a video ends when its last frame
    does (its duration, else the gap before it), so fewer items come back for frames past the end.
    Reads `timed` only until the last wanted frame is known: a clip's decoding stops there."""
    rate = _exact(fps)
    targets = iter(wanted)
    k = next(targets, None)
    picked: list[T] = []
    start = last = None
    for time, duration, item in timed:
        start = time if start is None else start
        while k is not None and time > start + k / rate + TIMESTAMP_SLACK:
            picked.append(last[2])  # this frame comes after output frame k: the one before is on screen
            k = next(targets, None)
        if k is None:
            return picked
        gap = time - last[0] if last is not None else None
        last = (time, duration or gap, item)
    if last is None:
        return picked
    time, duration, item = last
    if duration is None:
        raise ValueError("one frame with no duration: unknown frame rate, cannot resample it")
    while k is not None and start + k / rate + TIMESTAMP_SLACK < time + duration:
        picked.append(item)
        k = next(targets, None)
    return picked


def _read_at_fps(path: str | Path, indices: list[int], fps: float) -> list[np.ndarray]:
    from models.video_io import VideoReader

    with VideoReader(path) as reader:
        picked = on_screen(_timed(reader.frames()), fps, indices)
        converted: dict[int, np.ndarray] = {}  # a frame on screen for several output frames (fps above the video's)
        for i, frame in picked:
            if i not in converted:
                converted[i] = reader.rgb(frame, i)
        return [converted[i] for i, _ in picked]


def _timed(frames: Iterable) -> Iterator[tuple[Fraction, Fraction | None, tuple[int, object]]]:
    """(time, duration or None, (index, frame)) of decoded PyAV frames; a ValueError for a frame with no time."""
    from models.video_io import frame_time

    for i, frame in enumerate(frames):
        time = frame_time(frame)
        if time is None:
            raise ValueError(f"frame {i} has no timestamp: the video cannot be resampled to a frame rate")
        duration = getattr(frame, "duration", None)
        yield time, (duration * Fraction(frame.time_base) if duration else None), (i, frame)


def _reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)


def count_frames(path: str | Path, decode: bool = True, fps: float | None = None) -> int | None:
    """Frame count from the container if it knows it, else from its packets, without decoding them
    (decode=False: None: the file is not read past its header); an MP4 whose
    edit list hides frames (a stream-copy trim) lists them too: its shown packets are counted (decode=False:
    the container's count, which can only be larger).
    With fps: the frames of the video resampled to fps (see on_screen), from its duration (the
    stream's, else, or where an edit list hides its first frames, its packets' times: `decode` reads
    them; decode=False falls back to the container's duration, which can only be longer: it runs from
    time 0 to the end of the longest stream)."""
    import av

    from data_prep.probe import main_video_stream

    try:
        with av.open(str(path)) as container:
            stream = main_video_stream(container)
            if stream is None:
                raise ValueError("no video stream")
            if fps is not None:
                duration = _duration(container, stream, whole_container=not decode)
                if decode:  # an edit list hiding the first frames can leave the header's duration too long
                    duration = _shown_duration(container, stream, duration)
            elif stream.frames:
                shown = _shown_packets(container, stream) if decode else None
                return int(stream.frames) if shown is None else shown
            else:  # (mkv and webm keep no count: decoding every frame to count them doubled a clip's cost)
                return _shown_count(container.demux(stream)) if decode else None
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable video ({_reason(err)})") from None
    if duration is None and decode:  # packets without times (raw H.264): the parser's frames at the stream's rate
        duration = _probed_duration(path)
    if duration is None:
        return None
    return max(0, math.ceil((duration - TIMESTAMP_SLACK) * _exact(fps)))


def _exact(fps: float) -> Fraction:
    """The rate as a fraction (29.97 -> 2997/100): 30 -> 15 fps must take frame 2k, not 2k - 1 by a rounding."""
    return Fraction(fps).limit_denominator(1001)


def _duration(container, stream, whole_container: bool = False) -> Fraction | None:
    """Seconds, from the stream's header, else (whole_container) the container's (mkv and webm keep only
    that: from time 0, not the video's first frame, to the end of the longest stream, audio included)."""
    if stream.duration and stream.time_base:
        return stream.duration * Fraction(stream.time_base)
    if whole_container and container.duration:
        return Fraction(container.duration, 1_000_000)  # AV_TIME_BASE
    return None


def _shown_packets(container, stream) -> int | None:
    """None where the first packet is shown (the container's count holds), else the packets that are: an
    edit list hides the first ones, which the index lists but decoding never gives (frames 0-11 of a
    30-frame video cut at 0.4 s by stream copy)."""
    packets = container.demux(stream)
    first = next(packets, None)
    if first is None or not first.is_discard:
        return None
    return _shown_count(packets)


def _shown_count(packets) -> int:
    """The frames that decoding gives: one per packet with data that is not discarded (the flush
    packets at the end have none)."""
    return sum(1 for packet in packets if packet.size and not packet.is_discard)


def _shown_duration(container, stream, header: Fraction | None) -> Fraction | None:
    """The header's duration where it has one and the first packet is shown, else the shown packets'
    (_packets_duration): an MP4 cut by stream copy between two frames keeps, behind the edit list that
    hides the frames before the cut, a duration longer than the frames it shows (cut at 0.55 s, a 10 fps
    video: 2.45 s for 24 frames, 25 at 10 fps)."""
    packets = container.demux(stream)
    first = next(packets, None)
    if first is None or (header is not None and not first.is_discard):
        return header
    return _packets_duration(itertools.chain([first], packets), stream.time_base)


def _packets_duration(packets, time_base) -> Fraction | None:
    """Seconds from the first frame's time to the end of the last (its duration, else the gap before
    it), as on_screen counts them, from the packets' times (no decoding); None without times."""
    stamps = sorted((packet.pts, packet.duration or 0) for packet in packets
                    if packet.pts is not None and packet.size and not packet.is_discard)
    if not stamps:
        return None
    last, duration = stamps[-1]
    if not duration and len(stamps) > 1:
        duration = last - stamps[-2][0]
    if not duration:
        return None
    return (last + duration - stamps[0][0]) * Fraction(time_base)


def _probed_duration(path: str | Path) -> Fraction:
    """From the packets' times (no decoding): the last frame's plus the gap before it."""
    from data_prep.probe import probe

    try:
        seconds = probe(Path(path)).duration_s
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable video ({_reason(err)})") from None
    return Fraction(seconds).limit_denominator(1_000_000)


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """uint8 [H,W,3] -> PNG, with PIL if present, else PyAV's png encoder."""
    try:
        from PIL import Image

        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
    except ImportError:
        import av

        with av.open(str(path), "w", format="image2") as c:
            s = c.add_stream("png")
            s.width, s.height, s.pix_fmt = image.shape[1], image.shape[0], "rgb24"
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
            c.mux(s.encode())
    return Path(path)


def list_videos(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
