"""eval.compute: one decoding pass feeds every metric, and decoding stays a bounded step ahead."""
import time
from collections import Counter

import numpy as np
import pytest
import torch

import eval.compute as compute
from eval.clipsim import CLIPSIM
from eval.compute import ClipSpec, iter_clips, read_clip, score_files
from eval.fvd import FrechetVideoDistance
from eval.i3d import load_i3d
from eval.inception_score import VideoInceptionScore, load_c3d
from models.clip import FrozenCLIP, build_tiny_clip
from models.video_io import read_frames, write_mp4


def _videos(folder, count, seed, frames=20, size=32):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    return [write_mp4(rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8), folder / f"v{i}.mp4", fps=8)
            for i in range(count)]


@pytest.fixture
def decodes(monkeypatch):
    """How often each file was decoded (the real readers of a clip, or of a whole video and its clip, counted)."""
    counts: Counter = Counter()

    def counting(read):
        def counted(path, spec, index=0):
            counts[str(path)] += 1
            return read(path, spec, index)
        return counted

    for name in ("read_clip", "read_whole_and_head"):
        monkeypatch.setattr(compute, name, counting(getattr(compute, name)))
    return counts


def _metrics(clip):
    return (FrechetVideoDistance(load_i3d(None, batch_size=4)),
            CLIPSIM(clip),
            VideoInceptionScore(*load_c3d(None, seed=0)[:2], splits=1))


def test_every_video_is_decoded_once_and_each_metric_gets_its_clips(tmp_path, decodes):
    real = _videos(tmp_path / "real", 3, seed=0)
    fake = _videos(tmp_path / "fake", 3, seed=1)
    prompts = ["a red ball", "a dog running", "rain on a window"]
    clip = FrozenCLIP.load(build_tiny_clip(tmp_path / "clip"))
    real_spec = ClipSpec(16, random_offset=True, seed=3)  # 20-frame videos: offsets 0..4
    fake_spec = ClipSpec(16)
    fvd, clipsim, inception = _metrics(clip)
    kept: list = []
    # batches of 2 over 3 fakes: the prompts must follow their videos across batches
    score_files(fake, fake_spec, fvd=fvd, real=real, real_spec=real_spec, clipsim=clipsim, prompts=prompts,
                inception=inception, batch_size=2, keep_clips=kept, max_keep=2)
    assert decodes == Counter({str(p): 1 for p in real + fake})

    # the same metrics fed clip by clip, each file read on its own
    ref_fvd, ref_clipsim, ref_inception = _metrics(clip)
    fake_clips = torch.stack([torch.from_numpy(read_clip(p, fake_spec)) for p in fake])
    ref_fvd.update(torch.stack([torch.from_numpy(read_clip(p, real_spec, i)) for i, p in enumerate(real)]), real=True)
    ref_fvd.update(fake_clips, real=False)
    for path, prompt in zip(fake, prompts):  # CLIPSIM: every frame of the video, not the 16 of FVD's clip
        ref_clipsim.update([torch.from_numpy(read_frames(path)[0])], [prompt])
    ref_inception.update(fake_clips)
    # (float32 I3D features of batches of 2 and 3: rounding, which 3 videos' rank-deficient covariances
    # amplify to ~1e-6 of the FVD on one thread)
    assert fvd.result(num_resamples=0).value == pytest.approx(ref_fvd.result(num_resamples=0).value, rel=1e-5)
    assert clipsim.result(num_resamples=0).value == pytest.approx(ref_clipsim.result(num_resamples=0).value, abs=1e-6)
    assert inception.result().value == pytest.approx(ref_inception.result().value, rel=1e-6)
    # kept for the pictures at the grid's tile size, not the videos' (full-HD clips would be GBs)
    from eval.sheets import GRID_TILE, fit_square

    assert len(kept) == 2 and all(torch.equal(a, fit_square(b, GRID_TILE)) for a, b in zip(kept, fake_clips[:2]))
    assert kept[0].shape[1:] == (GRID_TILE, GRID_TILE, 3)


def test_bad_inputs_stop_before_any_decoding(tmp_path, decodes):
    fake = _videos(tmp_path / "fake", 2, seed=1, frames=10)
    clip = FrozenCLIP.load(build_tiny_clip(tmp_path / "clip"))
    fvd, clipsim, inception = _metrics(clip)
    with pytest.raises(ValueError, match="FVD needs at least 2 real videos, got 1"):
        score_files(fake, ClipSpec(10), fvd=fvd, real=fake[:1])
    with pytest.raises(ValueError, match="CLIPSIM: 2 videos but 1 prompts"):
        score_files(fake, ClipSpec(10), clipsim=clipsim, prompts=["one"])
    with pytest.raises(ValueError, match="C3D takes 16-frame clips, got a clip length of 10"):
        score_files(fake, ClipSpec(10), inception=inception)
    assert not decodes


def test_clipsim_scores_whole_videos_of_any_length_and_fvd_still_needs_a_clip(tmp_path):
    """Videos shorter than the clip length: CLIPSIM alone scores them (every frame); with FVD the
    first one too short to give a clip is named."""
    from eval.video_io import VideoTooShort

    fake = _videos(tmp_path / "short", 2, seed=4, frames=8)
    clip = FrozenCLIP.load(build_tiny_clip(tmp_path / "clip"))
    fvd, clipsim, _ = _metrics(clip)
    score_files(fake, ClipSpec(16), clipsim=clipsim, prompts=["one", "two"])
    reference = CLIPSIM(clip)
    reference.update([torch.from_numpy(read_frames(p)[0]) for p in fake], ["one", "two"])
    assert clipsim.result(num_resamples=0).value == pytest.approx(reference.result(num_resamples=0).value, abs=1e-6)
    with pytest.raises(VideoTooShort, match=r"v0.mp4: 8 frames, shorter than one clip \(16 frames, stride 1\)"):
        score_files(fake, ClipSpec(16), clipsim=CLIPSIM(clip), prompts=["one", "two"], fvd=fvd,
                    real=_videos(tmp_path / "real", 2, seed=5))


def test_decoding_runs_a_bounded_number_of_clips_ahead(tmp_path, decodes):
    paths = _videos(tmp_path / "v", 10, seed=2, frames=4, size=16)
    clips = iter_clips(paths, ClipSpec(4), workers=2, ahead=3)
    first, _ = next(clips)
    deadline = time.monotonic() + 30
    while sum(decodes.values()) < 4 and time.monotonic() < deadline:  # the consumed clip + 3 ahead
        time.sleep(0.01)
    time.sleep(0.3)  # a slow consumer: the threads must not decode the rest of the list meanwhile
    assert first == str(paths[0]) and sum(decodes.values()) == 4
    assert [name for name, _ in clips] == [str(p) for p in paths[1:]]  # in order
    assert decodes == Counter({str(p): 1 for p in paths})

    decodes.clear()
    clips = iter_clips(paths, ClipSpec(4), workers=1, ahead=2)
    next(clips)
    clips.close()  # an early stop leaves the rest undecoded
    assert sum(decodes.values()) <= 3


def test_at_a_frame_rate_clipsim_scores_every_frame_and_fvd_the_resampled_clip(tmp_path, decodes):
    """With ClipSpec.fps and CLIPSIM, a fake video is still decoded once: CLIPSIM gets all its frames,
    FVD and the pictures the clip of it resampled to fps (the same FVD as without CLIPSIM, where the
    clip is read on its own); one too short at that rate is named with it."""
    from eval.sheets import GRID_TILE
    from eval.video_io import VideoTooShort

    (tmp_path / "fake").mkdir()
    ramp = np.arange(0, 256, 8, dtype=np.uint8)  # 32 frames, frame k at grey level 8 k
    fake = [write_mp4(np.broadcast_to(levels[:, None, None, None], (32, 32, 32, 3)), tmp_path / "fake" / f"{i}.mp4",
                      fps=30, crf=0) for i, levels in enumerate((ramp, ramp[::-1]))]
    real = _videos(tmp_path / "real", 2, seed=0, frames=24)  # 3 s at 8 fps
    prompts = ["a grey ramp", "a ramp down"]
    clip = FrozenCLIP.load(build_tiny_clip(tmp_path / "clip"))
    spec = ClipSpec(10, fps=15)
    fvd, clipsim, _ = _metrics(clip)
    kept: list = []
    score_files(fake, spec, fvd=fvd, real=real, real_spec=spec, clipsim=clipsim, prompts=prompts, keep_clips=kept)
    assert decodes == Counter({str(p): 1 for p in real + fake})
    shown = kept[0].reshape(10, -1).float().mean(1) / 8
    assert kept[0].shape == (10, GRID_TILE, GRID_TILE, 3) and shown.round().int().tolist() == list(range(0, 20, 2))

    reference = CLIPSIM(clip)
    reference.update([torch.from_numpy(read_frames(p)[0]) for p in fake], prompts)  # all 32 frames
    assert clipsim.result(num_resamples=0).value == pytest.approx(reference.result(num_resamples=0).value, abs=1e-6)
    alone = FrechetVideoDistance(load_i3d(None, batch_size=4))
    score_files(fake, spec, fvd=alone, real=real, real_spec=spec)
    assert fvd.result(num_resamples=0).value == pytest.approx(alone.result(num_resamples=0).value, rel=1e-6)
    with pytest.raises(VideoTooShort, match=r"0.mp4: 16 frames at 15 fps, shorter than one clip \(20 frames"):
        score_files(fake, ClipSpec(20, fps=15), fvd=FrechetVideoDistance(load_i3d(None, batch_size=4)), real=real,
                    clipsim=CLIPSIM(clip), prompts=prompts)
