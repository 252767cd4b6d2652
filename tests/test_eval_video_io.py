"""eval's clip reader: too-short videos are told apart from broken ones."""
import numpy as np
import pytest

from eval.compute import ClipSpec, read_clip
from eval.video_io import VideoTooShort, list_videos, read_video
from models.video_io import write_gif, write_mp4


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


@pytest.mark.parametrize("fps", [20, 30, 37.5, 7])
def test_a_gif_plays_for_as_long_as_its_frames_at_any_rate(tmp_path, fps):
    """GIF frame delays are whole centiseconds: at 30 fps (3.33 cs) a delay rounded alike for every
    frame plays 10 % fast. The delays must alternate (3, 3, 4) so that the whole lasts T / fps."""
    from models.video_io import write_gif

    data = write_gif(np.zeros((60, 8, 8, 3), np.uint8), tmp_path / "v.gif", fps=fps).read_bytes()
    delays, at = [], data.find(b"\x21\xf9\x04")  # each frame's graphic control extension
    while at >= 0:
        delays.append(int.from_bytes(data[at + 4 : at + 6], "little"))
        at = data.find(b"\x21\xf9\x04", at + 6)
    assert len(delays) == 60 and min(delays) >= 2  # (browsers play delays of 0 or 1 cs at 10 cs)
    assert sum(delays) / 100 == pytest.approx(60 / fps, abs=0.01)


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


def _ramp_at(folder, fps: float, step: int = 1, container: str = "mp4"):
    """Frame k is grey level 8 k * step (frame number k * step of the 30-frame ramp), at `fps`."""
    import subprocess

    from data_prep.ffmpeg_bin import ffmpeg_exe

    frames = np.repeat(np.arange(0, 240, 8 * step, dtype=np.uint8)[:, None, None, None], 3, axis=3)
    path = write_mp4(np.broadcast_to(frames, (len(frames), 32, 32, 3)), folder / f"ramp{fps:g}.mp4", fps=fps, crf=0)
    if container == "mp4":
        return path
    # matroska keeps times in milliseconds (frame 2 at 67 ms, after 1/15 s): the same frames, remuxed
    other = path.with_suffix(f".{container}")
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-c", "copy", str(other)], check=True)
    return other


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_a_clip_at_a_frame_rate_takes_the_frame_on_screen_at_each_time(tmp_path, container):
    """30 fps read at 15 fps: frames 0, 2, 4, ...; at 10 fps: 0, 3, 6, ...; fps None: as decoded. Offset
    and stride count resampled frames."""
    thirty = _ramp_at(tmp_path, 30, container=container)
    assert levels(read_clip(thirty, ClipSpec(length=15, fps=15))).tolist() == list(range(0, 30, 2))
    assert levels(read_clip(thirty, ClipSpec(length=10, fps=10))).tolist() == list(range(0, 30, 3))
    assert levels(read_clip(thirty, ClipSpec(length=7, fps=7))).tolist() == [0, 4, 8, 12, 17, 21, 25]  # 30 k / 7
    assert levels(read_clip(thirty, ClipSpec(length=16))).tolist() == list(range(16))
    assert levels(read_video(thirty, 5, 2, 3, fps=15)).tolist() == [6, 10, 14, 18, 22]
    # above the video's rate a frame stays on screen for several output frames
    assert levels(read_video(thirty, 6, fps=60)).tolist() == [0, 0, 1, 1, 2, 2]


def test_a_video_made_at_the_clip_rate_matches_one_resampled_to_it(tmp_path):
    fifteen = _ramp_at(tmp_path, 15, step=2)  # the same motion, every 2nd frame at half the rate
    thirty = _ramp_at(tmp_path, 30)
    spec = ClipSpec(length=15, fps=15)
    assert levels(read_clip(fifteen, spec)).tolist() == levels(read_clip(thirty, spec)).tolist() \
        == list(range(0, 30, 2))
    assert levels(read_clip(thirty, ClipSpec(length=15))).tolist() == list(range(15))  # native: not the same


def test_a_random_offset_at_a_frame_rate_is_drawn_over_the_resampled_frames(tmp_path):
    """30 frames at 30 fps are 10 at 10 fps: a 9-frame clip starts at resampled frame 0 or 1 (frame 0 or 3);
    a clip longer than the 10 is too short, said before decoding."""
    from eval.video_io import count_frames

    thirty = _ramp_at(tmp_path, 30)
    assert count_frames(thirty, fps=10) == count_frames(thirty, decode=False, fps=10) == 10
    assert count_frames(thirty, fps=15) == 15 and count_frames(thirty) == 30
    starts = set()
    for seed in range(8):
        clip = levels(read_clip(thirty, ClipSpec(length=9, random_offset=True, seed=seed, fps=10))).tolist()
        assert clip == list(range(clip[0], clip[0] + 27, 3))
        starts.add(clip[0])
    assert starts == {0, 3}
    with pytest.raises(VideoTooShort, match=r"ramp30.mp4: 10 frames at 10 fps, shorter than one clip \(11 frames"):
        read_clip(thirty, ClipSpec(length=11, random_offset=True, fps=10))
    with pytest.raises(VideoTooShort, match=r"ramp30.mp4: needs 16 frames at 15 fps at offset 0, stride 1, but only "
                                            r"15 could be read"):
        read_video(thirty, 16, fps=15)


def test_resampling_reads_no_further_than_the_clip_and_needs_timestamps(tmp_path):
    """on_screen stops taking frames once the clip's last one is known (so decoding stops there); a raw
    H.264 stream has no frame times: an error naming the file."""
    import subprocess
    from fractions import Fraction

    from data_prep.ffmpeg_bin import ffmpeg_exe
    from eval.video_io import on_screen

    taken = []

    def frames():  # an hour at 30 fps
        for i in range(30 * 3600):
            taken.append(i)
            yield Fraction(i, 30), Fraction(1, 30), i

    assert on_screen(frames(), 15, range(16)) == list(range(0, 32, 2))
    assert len(taken) == 32  # output frame 15 (1 s) is frame 30: frame 31, the first after it, says so
    raw = tmp_path / "ramp.h264"
    lossy = write_mp4(np.zeros((4, 32, 32, 3), dtype=np.uint8), tmp_path / "lossy.mp4", fps=30)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(lossy), "-c", "copy", "-f", "h264", str(raw)], check=True)
    assert read_video(raw, 4).shape == (4, 32, 32, 3)  # as decoded: no times needed
    with pytest.raises(ValueError, match=r"ramp.h264: frame 0 has no timestamp"):
        read_video(raw, 4, fps=15)


def _remux(source, target, *args, before=()):
    import subprocess

    from data_prep.ffmpeg_bin import ffmpeg_exe

    subprocess.run([ffmpeg_exe(), "-v", "error", *before, "-i", str(source), *args, str(target)], check=True)
    return target


def test_count_frames_at_a_rate_is_what_read_video_delivers(tmp_path):
    """The too-short check and the random offsets count resampled frames before decoding: the count must
    be the number of frames read_video then gives, in every container. Matroska keeps only the
    container's duration, which runs from time 0 to the end of the longest stream: a video starting at
    0.7 s, or beside 3 s of audio, is not that long (1 s of frames counted as 3.7 s)."""
    from eval.video_io import count_frames

    sources = [_ramp_at(tmp_path, 30), _ramp_at(tmp_path, 30000 / 1001)]
    videos = [*sources, write_gif(np.broadcast_to(np.arange(0, 128, 8, dtype=np.uint8)[:, None, None, None],
                                                  (16, 32, 32, 3)), tmp_path / "sampled.gif", fps=20)]
    for i, source in enumerate(sources):
        videos.append(_remux(source, tmp_path / f"{i}.mkv", "-c", "copy"))
        audio = ["-f", "lavfi", "-i", "sine=duration=3"]
        videos.append(_remux(source, tmp_path / f"{i} audio.mkv", *audio, "-c:v", "copy", "-c:a", "aac"))
        videos.append(_remux(source, tmp_path / f"{i} late.webm", *audio, "-c:v", "libvpx-vp9", "-lossless", "1",
                             "-c:a", "libopus", "-output_ts_offset", "0.7"))
    for video in videos:
        for fps in (8, 15, 24, 29.97, 60):
            count = count_frames(video, fps=fps)
            assert len(read_video(video, count, fps=fps)) == count, (video.name, fps)
            with pytest.raises(VideoTooShort, match=f"only {count} could be read"):
                read_video(video, count + 1, fps=fps)


def test_a_random_offset_in_a_matroska_video_with_audio_stays_in_its_frames(tmp_path):
    """30 frames at 30 fps beside 3 s of audio are 10 frames at 10 fps: a 9-frame clip starts at
    resampled frame 0 or 1, both drawn (counted as 31 frames, nearly every draw fell past the end and
    back to offset 0)."""
    thirty = _ramp_at(tmp_path, 30)
    video = _remux(thirty, tmp_path / "with audio.mkv", "-f", "lavfi", "-i", "sine=duration=3", "-c:v", "copy",
                   "-c:a", "aac")
    starts = {levels(read_clip(video, ClipSpec(length=9, random_offset=True, seed=seed, fps=10)))[0]
              for seed in range(8)}
    assert starts == {0, 3}
    with pytest.raises(VideoTooShort, match=r"with audio.mkv: 10 frames at 10 fps, shorter than one clip"):
        read_clip(video, ClipSpec(length=11, random_offset=True, fps=10))


def test_an_mp4_trimmed_by_stream_copy_counts_the_frames_it_shows(tmp_path, ramp):
    """Cut at 1.2 s by stream copy, the 30-frame ramp (10 fps) keeps 20 frames from the keyframe before
    the cut, and an edit list hides the first 2: decoding gives 18. Counted as 20, a random 9-frame
    window could fall past the end (offsets 10, 11) and back to offset 0, and a 20-frame clip passed the
    count, to fail only once decoded."""
    from eval.video_io import count_frames, read_whole_video

    cut = _remux(ramp, tmp_path / "cut.mp4", "-c", "copy", before=["-ss", "1.2"])
    assert count_frames(cut) == len(read_whole_video(cut)) == 18
    starts = {levels(read_clip(cut, ClipSpec(length=9, random_offset=True, seed=seed)))[0] for seed in range(12)}
    assert len(starts) > 1 and all(12 <= start <= 12 + 18 - 9 for start in starts)  # ramp levels 12..29 shown
    with pytest.raises(VideoTooShort, match=r"cut.mp4: 18 frames, shorter than one clip \(20 frames"):
        read_clip(cut, ClipSpec(length=20, random_offset=True))


def test_an_mp4_cut_between_two_frames_counts_at_a_rate_the_frames_it_shows(tmp_path, ramp):
    """Cut by stream copy at 0.55 s, between two frames of the 10 fps ramp, the edit list keeps a
    duration of 2.45 s for the 24 frames it shows (2.4 s): counted from it, 25 frames at 10 fps, so the
    last random offset fell past the end (and back to offset 0) and a 25-frame clip passed the count."""
    from eval.video_io import count_frames, read_whole_video

    cut = _remux(ramp, tmp_path / "cut.mp4", "-c", "copy", before=["-ss", "0.55"])
    assert len(read_whole_video(cut)) == 24
    for fps in (10, 5, 20):
        count = count_frames(cut, fps=fps)
        assert len(read_video(cut, count, fps=fps)) == count == 24 * fps // 10, fps
    last = levels(read_video(cut, 24, fps=10))[-1]
    ends = {levels(read_clip(cut, ClipSpec(length=16, random_offset=True, seed=seed, fps=10)))[-1]
            for seed in range(16)}
    assert last in ends and max(ends) == last  # the last window is drawn, and read where it was drawn
    with pytest.raises(VideoTooShort, match=r"cut.mp4: 24 frames at 10 fps, shorter than one clip \(25 frames"):
        read_clip(cut, ClipSpec(length=25, random_offset=True, fps=10))


def test_a_window_read_from_its_keyframe_is_the_window_read_from_the_start(tmp_path, samples):
    """Training reads a window of an ingest clip from the keyframe before it (read_window), and so
    does evaluation for a dataset's clips. Frame numbers then come from timestamps, so they must be
    the decoder's count: the same frames as a read from the start, for windows anywhere in the clip,
    at bottle-detection's 179/6 fps."""
    import dataclasses
    import random

    import av

    from data_prep.clips import cut_source
    from data_prep.config import IngestConfig
    from data_prep.probe import probe
    from models.video_io import VideoReader, read_frames, read_window

    source = samples / "bottle-detection.mp4"
    clips = cut_source(source, probe(source), "0" * 64, tmp_path, IngestConfig()).clips
    assert len(clips) >= 3
    rng = random.Random(0)
    for clip in clips:
        path, n = tmp_path / clip["clip_path"].split("/", 1)[1], clip["num_frames"]
        with av.open(str(path)) as container:
            keyframes = [i for i, frame in enumerate(container.decode(video=0)) if frame.key_frame]
        assert np.diff([*keyframes, n]).max() <= 32  # clips.keyframe_every
        windows = [[0], [n - 1], list(range(n - 16, n)), list(range(0, n, 19))]
        windows += [sorted(rng.sample(range(n), 16)) for _ in range(6)]
        for window in windows:
            with VideoReader(path, threads=False) as video:
                assert video.seek_frames(window) is not None, window  # read by seeking, not the fallback
            assert np.array_equal(read_window(path, window), read_frames(path, window)[0]), window
        for seed in range(4):  # evaluation's real clips of a dataset: the same clips, read from a keyframe
            spec = ClipSpec(length=16, random_offset=True, seed=seed)
            seeked = read_clip(path, dataclasses.replace(spec, from_keyframe=True))
            assert np.array_equal(seeked, read_clip(path, spec)), seed


def test_a_video_whose_timestamps_skip_is_read_from_the_start(tmp_path, ramp):
    """Frames 20-29 of the ramp shown 10 frame durations late: a timestamp would name frame 30 for
    the 21st frame decoded. Such a stream is read from the start, as decoded."""
    from models.video_io import VideoReader, read_window

    late = _remux(ramp, tmp_path / "late.mp4", "-vf", "setpts='(N+10*gte(N,20))/(10*TB)'", "-fps_mode",
                  "passthrough", "-c:v", "libx264", "-crf", "0")
    with VideoReader(late, threads=False) as video:
        assert video.seek_frames([24, 26]) is None
    assert levels(read_window(late, [24, 26])).tolist() == [24, 26]
