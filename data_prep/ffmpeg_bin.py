"""Which ffmpeg binary to run: the system's if present, else imageio-ffmpeg's static build."""
from __future__ import annotations

import functools
import os
import shutil


@functools.cache
def ffmpeg_exe() -> str:
    explicit = os.environ.get("MAV_FFMPEG")
    if explicit:
        return explicit
    system = shutil.which("ffmpeg")
    if system:
        return system
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@functools.cache
def writes_frame_stats() -> bool:
    """Does this ffmpeg write per-frame stats (-stats_enc_pre, FFmpeg 6.1 and later)?"""
    import subprocess

    try:
        options = subprocess.run([ffmpeg_exe(), "-hide_banner", "-h", "full"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "-stats_enc_pre_fmt" in options
