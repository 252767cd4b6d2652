"""models.clip: the tiny local CLIP builds, loads frozen and embeds text and images."""
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
    emb, tokens = clip.encode_text(["a person playing guitar", "zxqv wub"])
    assert emb.shape == (2, clip.embed_dim)
    assert tokens.shape == (2, 77, clip.text_width)
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
