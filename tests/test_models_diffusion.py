"""Noise schedule, targets, samplers (determinism, guidance)."""
import pytest
import torch

from models.diffusion import Diffusion, guided
from models.unet import UNet

TINY = dict(channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,), heads=2, dim_head=8, groups=8)


def test_v_and_epsilon_targets_recover_x0():
    d = Diffusion(timesteps=1000, prediction="v")
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, noise, t)
    a = d.schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - d.schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(a * x_t - s * d.target(x0, noise, t), x0, atol=1e-5)
    assert torch.equal(Diffusion(prediction="epsilon").target(x0, noise, t), noise)


def test_a_bf16_batch_is_noised_and_its_target_computed_in_float32():
    """At bf16-true the batch is bf16. Noised in bf16, 1 - alpha_bar rounds to 0 for the cosine
    schedule's first 21 timesteps: x_t was x0 there, with nothing to denoise."""
    d = Diffusion(timesteps=1000, schedule="squaredcos_cap_v2", prediction="v")
    x0, noise = torch.rand(1000, 64) * 2 - 1, torch.randn(1000, 64)
    t = torch.arange(1000)
    x_t = d.q_sample(x0.bfloat16(), noise.bfloat16(), t)
    assert x_t.dtype == torch.bfloat16
    assert not (x_t == x0.bfloat16()).all(1).any()
    exact = d.q_sample(x0.bfloat16().float(), noise.bfloat16().float(), t)
    torch.testing.assert_close(x_t.float(), exact, atol=0, rtol=2**-8)  # only the final rounding to bf16
    target = d.target(x0.bfloat16(), noise.bfloat16(), t)
    torch.testing.assert_close(target, d.target(x0.bfloat16().float(), noise.bfloat16().float(), t))


def test_perfect_denoiser_has_zero_loss_and_sampler_returns_data():
    """An oracle epsilon-predictor: loss 0, and sampling lands on the data point."""
    d = Diffusion(prediction="epsilon", clip_sample=False)
    x0 = torch.full((2, 3, 4, 4), 0.5)

    def oracle(x_t, t):
        a = d.schedule.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    assert d.loss(oracle, x0).item() < 1e-8
    for sampler in ("ddim", "dpm++"):
        out = d.sample(oracle, torch.randn(2, 3, 4, 4), steps=10, sampler=sampler)
        assert torch.allclose(out, x0, atol=1e-3), sampler


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("steps", [7, 15, 64])
def test_ddim_steps_along_its_schedule_when_the_steps_do_not_divide_the_timesteps(prediction, steps):
    """diffusers' DDIM steps back timesteps // steps: at 64 steps over 1000 (999, 983, ...) each step
    left the schedule and the last ended on t = 0, so an exact denoiser's sample was off by 0.02."""
    d = Diffusion(prediction=prediction, clip_sample=False)
    x0 = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    denoise = gaussian_denoiser(d, x0, 0.0)  # a point mass: the oracle
    out = d.sample(denoise, torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)), steps, "ddim")
    assert (out - x0).abs().max() < 1e-5


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_step_is_diffusers_where_their_spacing_is_the_schedules(prediction):
    """25 steps over 1000: diffusers' own step (clipped x0, use_clipped_model_output) to float rounding."""
    from diffusers import DDIMScheduler

    d = Diffusion(prediction=prediction)
    ours, theirs = d.sampler("ddim"), DDIMScheduler(**d.sampler("ddim").config)
    ours.set_timesteps(25), theirs.set_timesteps(25)
    g = torch.Generator().manual_seed(0)
    x, pred = torch.randn(2, 3, 4, 4, generator=g) * 2, torch.randn(2, 3, 4, 4, generator=g)
    for t in ours.timesteps[[0, 12, -1]]:
        expected = theirs.step(pred, t, x, use_clipped_model_output=True).prev_sample
        assert torch.allclose(ours.step(pred, t, x).prev_sample, expected, atol=1e-5), int(t)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_sampler_is_deterministic_with_seed_and_guidance_matters(sampler):
    torch.manual_seed(0)
    net = UNet(cond_dim=8, **TINY).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = Diffusion(prediction="v")
    emb = torch.randn(1, 8)

    def cond(x, t, use_cond):
        return net(x, t, emb if use_cond else torch.zeros_like(emb))

    def run(seed, g):
        noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        return d.sample(guided(cond, g), noise, steps=4, sampler=sampler)

    a, b = run(0, 3.0), run(0, 3.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, run(1, 3.0))
    assert (a - run(0, 1.0)).abs().max() > 1e-4  # guidance changes the output
    assert a.abs().max() <= 1.0


def test_unknown_sampler_and_prediction_are_errors():
    with pytest.raises(ValueError, match="prediction"):
        Diffusion(prediction="x0")
    with pytest.raises(ValueError, match="sampler"):
        Diffusion().sampler("euler")


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_more_steps_than_timesteps_is_an_error_not_a_nan_sample(sampler):
    """DPM-Solver++ asked for more steps than the schedule's timesteps repeated a timestep and returned
    NaN (a black video) without a word; DDIM's error came from diffusers. As many steps as timesteps works."""
    d = Diffusion(timesteps=100, prediction="v")
    denoise = gaussian_denoiser(d, 0.5, 0.25)
    assert torch.isfinite(d.sample(denoise, torch.randn(2, 3, 2, 2), 100, sampler)).all()
    with pytest.raises(ValueError, match="101 sampling steps: the schedule has 100 timesteps, so at most 100 steps"):
        d.sample(denoise, torch.randn(2, 3, 2, 2), 101, sampler)


def gaussian_denoiser(d: Diffusion, mean: float, std: float, bf16: bool = False):
    """The exact denoiser for data ~ N(mean, std^2) per pixel, in `d`'s prediction (optionally
    rounded to bf16, as a network under autocast returns it)."""
    ac = d.schedule.alphas_cumprod.double()

    def denoise(x, t):
        a = ac[t.long()].sqrt().view(-1, *[1] * (x.dim() - 1))
        s = (1 - ac[t.long()]).sqrt().view(-1, *[1] * (x.dim() - 1))
        x0 = mean + a * std**2 / (a**2 * std**2 + s**2) * (x.double() - a * mean)
        eps = (x.double() - a * x0) / s
        pred = {"v": a * eps - s * x0, "epsilon": eps, "sample": x0}[d.prediction]
        return pred.to(torch.bfloat16).float() if bf16 else pred.float()
    return denoise


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_strong_guidance_stays_near_the_conditional_data(sampler):
    """Guidance 5 between two Gaussians: each step clips the predicted clean image to [-1, 1] and
    continues from it (DDIM kept the unclipped noise estimate and ran off to -1 everywhere)."""
    d = Diffusion(prediction="v")
    cond, uncond = gaussian_denoiser(d, 0.6, 0.25), gaussian_denoiser(d, 0.0, 0.5)
    noise = torch.randn(500, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    out = d.sample(guided(lambda x, t, use: (cond if use else uncond)(x, t), 5.0), noise, 25, sampler)
    assert 0.6 < out.mean() < 1.0 and (out.abs() > 0.999).float().mean() < 0.05
    assert d.sampler("dpm++").config.thresholding and not Diffusion(clip_sample=False).sampler("dpm++").config.thresholding


def test_dpm_solver_clips_like_diffusers_thresholding_and_takes_long_clips():
    """sr_low samples a whole clip in one sampler call: 3 x 86 x 256 x 256 values per sample, more
    than torch.quantile (diffusers' thresholding) takes; the clamp gives the same steps."""
    from diffusers import DPMSolverMultistepScheduler

    d = Diffusion(prediction="v")
    x0 = torch.randn(3, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    theirs = DPMSolverMultistepScheduler(**d.sampler("dpm++").config)
    assert torch.equal(d.sampler("dpm++")._threshold_sample(x0), theirs._threshold_sample(x0))
    assert x0.abs().max() > 1
    out = d.sample(lambda x, t: torch.zeros_like(x), torch.randn(1, 3, 86, 256, 256), 2, "dpm++")
    assert out.shape == (1, 3, 86, 256, 256) and torch.isfinite(out).all()


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_bf16_predictions_sample_the_data_spread(prediction):
    """With the cosine schedule, x0 = (x - sigma eps) / alpha divides by alpha ~ 5e-5 at t = 999:
    bf16 rounding of an epsilon prediction doubled the spread of the samples. DPM-Solver++ starts
    where lambda >= -5.1 instead."""
    d = Diffusion(prediction=prediction)
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = d.sample(gaussian_denoiser(d, 0.3, 0.2, bf16=True), noise, 25, "dpm++")
    assert out.mean().item() == pytest.approx(0.3, abs=0.02) and out.std().item() == pytest.approx(0.2, rel=0.08)
