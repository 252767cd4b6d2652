"""eval's clip reader: too-short videos are told apart from broken ones."""
import numpy as np
import pytest

from eval.compute import ClipSpec, read_clip
from eval.video_io import VideoTooShort, list_videos, read_video
from models.video_io import write_mp4


@pytest.fixture
def ramp(tmp_path):
    frames = np.repeat(np.arange(0, 240, 8, dtype=np.uint8)[:, None, None, None], 3, axis=3)  # 30 frames
    return write_mp4(np.broadcast_to(frames, (30, 32, 32, 3)), tmp_path / "ramp clip.mp4", fps=10, crf=0)


def levels(frames: np.ndarray) -> np.ndarray:
    """The ramp's frame numbers (frame i is grey level 8 i, within the YUV round trip)."""
    return np.round(frames.reshape(len(frames), -1).mean(1) / 8).astype(int)


def test_too_short_is_its_own_error_and_names_the_file(ramp):
    frames = read_video(ramp, 10, 2, 5)
    assert frames.shape == (10, 32, 32, 3)
    assert levels(frames).tolist() == list(range(5, 25, 2))  # offset 5, every 2nd frame
    with pytest.raises(VideoTooShort, match="ramp clip.mp4.*only 12 could be read"):
        read_video(ramp, 16, 2, 6)
    with pytest.raises(VideoTooShort, match="ramp clip.mp4: 30 frames, shorter than one clip"):
        read_clip(ramp, ClipSpec(length=40, random_offset=True))  # the random-offset path too


def test_read_clip_reads_a_random_window_and_passes_other_errors_through(tmp_path, ramp):
    """Only a too-short read is retried at offset 0 (for containers that over-report their
    frames); an unreadable file raises its own error, not a too-short one."""
    spec = ClipSpec(length=9, stride=1, random_offset=True, seed=0)
    clip = read_clip(ramp, spec)
    assert clip.shape == (9, 32, 32, 3)
    start = levels(clip)[0]
    assert levels(clip).tolist() == list(range(start, start + 9)) and 0 <= start <= 30 - 9
    assert np.array_equal(read_clip(ramp, spec), clip)  # the same seed, the same window
    starts = {levels(read_clip(ramp, ClipSpec(length=9, stride=1, random_offset=True, seed=s)))[0] for s in range(6)}
    assert len(starts) > 1  # the offset is drawn
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    for random_offset in (True, False):  # counting the frames first, or decoding at once
        spec = ClipSpec(length=9, stride=1, random_offset=random_offset, seed=0)
        with pytest.raises(ValueError) as err:
            read_clip(junk, spec)
        assert not isinstance(err.value, VideoTooShort)
        assert str(err.value).startswith(f"{junk}: ") and "Invalid data found" in str(err.value)
        assert "Errno" not in str(err.value)


def test_list_videos_finds_gifs_and_mpeg_ts(tmp_path):
    for name in ("a.gif", "b.ts", "c.mpg", "d.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_videos(tmp_path)] == ["a.gif", "b.ts", "c.mpg"]


def test_gif_keeps_the_colours_of_the_video(tmp_path):
    """A palette made for the video: a gradient keeps its levels (a fixed 3-3-2 palette gave
    8 x 8 x 4 levels and errors up to 80)."""
    from models.video_io import read_frames, write_gif

    ramp = np.linspace(0, 255, 64).astype(np.uint8)
    frame = np.stack([np.tile(ramp, (16, 1)), np.tile(ramp[::-1], (16, 1)), np.tile(ramp, (16, 1)) // 2], axis=-1)
    frames = np.stack([frame] * 6)
    path = write_gif(frames, tmp_path / "ramp.gif", fps=5)
    back, fps = read_frames(path)
    assert back.shape == frames.shape and fps == pytest.approx(5)
    error = np.abs(back.astype(int) - frames.astype(int))
    assert error.mean() < 3 and error.max() < 16
    assert [p.name for p in tmp_path.iterdir()] == ["ramp.gif"]  # no temporary left


def test_the_same_frames_make_the_same_mp4(tmp_path):
    """Sampled videos are compared across runs (the registry's chain against the links' one): PyAV's
    libx264 encoder wrote other bytes for the same frames from call to call (4 calls, 4 files); the
    ffmpeg command line writes one."""
    import hashlib

    t, y, x = np.arange(24)[:, None, None], np.arange(64)[None, :, None], np.arange(64)[None, None, :]
    smooth = [128 + 60 * np.sin((x + 2 * t) / 9.0) + 0 * y, 128 + 50 * np.cos((y - t) / 7.0) + 0 * x,
              100 + t + 0 * x + 0 * y]
    frames = np.stack(smooth, -1).astype(np.uint8)
    files = {hashlib.sha256(write_mp4(frames, tmp_path / f"{i}.mp4", fps=20).read_bytes()).hexdigest()
             for i in range(4)}
    assert len(files) == 1
