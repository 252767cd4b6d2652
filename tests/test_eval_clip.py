"""models.clip: the tiny local CLIP builds, loads frozen and embeds text and images."""
import pytest
import torch

from models.clip import FrozenCLIP, build_tiny_clip


def test_tiny_clip_roundtrip(tmp_path):
    path = build_tiny_clip(tmp_path / "clip", seed=0)
    clip = FrozenCLIP.load(path)
    assert clip.is_tiny
    assert not clip.training and not clip.model.training
    assert all(not p.requires_grad for p in clip.parameters())
    clip.train()  # a parent calling .train() must not unfreeze it
    assert not clip.model.training

    # the tokenizer is a real BPE: known words become single tokens, unknown ones still encode
    assert clip.tokenizer.tokenize("a person playing guitar") == ["a</w>", "person</w>", "playing</w>", "guitar</w>"]
    emb, tokens, mask = clip.encode_text(["a person playing guitar", "zxqv wub"])
    assert emb.shape == (2, clip.embed_dim)
    assert tokens.shape == (2, 77, clip.text_width)
    # BOS + 4 words + EOS are the first caption's tokens; the other 71 places are padding
    assert mask.dtype == torch.bool and mask[0].tolist() == [True] * 6 + [False] * 71
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(emb[0], emb[1])

    images = torch.rand(5, 3, 40, 70)  # any size: resized + centre-cropped internally
    img = clip.encode_images(images)
    assert img.shape == (5, clip.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(5))
    # batching does not change results
    torch.testing.assert_close(clip.encode_images(images, batch_size=2), img, atol=1e-5, rtol=1e-5)

    # same seed -> same weights -> same embeddings
    again = FrozenCLIP.load(build_tiny_clip(tmp_path / "clip2", seed=0))
    torch.testing.assert_close(again.encode_images(images), img)


def test_preprocessing_matches_clips_image_processor(tmp_path):
    """Short side to the image size with the long side truncated (320x240 -> 298x224, not 299),
    bicubic, centre crop, normalise: CLIPImageProcessor as configured for OpenAI's CLIP."""
    import numpy as np
    import torch.nn.functional as F

    from models.clip import OPENAI_MEAN, OPENAI_STD, _image_processor_class

    clip = FrozenCLIP.load(build_tiny_clip(tmp_path / "tiny"))
    s = clip.image_size
    processor = _image_processor_class()(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                         image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD), resample=3)
    smooth = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 30, 40)).astype(np.float32))
    for height, width in ((240, 320), (320, 240), (250, 250)):
        image = F.interpolate(smooth[None], size=(height, width), mode="bilinear")[0].round().clamp(0, 255)
        reference = torch.from_numpy(np.asarray(processor(images=[image.permute(1, 2, 0).byte().numpy()],
                                                          return_tensors="np")["pixel_values"]))
        ours = clip.preprocess(image[None] / 255)
        assert ours.shape == reference.shape == (1, 3, s, s)
        assert (ours - reference).abs().mean() < 0.01, (height, width)  # PIL vs torch bicubic differ slightly


def test_a_clip_that_does_not_load_is_one_clear_error(tmp_path):
    from models.clip import FrozenCLIP
    from models.clip_source import CLIPLoadError

    with pytest.raises(CLIPLoadError, match=r"CLIP '\S+/nowhere': no such folder"):
        FrozenCLIP.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CLIPLoadError, match=r"CLIP '\S+/empty' cannot be loaded \(.*\); give a folder") as err:
        FrozenCLIP.load(tmp_path / "empty")
    assert "\n" not in str(err.value)
