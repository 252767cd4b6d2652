"""I3D: layout of the reference state dict, any T >= 9 / frame size, weights loading, FVD on video."""
from __future__ import annotations

import hashlib

import pytest
import torch

from eval.fvd import FrechetVideoDistance
from eval.i3d import InceptionI3d, Unit3D, load_i3d
from eval.weights import ChecksumError, WeightsDownloadError
from tests.http_faults import FaultServer


@pytest.fixture(scope="module")
def detector():
    return load_i3d(seed=0)


def test_state_dict_layout_matches_piergiaj():
    keys = InceptionI3d().state_dict().keys()
    # names from piergiaj/pytorch-i3d (i3d_pretrained_400.pt as used by VideoGPT/TATS/cd-fvd)
    for k in ["Conv3d_1a_7x7.conv3d.weight", "Conv3d_1a_7x7.bn.running_var", "Conv3d_2c_3x3.conv3d.weight",
              "Mixed_3b.b0.conv3d.weight", "Mixed_4f.b1b.bn.bias", "Mixed_5c.b3b.conv3d.weight",
              "Mixed_5c.b2b.bn.running_mean", "logits.conv3d.weight", "logits.conv3d.bias"]:
        assert k in keys
    assert not any(".b3a." in k for k in keys)  # the pool branch has no weights
    assert sum(p.numel() for p in InceptionI3d().parameters()) == 12_697_264
    assert InceptionI3d().logits.conv3d.weight.shape == (400, 1024, 1, 1, 1)


def test_static_padding_equals_tf_same_padding():
    torch.manual_seed(0)
    u = Unit3D(4, 5, (3, 3, 3)).eval()
    x = torch.randn(1, 4, 5, 7, 6)
    fast = u(x)
    u.static, u.conv3d.padding = False, (0, 0, 0)  # the reference's dynamic F.pad path
    torch.testing.assert_close(u(x), fast)


@pytest.mark.parametrize("shape", [(2, 9, 17, 23), (1, 13, 64, 48)])
def test_any_length_from_9_and_any_frame_size(detector, shape):
    video = torch.randint(0, 256, (*shape, 3), dtype=torch.uint8)
    feats = detector(video)
    assert feats.shape == (shape[0], 400) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and feats.std() > 0
    with pytest.raises(ValueError, match="at least 9 frames"):
        detector(video[:, :8])


def test_weights_from_state_dict_and_torchscript(tmp_path, detector, monkeypatch):
    monkeypatch.setenv("MAV_WEIGHTS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(detector.net.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_i3d(path, sha256=digest)
    assert not loaded.smoke and loaded.checksum == digest and loaded.kind == "state_dict"
    video = torch.randint(0, 256, (1, 9, 32, 32, 3), dtype=torch.uint8)
    torch.testing.assert_close(loaded(video), detector(video))
    with pytest.raises(ChecksumError, match=r"i3d_pretrained_400.pt: sha256 mismatch"):
        load_i3d(path, sha256="0" * 64)
    with pytest.raises(ChecksumError):  # also through the URL path + cache
        load_i3d(path.as_uri(), sha256="1" * 64)
    # URL download (file:// and a real HTTP server), verified and cached
    cached = load_i3d(path.as_uri(), sha256=digest)
    assert cached.checksum == digest
    assert list((tmp_path / "cache").rglob("i3d_pretrained_400.pt"))
    assert not list((tmp_path / "cache").rglob(".tmp-*"))  # failed download left nothing behind
    data = path.read_bytes()
    with FaultServer({"/w/i3d.pt": ("ok", data), "/w/cut.pt": ("cut", data), "/w/gone.pt": ("404", b"")}) as srv:
        over_http = load_i3d(f"{srv.base}/w/i3d.pt", sha256=digest)
        assert over_http.checksum == digest and srv.hits["/w/i3d.pt"] == 1
        assert load_i3d(f"{srv.base}/w/i3d.pt", sha256=digest).checksum == digest  # cached: no second request
        assert srv.hits["/w/i3d.pt"] == 1
        with pytest.raises(WeightsDownloadError, match=r"/w/cut.pt: download cut short \(\d+ of \d+ bytes\)"):
            load_i3d(f"{srv.base}/w/cut.pt")  # no checksum to catch it: the length does
        with pytest.raises(WeightsDownloadError, match=r"/w/gone.pt: download failed \(HTTP Error 404"):
            load_i3d(f"{srv.base}/w/gone.pt")
    assert not list((tmp_path / "cache").rglob("cut.pt")) and not list((tmp_path / "cache").rglob(".tmp-*"))

    class StyleGANVLike(torch.nn.Module):  # same call signature as i3d_torchscript.pt
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = False) -> torch.Tensor:
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            y = x.float() / 127.5 - 1 if rescale else x.float()
            return y.mean(dim=(2, 3, 4), keepdim=False)[:, :1].repeat(1, 400) * (1 if return_features else 0)

    ts = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(StyleGANVLike()).save(str(ts))
    scripted = load_i3d(ts)
    assert scripted.kind == "torchscript" and not scripted.smoke
    out = scripted(torch.full((2, 9, 20, 30, 3), 255, dtype=torch.uint8))
    assert out.shape == (2, 400) and torch.allclose(out, torch.ones(2, 400))


def test_bad_state_dict_is_rejected(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="other.pt: not an InceptionI3d"):
        load_i3d(path)
    from eval.i3d import InceptionI3d

    state = InceptionI3d().state_dict()  # the right layout, another head (Charades: 157 classes)
    state = {k: (torch.zeros(157, *v.shape[1:]) if k.startswith("logits") and v.dim() else v) for k, v in state.items()}
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"other.pt: not an InceptionI3d\(400\) .*\(logits\.conv3d\.weight: checkpoint \(157, "):
        load_i3d(path)
    torch.save({**state, "logits.conv3d.bias": 0.0}, path)  # a number where a tensor belongs: named, no crash
    with pytest.raises(ValueError, match=r"other.pt: not an InceptionI3d\(400\) .*logits\.conv3d\.bias: checkpoint \(\) "):
        load_i3d(path)


def test_fvd_on_real_clips_zero_for_self_and_grows_with_noise(detector, shared_videos):
    from eval.video_io import read_video

    source = shared_videos / "carphone_pristine.mp4"
    clips = torch.stack([torch.from_numpy(read_video(source, 9, 1, o)) for o in (0, 40, 80)])
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(clips.shape, generator=gen)
    real = detector(clips)

    def fvd_with(fake_feats):
        m = FrechetVideoDistance(detector, keep_features=False)
        m.update(features=real, real=True)
        m.update(features=fake_feats, real=False)
        return float(m.compute())

    assert fvd_with(detector(clips)) <= 1e-6
    noisy = [fvd_with(detector((clips + s * noise).clamp(0, 255).to(torch.uint8))) for s in (8, 64)]
    assert 0 < noisy[0] < noisy[1], noisy


def test_a_torchscript_of_another_kind_is_named_as_it_loads(tmp_path):
    """A TorchScript file that is not StyleGAN-V's I3D failed deep inside the scoring with a raw
    TorchScript trace; it is tried on one tiny video as it loads and named, with the reason."""
    class OtherHead(torch.nn.Module):  # the call signature of i3d_torchscript.pt, 10 outputs
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = False) -> torch.Tensor:
            return x.float().mean(dim=(2, 3, 4))[:, :1].repeat(1, 10)

    linear, other = tmp_path / "linear.pt", tmp_path / "other.pt"
    torch.jit.script(torch.nn.Linear(3, 3)).save(str(linear))
    torch.jit.script(OtherHead()).save(str(other))
    with pytest.raises(ValueError, match=rf"^weights {linear}: not StyleGAN-V's i3d_torchscript.pt \(forward\(\) "
                                         r"expected at most 2 argument\(s\) but received 5 argument\(s\)\. [^\n]+\)$"):
        load_i3d(linear)
    with pytest.raises(ValueError, match=rf"^weights {other}: not StyleGAN-V's i3d_torchscript.pt \(gives \(1, 10\) "
                                         r"for one video, not \[1, 400\] features\)$"):
        load_i3d(other)
