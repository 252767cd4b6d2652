"""Pseudo-3D layers, the U-Net on images and videos, and inflation equivalence."""
import pytest
import torch

from models.inflate import inflate, widen_input
from models.layers import Attention, PseudoConv3d, TemporalAttention
from models.unet import UNet

TINY = dict(channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,), heads=2, dim_head=8, groups=8)


def perturb_(model):
    """Stand-in for training: every weight random (zero-init layers included)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_pseudo_conv_temporal_is_identity_at_init():
    conv = PseudoConv3d(3, 8, temporal=True)
    x = torch.randn(2 * 5, 3, 6, 6)
    assert torch.equal(conv(x, frames=5), conv.spatial(x))
    assert torch.count_nonzero(conv.temporal.bias) == 0


def test_temporal_attention_is_identity_at_init_but_not_after_training():
    attn = TemporalAttention(8, heads=2, dim_head=4)
    x = torch.randn(2 * 4, 8, 3, 3)
    assert torch.equal(attn(x, frames=4), x)
    perturb_(attn)
    assert not torch.allclose(attn(x, frames=4), x)


def test_matmul_attention_equals_scaled_dot_product_attention():
    """Attention over frames runs as two matmuls (faster on a GPU for 16 tokens): the same
    attention as the fused kernels, forward and backward, with the same weights."""
    torch.manual_seed(0)
    fused = Attention(16, heads=2, dim_head=8)
    matmuls = Attention(16, heads=2, dim_head=8, kernels=None)
    matmuls.load_state_dict(fused.state_dict())
    x = torch.randn(6, 16, 16, requires_grad=True)
    y_fused, y_matmuls = fused(x), matmuls(x)
    torch.testing.assert_close(y_matmuls, y_fused, rtol=1e-5, atol=1e-6)
    (grad_fused,) = torch.autograd.grad(y_fused.square().sum(), x)
    (grad_matmuls,) = torch.autograd.grad(y_matmuls.square().sum(), x)
    torch.testing.assert_close(grad_matmuls, grad_fused, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_temporal_attention_stays_matmuls():
    """Attention over frames must come out of the compiler as batched matmuls, forward and
    backward, not as scaled_dot_product_attention (which inductor's pattern matcher substitutes
    for softmax(q @ k^T) @ v where it matches): its fused kernels are 1.5-3.7x slower over 16
    frames (bench/RESULTS.md)."""
    from torch._inductor.utils import run_and_get_code

    # the base decoder's heads and 16 frames
    attn = perturb_(TemporalAttention(64, heads=8, dim_head=64))
    x = torch.randn(2 * 16, 64, 2, 2, requires_grad=True)
    compiled = torch.compile(attn)
    _, code = run_and_get_code(lambda: compiled(x, 16).sum().backward())
    code = "\n".join(code)
    assert "scaled_dot_product" not in code and "sdpa" not in code
    assert code.count("extern_kernels.bmm") == 6  # 2 forward, 4 backward


@pytest.mark.slow
def test_compiled_channels_last_unet_equals_eager():
    """compile_blocks(channels_last=True), as trainer.compile + trainer.channels_last train: each
    block compiled with inductor's channels_last layout forced gives the eager video U-Net's
    output and gradients."""
    # one level: fewer distinct block shapes to compile (each ~5 s cold on the CPU), one of them an
    # up-path ResBlock with twice as many input channels as outputs (the skip concatenation)
    small = {**TINY, "channel_mults": (1,), "attn_levels": (0,)}
    torch.manual_seed(0)
    eager = perturb_(UNet(in_channels=3, cond_dim=16, temporal=True, **small)).to(memory_format=torch.channels_last)
    compiled = UNet(in_channels=3, cond_dim=16, temporal=True, **small).to(memory_format=torch.channels_last)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks(channels_last=True)
    x = torch.randn(2, 3, 4, 16, 16)
    t, emb, fps = torch.tensor([10, 500]), torch.randn(2, 16), torch.tensor([4.0, 8.0])
    outputs, grads = [], []
    for net in (eager, compiled):
        x_ = x.clone().requires_grad_()
        y = net(x_, t, emb, fps)
        (grad,) = torch.autograd.grad(y.square().sum(), x_)
        outputs.append(y.detach())
        grads.append(grad)
    assert compiled.down[0][0]._compiled_call_impl is not None
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temporal", [False, True])
def test_unet_shapes_for_images_and_videos(temporal):
    net = UNet(in_channels=3, cond_dim=16, temporal=temporal, **TINY)
    img = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 500])
    assert net(img, t, torch.randn(2, 16)).shape == (2, 3, 16, 16)
    vid = torch.randn(2, 3, 5, 16, 16)
    out = net(vid, t, torch.randn(2, 16), fps=torch.tensor([4.0, 8.0]))
    assert out.shape == (2, 3, 5, 16, 16)


def test_image_model_has_no_temporal_parameters():
    assert not UNet(**TINY).temporal_parameters()
    assert UNet(temporal=True, **TINY).temporal_parameters()


@pytest.mark.parametrize("in_channels,cond_dim,noise_level_cond", [(3, 16, False), (6, 0, True)],
                         ids=["decoder", "super_resolution"])
def test_inflated_video_model_equals_image_model_per_frame(in_channels, cond_dim, noise_level_cond):
    image = perturb_(UNet(in_channels=in_channels, cond_dim=cond_dim, noise_level_cond=noise_level_cond, **TINY)).eval()
    video = inflate(image).eval()
    b, f = 2, 5
    x = torch.randn(b, in_channels, f, 16, 16)
    t = torch.tensor([3, 700])
    emb = torch.randn(b, cond_dim) if cond_dim else None
    level = torch.tensor([0.0, 300.0]) if noise_level_cond else None  # how noised the low-res channels are
    with torch.no_grad():
        out_video = video(x, t, emb, fps=torch.tensor([2.0, 24.0]), noise_level=level)
        per_frame = torch.stack([image(x[:, :, i], t, emb, noise_level=level) for i in range(f)], dim=2)
        if noise_level_cond:  # the level is an input of both
            assert (image(x[:, :, 0], t, emb) - per_frame[:, :, 0]).abs().max() > 1e-3
    assert out_video.abs().max() > 1e-3  # a real, non-trivial output
    assert (out_video - per_frame).abs().max() <= 1e-5
    # and training the temporal layers breaks the equivalence (the test can fail)
    perturb_(video)
    with torch.no_grad():
        assert (video(x, t, emb, fps=torch.tensor([2.0, 24.0]), noise_level=level) - per_frame).abs().max() > 1e-3


def test_widened_input_ignores_new_channels_at_init():
    net = perturb_(UNet(in_channels=3, cond_dim=16, temporal=True, **TINY)).eval()
    wide = UNet(**{**net.kwargs, "in_channels": 7}).eval()
    wide.load_state_dict(widen_input(net.state_dict(), 7))
    x = torch.randn(1, 3, 4, 16, 16)
    extra = torch.randn(1, 4, 4, 16, 16)
    t, emb = torch.tensor([100]), torch.randn(1, 16)
    with torch.no_grad():
        assert torch.allclose(wide(torch.cat([x, extra], 1), t, emb), net(x, t, emb), atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = UNet(cond_dim=16, temporal=True, **TINY)
    b = UNet(**{**a.kwargs, "grad_checkpoint": True})
    b.load_state_dict(a.state_dict())
    perturb_(a), perturb_(b)
    x, t, e, fps = torch.randn(1, 3, 3, 8, 8), torch.tensor([5]), torch.randn(1, 16), torch.tensor([4.0])
    a(x, t, e, fps).square().mean().backward()
    b(x, t, e, fps).square().mean().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6)
