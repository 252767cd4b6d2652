"""CLIPSIM: the raw mean cosine over frames then videos, computed independently here."""
import pytest
import torch
import torch.nn.functional as F

from eval.clipsim import CLIPSIM
from models.clip import FrozenCLIP, build_tiny_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return FrozenCLIP.load(build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny"))


def test_clipsim_is_mean_over_frames_then_videos(clip):
    gen = torch.Generator().manual_seed(0)
    videos = [torch.randint(0, 256, (t, 24, 40, 3), dtype=torch.uint8, generator=gen) for t in (3, 5)]
    prompts = ["a person playing guitar", "a dog running through a field"]
    m = CLIPSIM(clip)
    m.update(videos, prompts)

    # independent: per-frame cosines via torch.cosine_similarity on unnormalised features
    expected = []
    for v, p in zip(videos, prompts):
        text = clip.model.text_projection(clip.model.text_model(**clip.tokenizer([p], return_tensors="pt")).pooler_output)
        pix = clip.preprocess(v.permute(0, 3, 1, 2).float() / 255)
        img = clip.model.visual_projection(clip.model.vision_model(pixel_values=pix).pooler_output)
        expected.append(F.cosine_similarity(img, text).mean())
    expected = torch.stack(expected).mean().double()
    # videos of different lengths weigh equally (mean over frames first)
    assert float(m.compute()) == pytest.approx(float(expected), abs=1e-5)
    assert -1 <= float(m.compute()) <= 1  # raw cosine: no x100

    r = m.result(num_resamples=200)
    assert r.smoke and "(smoke)" in str(r) and r.num_videos == 2
    assert r.low <= r.value <= r.high


def test_negative_cosine_is_not_clamped(clip):
    m = CLIPSIM(clip)
    video = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    m.update([video], ["x"])
    score = float(m.compute())
    m2 = CLIPSIM(clip)
    # same video, the text embedding negated: cosine flips sign (torchmetrics would clamp at 0)
    m2.clip.model.text_projection.weight.data.neg_()
    m2.update([video], ["x"])
    m2.clip.model.text_projection.weight.data.neg_()
    assert float(m2.compute()) == pytest.approx(-score, abs=1e-6)


def test_mismatched_prompts_and_bad_video(clip):
    m = CLIPSIM(clip)
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        m.update([torch.zeros(2, 8, 8, 3, dtype=torch.uint8)] * 2, ["a"])
    with pytest.raises(ValueError, match="clip7.mp4: expected uint8"):
        m.update([torch.zeros(2, 8, 8, 3)], ["a"], names=["clip7.mp4"])
    with pytest.raises(ValueError, match="no videos"):
        CLIPSIM(clip).compute()
