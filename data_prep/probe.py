"""What a video is: duration, frames, frame rate (constant or variable), display size, codec, audio."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import av


class ProbeError(ValueError):
    pass


@dataclass
class Probe:
    duration_s: float
    num_frames: int
    fps: float  # average frame rate
    variable_fps: bool
    width: int  # as displayed: after rotation, and pixel aspect (anamorphic DV, DVD, HDV)
    height: int
    rotation: int  # degrees of display rotation
    codec: str
    has_audio: bool
    frame_times_s: list[float]  # presentation time of each frame, from 0
    pixel_aspect: float = 1.0  # sample aspect ratio: a pixel's width / height in the coded frame
    interlaced: bool = False  # the first frame is interlaced (fields): ingest deinterlaces
    stream_index: int = 0  # the video stream (the container's index) that ingest decodes

    def summary(self) -> dict:
        record = asdict(self)
        record.pop("frame_times_s")
        return record


def probe(path: Path) -> Probe:
    """Probe in one pass over the packets (no full decode); the first frame is decoded for its rotation."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ProbeError("empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        _raise_if_the_machines(err)
        raise ProbeError(f"not a readable video container, or truncated ({err.strerror or err})") from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no"]
            raise ProbeError(f"no video stream ({', '.join(kinds)} streams only)")
        stream = main_video_stream(container)
        if stream is None:
            raise ProbeError("no video stream (a cover picture only)")
        if stream.codec_context is None:  # PyAV gives none where the build has no decoder for the codec
            raise OSError("this PyAV/FFmpeg build has no decoder for the video stream's codec")
        has_audio = bool(container.streams.audio)
        time_base = stream.time_base
        pts = []
        untimed = 0  # packets with neither pts nor dts: raw H.264/HEVC streams (.h264, .hevc)
        hidden = 0  # discard packets: in the container's frame count, never shown
        first: av.VideoFrame | None = None  # decoded in the same pass, for its display rotation
        decode_error: Exception | None = None
        try:
            for packet in container.demux(stream):
                # a discard packet is decoded (later frames refer to it) but never shown: an MP4 edit
                # list hides it (stream-copy trims); ffmpeg's decode pipe drops it too
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is not None and packet.size:
                    if packet.is_discard:
                        hidden += 1
                    else:
                        pts.append(stamp)
                elif packet.size:
                    untimed += 1
                if first is None and packet.size:
                    first, decode_error = _first_frame(stream, packet, decode_error)
        except av.error.FFmpegError as err:
            _raise_if_the_machines(err)
            if not pts:
                raise ProbeError(f"cannot read video packets ({err.strerror or err})") from None
        rate = stream.average_rate or stream.guessed_rate
        if not pts and untimed and rate:  # one frame per packet (the parser's), on the stream's rate
            time_base, pts = 1 / rate, list(range(untimed))
        if not pts:
            raise ProbeError("video stream has no frames")
        if first is None:
            first, decode_error = _first_frame(stream, None, decode_error)  # flush the decoder's delay
        if first is None:
            if decode_error is not None:
                _raise_if_the_machines(decode_error)
            raise ProbeError(f"first frame does not decode ({decode_error or 'no frame out of the decoder'})")
        pts.sort()
        start = pts[0]
        times = [float((p - start) * time_base) for p in pts]
        rotation = int(round(first.rotation or 0)) % 360
        declared = stream.frames  # from the container's index (0 where it keeps none)
        if declared and len(pts) + hidden < declared - 1:
            raise ProbeError(f"truncated file: the container lists {declared} frames but only {len(pts)} are present")
        width, height = stream.codec_context.width, stream.codec_context.height
        sar = stream.codec_context.sample_aspect_ratio or stream.sample_aspect_ratio
        pixel_aspect = float(sar) if sar and sar > 0 else 1.0
        width = round(width * pixel_aspect)
        interlaced = bool(first.interlaced_frame)
        codec, index = stream.codec_context.name, stream.index
    deltas = [b - a for a, b in zip(times, times[1:]) if b > a]
    average = float(rate) if rate else (len(times) - 1) / max(times[-1], 1e-9)
    # variable: frame gaps far apart, or frames drifting more than a frame off an even spacing
    # (a phone dropping from 30 to 24 fps in low light: gaps only 1.25x apart)
    step = times[-1] / max(len(times) - 1, 1)
    drift = max((abs(t - i * step) for i, t in enumerate(times)), default=0.0)
    variable = bool(deltas) and (max(deltas) > 1.5 * min(deltas) or drift > step)
    last = deltas[-1] if deltas else 1.0 / max(average, 1e-9)
    if rotation % 180:
        width, height = height, width
    return Probe(
        duration_s=times[-1] + last, num_frames=len(times), fps=average, variable_fps=variable,
        width=width, height=height, rotation=rotation, codec=codec,
        has_audio=has_audio, frame_times_s=times, pixel_aspect=pixel_aspect, interlaced=interlaced,
        stream_index=index,
    )


def main_video_stream(container):
    """The video stream ffmpeg picks by default, the one of the highest resolution (the first of
    those), leaving out cover pictures; None when a cover picture is all there is."""
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        return None
    return max(videos, key=lambda s: (s.codec_context.width * s.codec_context.height if s.codec_context else 0,
                                      -s.index))


def _raise_if_the_machines(err: Exception) -> None:
    """I/O errors (PyAV's OSError subclasses: EIO, permissions, timeouts) and codecs this build
    lacks say nothing about the file: raised as OSError, so ingest retries the source next time
    instead of recording it as rejected (ProbeError)."""
    if isinstance(err, OSError):
        raise err
    if isinstance(err, (av.error.DecoderNotFoundError, av.error.DemuxerNotFoundError)):
        raise OSError(f"this PyAV/FFmpeg build cannot read it ({err})") from None


def _first_frame(stream, packet, error):
    """The first frame the decoder gives for `packet` (None flushes it), and the last decode error."""
    try:
        frames = stream.codec_context.decode(packet)
    except av.error.FFmpegError as err:
        return None, err
    return (frames[0] if frames else None), error
