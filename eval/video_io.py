"""Video files <-> uint8 arrays [T,H,W,3] through PyAV (decode) and PyAV/PIL (encode)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.config import VIDEO_EXTENSIONS as INGESTED

VIDEO_EXTENSIONS = (*INGESTED, ".gif")  # what ingest reads, and the GIFs that samplers write


class VideoTooShort(ValueError):
    """Fewer frames than a clip needs at the asked offset and stride."""


def read_video(path: str | Path, num_frames: int, stride: int = 1, offset: int = 0) -> np.ndarray:
    """Decode frames offset, offset+stride, ... (num_frames of them) as RGB uint8 [T,H,W,3], upright.

    Frame numbers are in decode order; decoding stops as soon as enough frames are read.
    Raises ValueError naming the file for mixed frame sizes, VideoTooShort for too few frames.
    """
    from models.video_io import TooFewFrames, read_frames

    if num_frames < 1 or stride < 1 or offset < 0:
        raise ValueError(f"{path}: num_frames and stride must be >= 1 and offset >= 0 "
                         f"(got {num_frames}, {stride}, {offset})")
    indices = list(range(offset, offset + num_frames * stride, stride))
    try:
        frames, _ = read_frames(path, indices)
    except TooFewFrames as err:
        readable = sum(i < err.available for i in indices)
        raise VideoTooShort(f"{path}: needs {num_frames} frames at offset {offset}, stride {stride}, "
                            f"but only {readable} could be read (video too short)") from None
    except (ValueError, OSError) as err:  # PyAV's decode errors are ValueErrors or OSErrors ("[Errno ...] ...")
        raise ValueError(f"{path}: {_reason(err)}") from None
    return frames


def read_whole_video(path: str | Path) -> np.ndarray:
    """Every frame as RGB uint8 [T,H,W,3], upright; ValueError naming the file if it has none or cannot be read."""
    from models.video_io import read_frames

    try:
        frames, _ = read_frames(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: {_reason(err)}") from None
    if not len(frames):
        raise ValueError(f"{path}: no frames")
    return frames


def _reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)


def count_frames(path: str | Path, decode: bool = True) -> int | None:
    """Frame count from the container if it knows it, else by decoding (decode=False: None)."""
    import av

    from data_prep.probe import main_video_stream

    try:
        with av.open(str(path)) as container:
            stream = main_video_stream(container)
            if stream is None:
                raise ValueError("no video stream")
            if stream.frames:
                return int(stream.frames)
            return sum(1 for _ in container.decode(stream)) if decode else None
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable video ({_reason(err)})") from None


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
