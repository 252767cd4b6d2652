"""Video files <-> uint8 arrays [T,H,W,3] through PyAV (decode) and PyAV/PIL (encode)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".gif")


def read_video(path: str | Path, num_frames: int | None = None, stride: int = 1, offset: int = 0) -> np.ndarray:
    """Decode frames offset, offset+stride, ... (num_frames of them, or all) as RGB uint8 [T,H,W,3].

    Frame numbers are in decode order. Decoding stops as soon as enough frames
    are read. Raises ValueError naming the file if the frame size changes mid-stream
    or the file holds fewer frames than asked for.
    """
    import av

    if stride < 1 or offset < 0:
        raise ValueError(f"{path}: stride must be >= 1 and offset >= 0 (got stride={stride}, offset={offset})")
    frames: list[np.ndarray] = []
    last = None if num_frames is None else offset + (num_frames - 1) * stride
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if last is not None and i > last:
                break
            if i < offset or (i - offset) % stride:
                continue
            rgb = frame.to_ndarray(format="rgb24")
            # display rotation (phone videos): ffmpeg's angle is counter-clockwise, like np.rot90's k
            k = round(getattr(frame, "rotation", 0) or 0) // 90 % 4
            if k:
                rgb = np.ascontiguousarray(np.rot90(rgb, k))
            if frames and rgb.shape != frames[0].shape:
                raise ValueError(f"{path}: frame {i} is {rgb.shape[1]}x{rgb.shape[0]} but earlier frames are "
                                 f"{frames[0].shape[1]}x{frames[0].shape[0]} (mixed frame sizes in one video)")
            frames.append(rgb)
    if num_frames is not None and len(frames) < num_frames:
        raise ValueError(f"{path}: needs {num_frames} frames at offset {offset}, stride {stride}, "
                         f"but only {len(frames)} could be read (video too short)")
    if not frames:
        raise ValueError(f"{path}: no frames decoded")
    return np.stack(frames)


def count_frames(path: str | Path) -> int:
    """Frame count from the container if it knows it, else by decoding."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


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
