"""Scene cuts and clips on real, labelled videos (no orchestration: data_prep alone)."""
import json
from pathlib import Path

import av
import numpy as np
import pytest

from data_prep.clips import cut_source, scaled_size
from data_prep.config import IngestConfig
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
    for clip in result.clips:
        for cut in result.cuts:
            assert clip["end_frame"] <= cut - 2 or clip["start_frame"] >= cut + 2, (clip, cut)


def test_fixed_fps_resamples_clips(shared_videos, tmp_path):
    cfg = IngestConfig.model_validate({"clips": {"fps": 10}})
    result = run(shared_videos / "bikes.mp4", tmp_path, cfg)
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
