"""Scene cuts and clips on real, labelled videos (no orchestration: data_prep alone)."""
import json
import math
import re
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from data_prep.clips import cut_source, scaled_size
from data_prep.config import IngestConfig
from data_prep.ffmpeg_bin import ffmpeg_exe
from data_prep.probe import probe

LABELLED = ["bikes.mp4", "big_buck_bunny_0_30.webm"]


def run(path: Path, tmp_path: Path, cfg: IngestConfig | None = None):
    cfg = cfg or IngestConfig()
    return cut_source(path, probe(path), "0" * 64, tmp_path / "clips", cfg)


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def labelled_runs(shared_videos, tmp_path_factory):
    out = {}
    for name in LABELLED:
        truth = json.loads((shared_videos / name.rsplit(".", 1)[0]).with_suffix(".cuts.json").read_text())
        out[name] = (truth, run(shared_videos / name, tmp_path_factory.mktemp(name)))
    return out


@pytest.mark.parametrize("name", LABELLED)
def test_every_labelled_cut_is_detected_within_one_frame(labelled_runs, name):
    truth, result = labelled_runs[name]
    for cut in truth["cut_frames"]:
        assert any(abs(cut - found) <= 1 for found in result.cuts), (cut, result.cuts)
    assert len(result.cuts) == len(truth["cut_frames"])  # and nothing else (fades, titles)


@pytest.mark.parametrize("name", LABELLED)
def test_no_clip_straddles_a_labelled_cut(labelled_runs, name):
    truth, result = labelled_runs[name]
    assert result.clips
    for clip in result.clips:
        for cut in truth["cut_frames"]:
            assert not (clip["start_frame"] < cut - 1 and clip["end_frame"] > cut + 1), (clip, cut)


@pytest.mark.parametrize("name", LABELLED)
def test_each_clip_decodes_to_its_manifest_frame_count(labelled_runs, name, tmp_path):
    _, result = labelled_runs[name]
    assert result.clips  # every labelled video has scenes longer than the minimum
    for clip in result.clips:
        frames = decode(_clip_file(result, clip))
        assert len(frames) == clip["num_frames"] == clip["end_frame"] - clip["start_frame"]
        assert frames.shape[1:] == (clip["height"], clip["width"], 3) == (256, 256, 3)


def _clip_file(result, clip) -> Path:
    return result.clips_dir / clip["clip_path"].split("/", 1)[1]


def test_rotated_video_comes_out_upright(shared_videos, tmp_path):
    source = shared_videos / "rotate-buck-bunny.mp4"
    info = probe(source)
    assert (info.width, info.height, info.rotation) == (1080, 1920, 270)
    result = run(source, tmp_path)
    (clip,) = result.clips
    frames = decode(_clip_file(result, clip))
    # reference: decode the coded (landscape) frame, apply the display rotation ourselves
    with av.open(str(source)) as container:
        coded = [f for _, f in zip(range(40), container.decode(video=0))][-1]
    raw = coded.to_ndarray(format="rgb24")
    upright = np.rot90(raw, k=-1 if coded.rotation in (-90, 270) else 1)
    wrong = raw
    def small(img):  # compare structure at a coarse scale, centre square like the clip
        w, h = scaled_size(img.shape[1], img.shape[0], 256)
        import cv2
        scaled = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        side = min(w, h)
        top, left = (h - side) // 2, (w - side) // 2
        square = scaled[top:top + side, left:left + side]
        return cv2.resize(square, (32, 32), interpolation=cv2.INTER_AREA).astype(float)
    ours = small(frames[39])
    assert np.abs(ours - small(upright)).mean() < 12
    assert np.abs(ours - small(upright)).mean() < 0.5 * np.abs(ours - small(wrong)).mean()


def test_long_scenes_are_split_and_short_ones_dropped(shared_videos, tmp_path):
    cfg = IngestConfig.model_validate({"scenes": {"max_scene_s": 1.0, "min_scene_s": 0.9}})
    result = run(shared_videos / "bikes.mp4", tmp_path, cfg)
    lengths = [c["num_frames"] for c in result.clips]
    assert max(lengths) == 25 and min(lengths) >= 23  # 1.0 s pieces at 25 fps, 0.9 s minimum
    assert all(c["end_frame"] - c["start_frame"] == c["num_frames"] for c in result.clips)


def test_trim_drops_frames_next_to_each_cut(shared_videos, tmp_path):
    cfg = IngestConfig.model_validate({"scenes": {"trim_frames": 2, "min_scene_s": 0.5}})
    result = run(shared_videos / "bikes.mp4", tmp_path, cfg)
    scenes = list(zip([0, *result.cuts], result.cuts))  # the last "cut" is the end of the video
    assert len(scenes) == 5
    assert [(c["start_frame"], c["end_frame"]) for c in result.clips] == [(s + 2 * (s > 0), e - 2) for s, e in scenes]


def test_fixed_fps_resamples_clips(shared_videos, tmp_path):
    cfg = IngestConfig.model_validate({"clips": {"fps": 10}})
    result = run(shared_videos / "bikes.mp4", tmp_path, cfg)
    assert [(c["start_frame"], c["end_frame"]) for c in result.clips] == list(zip([0, *result.cuts], result.cuts))
    assert len(result.clips) == 5
    for clip in result.clips:
        seconds = (clip["end_frame"] - clip["start_frame"]) / 25
        assert clip["fps"] == 10 and abs(clip["num_frames"] - seconds * 10) <= 1
        assert len(decode(_clip_file(result, clip))) == clip["num_frames"]


def test_uncropped_clips_keep_the_whole_frame(shared_videos, tmp_path):
    cfg = IngestConfig.model_validate({"clips": {"crop": "none"}})
    result = run(shared_videos / "bikes.mp4", tmp_path, cfg)
    assert [c["start_frame"] for c in result.clips] == [0, 30, 76, 137, 187]
    for clip in result.clips:
        frames = decode(_clip_file(result, clip))
        assert frames.shape == (clip["num_frames"], 256, 602, 3)  # 640x272 scaled to a 256 short side


@pytest.mark.parametrize("detector,threshold", [("content", None), ("content", 20.0), ("adaptive", None),
                                                ("adaptive", 2.0), ("histogram", None), ("histogram", 0.1),
                                                ("hash", None), ("hash", 0.3)])
def test_every_detector_finds_a_hard_cut(detector, threshold):
    """Each configurable PySceneDetect detector, with its own threshold keyword, finds the one cut
    between two unrelated textures (frame 20), and nothing else."""
    import numpy as np

    from data_prep.config import SceneConfig
    from data_prep.scenes import CutDetector

    rng = np.random.default_rng(0)
    shots = [np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)) for _ in range(2)]
    cuts = CutDetector(SceneConfig(detector=detector, threshold=threshold, detector_min_frames=5), fps=25.0)
    found = []
    for i in range(40):
        found += cuts.push(i, shots[i >= 20])
    assert found + cuts.finish() == [20]


# -- sources that need care: made with ffmpeg's test patterns ------------------------------
def _encode(path: Path, *args: str) -> Path:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args, "-c:v", "libx264", str(path)], check=True)
    return path


def _ffmpeg_rgb(path: Path, filters: str) -> np.ndarray:
    """The first frame as ffmpeg itself shows it (the source's colour tags and aspect honoured)."""
    raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-frames:v", "1", "-vf", filters,
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8)


PATTERN = ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=2"]


@pytest.mark.parametrize("colour", [["-pix_fmt", "yuvj420p"],
                                    ["-vf", "scale=out_color_matrix=bt709", "-colorspace", "bt709"]],
                         ids=["full-range", "bt709"])
def test_clips_keep_the_colours_of_full_range_and_bt709_sources(tmp_path, colour):
    source = _encode(tmp_path / "source.mp4", *PATTERN, *colour)
    result = run(source, tmp_path)
    clip = result.clips[0]
    frames = decode(_clip_file(result, clip))  # PyAV, as training reads clips
    size = clip["width"]
    expected = _ffmpeg_rgb(source, f"crop=min(iw\\,ih):min(iw\\,ih),scale={size}:{size}").reshape(size, size, 3)
    assert np.abs(frames[0].astype(int) - expected.astype(int)).mean() < 3  # was 6-8 (range, matrix lost)
    import av

    with av.open(str(_clip_file(result, clip))) as container:  # tagged as what it is: limited-range BT.601
        context = container.streams.video[0].codec_context
        assert (context.color_range, context.colorspace) == (1, 6)  # AVCOL_RANGE_MPEG, AVCOL_SPC_SMPTE170M


@pytest.mark.parametrize("later_fps", [10, 24])  # 24: a phone dropping from 30 in low light (gaps 1.25x apart)
def test_variable_frame_rate_clips_play_at_the_sources_speed(tmp_path, later_fps):
    """2 s at 30 fps, a cut, 2 s at a lower rate: both shots become clips of their own duration."""
    source = _encode(tmp_path / "vfr.mp4", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=30:duration=2",
                     "-f", "lavfi", "-i", f"smptebars=size=160x120:rate={later_fps}:duration=2",
                     "-filter_complex", "[0:v][1:v]concat=n=2:v=1[v]", "-map", "[v]", "-fps_mode", "vfr")
    info = probe(source)
    assert info.variable_fps and info.num_frames == 60 + 2 * later_fps
    result = run(source, tmp_path)
    assert [c["start_frame"] for c in result.clips] == [0, 60]  # the 10 fps shot is long enough too
    for clip in result.clips:
        assert clip["num_frames"] / clip["fps"] == pytest.approx(clip["end_s"] - clip["start_s"], abs=0.1)
        assert len(decode(_clip_file(result, clip))) == clip["num_frames"]


def test_frames_an_edit_list_hides_are_not_counted(tmp_path):
    """A stream-copy trim keeps the GOP's hidden leading frames in the file (an MP4 edit list)."""
    source = _encode(tmp_path / "long.mp4", *PATTERN, "-g", "250")
    trimmed = tmp_path / "trimmed.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-ss", "1", "-i", str(source), "-c", "copy", str(trimmed)], check=True)
    info = probe(trimmed)
    assert info.num_frames == pytest.approx(25, abs=1) and info.duration_s == pytest.approx(1.0, abs=0.05)


def test_frames_a_corrupt_stretch_loses_in_the_decoder_shift_no_time_and_split_the_clip(tmp_path):
    """Frames 50-59 of 100 (25 fps, MJPEG) are garbled in the file, not removed: the probe lists all
    100 packets, and the decoder drops those 10 frames. Clip times come from the decoder's own frame
    times: the probe's had every frame after the stretch 0.4 s early. And a cut at the stretch: a clip
    over it jumped 0.4 s forward in its middle."""
    garbled = tmp_path / "garbled.mkv"  # (intra-only: the other frames decode as they were)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=192x144:rate=25:duration=4",
                    "-c:v", "mjpeg", "-q:v", "5", "-bsf:v", "noise=amount='if(between(n,50,59),1,0)'", str(garbled)],
                   check=True)
    assert probe(garbled).num_frames == 100
    result = run(garbled, tmp_path)
    assert result.frames_decoded == 90 and 50 in result.cuts, result
    assert [(c["start_frame"], c["end_frame"], c["start_s"], c["end_s"]) for c in result.clips] == \
        [(0, 50, 0.0, pytest.approx(2.0)), (50, 90, pytest.approx(2.4), pytest.approx(4.0))]


def test_interlaced_sources_are_deinterlaced(tmp_path):
    source = _encode(tmp_path / "interlaced.mp4", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=50:duration=2",
                     "-vf", "tinterlace=interleave_top,setfield=tff", "-flags", "+ildct+ilme", "-x264-params", "tff=1")
    assert probe(source).interlaced
    result = run(source, tmp_path, IngestConfig.model_validate({"clips": {"crop": "none"}}))
    report = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(_clip_file(result, result.clips[0])), "-vf",
                             "idet", "-f", "null", "-"], capture_output=True, text=True).stderr
    line = report.split("Multi frame detection:")[-1].splitlines()[0]
    counts = {name: int(n) for name, n in re.findall(r"(\w+):\s*(\d+)", line)}
    assert counts["Progressive"] >= 4 * counts["TFF"], line  # was all TFF: combed frames


def test_anamorphic_sources_keep_their_display_proportions(tmp_path):
    source = _encode(tmp_path / "anamorphic.mp4", *PATTERN, "-vf", "setsar=16/9")  # displays as 569x240
    info = probe(source)
    assert (info.width, info.height, info.pixel_aspect) == (569, 240, pytest.approx(16 / 9))
    result = run(source, tmp_path, IngestConfig.model_validate({"clips": {"crop": "none"}}))
    clip = result.clips[0]
    assert (clip["width"], clip["height"]) == (568, 240)
    expected = _ffmpeg_rgb(source, "scale=568:240,setsar=1").reshape(240, 568, 3)
    assert np.abs(decode(_clip_file(result, clip))[0].astype(int) - expected.astype(int)).mean() < 4


# -- short shots and fades between long ones ----------------------------------------------
def _concat_shots(path: Path, shots: list[tuple[str, int]]) -> Path:
    """One 25 fps video of ffmpeg test patterns, each (source, frames) a shot of its own."""
    inputs = [arg for source, frames in shots
              for arg in ("-f", "lavfi", "-i", f"{source}=size=192x144:rate=25:duration={frames / 25}")]
    concat = "".join(f"[{i}:v]" for i in range(len(shots))) + f"concat=n={len(shots)}:v=1[v]"
    return _encode(path, *inputs, "-filter_complex", concat, "-map", "[v]", "-pix_fmt", "yuv420p")


@pytest.mark.parametrize("detector", ["content", "adaptive", "histogram", "hash"])
def test_short_shots_between_long_ones_are_dropped_not_merged_into_a_clip(tmp_path, detector):
    """Shots of 60, 8, 60, 12, 60 frames. With a minimum shot length of its own (it was 15 frames)
    each detector dropped the cut at 68 and one of 128 and 140, and a clip held several shots."""
    shots = [("testsrc2", 60), ("smptebars", 8), ("zoneplate", 60), ("rgbtestsrc", 12), ("testsrc", 60)]
    source = _concat_shots(tmp_path / "short-shots.mp4", shots)
    cfg = IngestConfig.model_validate({"scenes": {"detector": detector}})
    result = run(source, tmp_path, cfg)
    true_cuts = [60, 68, 128, 140]
    for clip in result.clips:  # the promise: a clip never straddles a shot boundary
        assert not [c for c in true_cuts if clip["start_frame"] < c < clip["end_frame"]], (clip, result.cuts)
    # each 2.4 s shot is a clip; the 8- and 12-frame shots are under min_scene_s (1 s) and dropped
    assert [(c["start_frame"], c["end_frame"]) for c in result.clips] == [(0, 60), (68, 128), (140, 200)]


def test_a_still_shot_measures_no_motion_and_a_moving_one_some(tmp_path):
    """Each clip's `motion` (mean luma change per frame) tells a still shot (colour bars) from a moving
    one (testsrc2's sweeping pattern), neither counting the change across the cut between them."""
    source = _concat_shots(tmp_path / "still-then-moving.mp4", [("smptebars", 50), ("testsrc2", 50)])
    still, moving = run(source, tmp_path).clips
    assert still["motion"] < 0.5 < 2 < moving["motion"], (still, moving)
    cut = run(source, tmp_path, IngestConfig.model_validate({"scenes": {"max_scene_s": 1.0}})).clips
    assert [c["motion"] < 0.5 for c in cut] == [True, True, False, False]  # split pieces measured alone too


def test_a_fade_between_two_shots_leaves_both_as_clips(tmp_path):
    """A fade through black (frames 60-75) gives several cuts close together. Reported, they cut the
    fade into pieces under min_scene_s, which are dropped: the shots on either side stay clips."""
    source = _encode(tmp_path / "fade.mp4", "-f", "lavfi", "-i", "testsrc2=size=192x144:rate=25:duration=3",
                     "-f", "lavfi", "-i", "gradients=seed=1:size=192x144:rate=25:duration=3", "-filter_complex",
                     "[0:v][1:v]xfade=transition=fadeblack:duration=0.6:offset=2.4,format=yuv420p[v]",
                     "-map", "[v]")
    result = run(source, tmp_path)
    assert len(result.cuts) > 1 and all(60 <= c <= 75 for c in result.cuts), result.cuts
    (first, second) = [(c["start_frame"], c["end_frame"]) for c in result.clips]
    assert first[0] == 0 and first[1] >= 60  # the whole first shot, up to the fade
    assert second[1] == 135 and second[0] <= 75  # the whole second shot, from the fade's end


def _cross_fade(path: Path, bunny: Path, first_s: float, second_s: float, frames: int) -> Path:
    """2.5 s of the bunny from first_s, then 2.5 s from second_s, at 24 fps, the second shot fading
    in over `frames` frames from frame 38 (1.6 s)."""
    shot = "scale=192:144,setsar=1,fps=24,format=yuv420p"
    return _encode(path, "-ss", str(first_s), "-t", "2.5", "-i", str(bunny), "-ss", str(second_s), "-t", "2.5",
                   "-i", str(bunny), "-filter_complex", f"[0:v]{shot}[a];[1:v]{shot}[b];"
                   f"[a][b]xfade=transition=fade:duration={frames / 24}:offset=1.6,format=yuv420p[v]",
                   "-map", "[v]")


@pytest.mark.parametrize("frames", [4, 12, 24])
def test_a_cross_fade_between_two_shots_is_in_neither_clip(tmp_path, samples, frames):
    """A dissolve over `frames` frames from 38.4: PySceneDetect's detector finds no cut in one of 12
    or 24 frames, and one in the middle of one of 4, so without the dissolve detector a clip held
    frames blending both shots. Now no clip holds a frame with 15 to 85 % of each shot, and the
    shots on either side are clips, less at most a few frames beside the dissolve."""
    source = _cross_fade(tmp_path / "dissolve.mp4", samples / "big_buck_bunny_0_30.webm", 5, 12, frames)
    total = round((1.6 + 2.5) * 24)  # (xfade: the second input starts at the offset)
    # xfade's fade: frame i holds (i - 38.4) / frames of the second shot
    blended = (math.ceil(38.4 + 0.15 * frames), math.floor(38.4 + 0.85 * frames))

    def holding_blends(clips):
        return [c for c in clips if c["start_frame"] <= blended[1] and c["end_frame"] - 1 >= blended[0]]

    clips = run(source, tmp_path).clips
    assert not holding_blends(clips), (clips, blended)
    (first, second) = [(c["start_frame"], c["end_frame"]) for c in clips]
    assert first[0] == 0 and first[1] >= 36 and second[0] <= 38 + frames + 2 and second[1] == total, clips
    off = IngestConfig.model_validate({"scenes": {"dissolves": False}})
    assert holding_blends(run(source, tmp_path / "off", off).clips)


def test_a_title_fading_in_over_a_shot_is_no_dissolve(labelled_runs):
    """big_buck_bunny_0_30's title fades in over its last shot (frames 590-630): a blend too, but of
    one shot, changing a third of the picture. The shot stays one clip, and no cut is found there
    (test_every_labelled_cut_is_detected_within_one_frame counts all the cuts)."""
    truth, result = labelled_runs["big_buck_bunny_0_30.webm"]
    last_shot = [c for c in result.clips if c["start_frame"] >= truth["cut_frames"][-1]]
    assert last_shot and last_shot[0]["start_frame"] == truth["cut_frames"][-1], last_shot
    assert not [c for c in last_shot if 560 < c["end_frame"] < 680], last_shot


def _dissolve_spans(frames: list[np.ndarray]) -> list[tuple[int, int]]:
    from data_prep.scenes import DissolveDetector, dissolve_frame

    detector = DissolveDetector(fps=25)
    spans = [span for i, frame in enumerate(frames) for span in detector.push(i, dissolve_frame(frame))]
    return spans + detector.finish()


def test_only_a_blend_of_two_shots_is_a_dissolve():
    """Blends that are one shot are not dissolves: a fade from black, a change of exposure, a title
    over part of the picture. A blend of two textures is, and its span is the frames that hold 5 to
    95 % of each (frames 30 to 49 blend over 20 frames: 31 to 48)."""
    rng = np.random.default_rng(0)
    first, second = (rng.uniform(30, 220, (16, 16)).repeat(16, 0).repeat(16, 1) for _ in range(2))

    def blend(a, b, start=30, length=20, total=100):
        shares = np.clip((np.arange(total) - start + 1) / (length + 1), 0, 1)
        return [np.clip((1 - w) * a + w * b, 0, 255).astype(np.uint8) for w in shares]

    assert _dissolve_spans(blend(first, second)) == [(31, 48)]
    assert _dissolve_spans(blend(np.zeros_like(first), second)) == []  # from black
    assert _dissolve_spans(blend(first, first * 0.5 + 100)) == []  # exposure: brightness and contrast
    titled = first.copy()
    titled[:80] = 255 - titled[:80]  # a third of the picture
    assert _dissolve_spans(blend(first, titled)) == []


def test_a_clip_is_renamed_into_place_whole_and_flushed(tmp_path):
    """Clips go through atomic.durable_replace (fsync, then rename), as the records go through
    atomic_write_bytes: a clip file is whole under its final name and no temp file is left."""
    from data_prep.atomic import durable_replace, fsync_path

    target, temp = tmp_path / "clip.mp4", tmp_path / ".tmp-x.mp4"
    target.write_bytes(b"old")
    temp.write_bytes(b"new bytes" * 1000)
    durable_replace(temp, target)
    assert target.read_bytes() == b"new bytes" * 1000 and not temp.exists()
    with pytest.raises(FileNotFoundError):  # nothing to rename: the old file stays
        durable_replace(tmp_path / ".tmp-gone.mp4", target)
    assert target.read_bytes() == b"new bytes" * 1000
    fsync_path(tmp_path)  # a folder too (its entries)

    result = run(_encode(tmp_path / "source.mp4", *PATTERN), tmp_path)
    listed = sorted(f"{c['clip_id']}.mp4" for c in result.clips)
    assert listed and sorted(p.name for p in (tmp_path / "clips").iterdir()) == listed
    for clip in result.clips:
        assert len(decode(_clip_file(result, clip))) == clip["num_frames"]


def test_an_encoder_that_cannot_write_its_clip_says_why(tmp_path):
    """An encoder that quits (its file cannot be written: no space, no permission, no folder) broke
    the pipe, and the source failed as "[Errno 32] Broken pipe", naming nothing; it names the cause."""
    from data_prep.clips import ClipWriter, DecodeError
    from data_prep.config import ClipConfig

    writer = ClipWriter(tmp_path / "gone", 64, 64, 12.0, ClipConfig())
    frame = np.zeros(64 * 64 * 3 // 2, np.uint8)
    folder = re.escape(str(tmp_path / "gone"))
    with pytest.raises(DecodeError, match=rf"encoding a clip into {folder} failed: .*No such file or directory"):
        for _ in range(1000):  # 6 MB: more than a pipe holds, however late the encoder opens its file
            writer.write(frame)
        writer.finish()
    writer.abort()
