"""Gaussian diffusion: noise schedule, training loss, fast samplers with classifier-free guidance.

The schedule and the samplers are diffusers' (DDPMScheduler for q(x_t|x_0),
DDIMScheduler and DPMSolverMultistepScheduler (DPM-Solver++) for sampling), so
the maths is theirs; this module only wires them to our denoisers.
A denoiser is `fn(x_t, t) -> prediction` (epsilon, v or x_0, per `prediction`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}
SAMPLERS = ("ddim", "dpm++")


class StaticallyClippedDPMSolver(DPMSolverMultistepScheduler):
    """DPM-Solver++ with its x0 prediction clipped to [-1, 1] each step. diffusers does that as dynamic
    thresholding with the quantile capped at sample_max_value = 1, i.e. a clamp, but computes the
    quantile over each sample anyway, and torch.quantile refuses more than 2^24 values (a
    3 x 86 x 256 x 256 clip)."""

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        return sample.clamp(-self.config.sample_max_value, self.config.sample_max_value)


class ScheduledDDIM(DDIMScheduler):
    """DDIM (eta 0) from each timestep of its schedule to the next one. diffusers' step goes back
    num_train_timesteps // steps, the trailing schedule's spacing only when the steps divide the
    timesteps: at 64 steps (the prior's) over 1000 (999, 983, 968, ...) every step landed off the
    grid and the last one on t = 0 instead of the clean sample. diffusers' x0 (from the prediction,
    clipped), then the noise re-derived from the clipped x0, as its use_clipped_model_output does."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> DDIMSchedulerOutput:
        x0 = super().step(model_output, timestep, sample).pred_original_sample
        later = self.timesteps[self.timesteps < timestep]
        a, a_prev = self.alphas_cumprod[timestep], (self.alphas_cumprod[later[0]] if len(later)
                                                    else self.final_alpha_cumprod)
        eps = (sample - a.sqrt() * x0) / (1 - a).sqrt()
        return DDIMSchedulerOutput(prev_sample=a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, pred_original_sample=x0)


class Diffusion:
    def __init__(self, timesteps: int = 1000, schedule: str = "squaredcos_cap_v2", prediction: str = "epsilon",
                 clip_sample: bool = True):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {prediction!r}")
        self.prediction = prediction
        self.clip_sample = clip_sample  # pixels live in [-1, 1]; CLIP embeddings do not
        self.schedule = DDPMScheduler(num_train_timesteps=timesteps, beta_schedule=schedule,
                                      prediction_type=PREDICTIONS[prediction], clip_sample=False)
        self.timesteps = timesteps

    # -- training ---------------------------------------------------------------
    # The schedule's arithmetic runs in float32 at least, whatever the batch's dtype: at a bf16-true
    # precision 1 - alpha_bar rounds to 0 in bf16 for the cosine schedule's first 21 timesteps
    # (x_t = x0: nothing to learn there), and v = alpha x noise - sigma x x0 loses its small term.
    def q_sample(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 noised to timestep t, in x0's dtype."""
        return self.schedule.add_noise(at_least_float32(x0), at_least_float32(noise), t).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "v":
            return self.schedule.get_velocity(at_least_float32(x0), at_least_float32(noise), t)
        return x0

    def loss(self, denoise: Denoiser, x0: torch.Tensor, noise: torch.Tensor | None = None,
             t: torch.Tensor | None = None) -> torch.Tensor:
        """Simple MSE on the chosen target at uniformly drawn timesteps (the net sees x_t in x0's dtype)."""
        wide = at_least_float32(x0)  # widened once here: q_sample and target then widen nothing
        noise = torch.randn_like(wide) if noise is None else noise
        if t is None:
            t = torch.randint(0, self.timesteps, (x0.shape[0],), device=x0.device)
        pred = denoise(self.q_sample(wide, noise, t).to(x0.dtype), t)
        return F.mse_loss(pred.float(), self.target(wide, noise, t).float())

    # -- sampling ---------------------------------------------------------------
    def sampler(self, name: str = "ddim"):
        common = dict(num_train_timesteps=self.timesteps, beta_schedule=self.schedule.config.beta_schedule,
                      prediction_type=PREDICTIONS[self.prediction], timestep_spacing="trailing")
        if name == "ddim":
            return ScheduledDDIM(**common, clip_sample=self.clip_sample, set_alpha_to_one=True)
        if name == "dpm++":
            # pixels: clip x0 each step as DDIM does (sample_max_value 1 = static clipping); cosine schedule
            # with epsilon: skip the t~999 end where x0 = (x - sigma eps) / alpha divides by alpha ~ 5e-5
            return StaticallyClippedDPMSolver(**common, algorithm_type="dpmsolver++", solver_order=2,
                                              lower_order_final=True, thresholding=self.clip_sample,
                                              sample_max_value=1.0, lambda_min_clipped=-5.1)
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")

    @torch.no_grad()
    def sample(self, denoise: Denoiser, noise: torch.Tensor, steps: int = 25, sampler: str = "ddim") -> torch.Tensor:
        """Run the reverse process from `noise` (fixes the randomness: same noise, same result)."""
        if steps > self.timesteps:  # DPM-Solver++ would repeat timesteps and divide by zero: NaN, no error
            raise ValueError(f"{steps} sampling steps: the schedule has {self.timesteps} timesteps, "
                             f"so at most {self.timesteps} steps")
        scheduler = self.sampler(sampler)
        scheduler.set_timesteps(steps, device=noise.device)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            pred = denoise(x, t.expand(x.shape[0]).to(noise.device)).float()
            x = scheduler.step(pred, t, x).prev_sample
        return x.clamp(-1, 1) if self.clip_sample else x


def guided(denoise_cond: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor], guidance: float) -> Denoiser:
    """Classifier-free guidance: uncond + g * (cond - uncond). g == 1 skips the unconditional pass."""
    def denoise(x, t):
        cond = denoise_cond(x, t, True)
        if guidance == 1.0:
            return cond
        uncond = denoise_cond(x, t, False)
        return uncond + guidance * (cond - uncond)
    return denoise


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or as it is if wider (float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def one_each(generators: list[torch.Generator], videos: int) -> None:
    if len(generators) != videos:
        raise ValueError(f"{len(generators)} generators for {videos} videos: give one per video")


def per_video_noise(shape, generators: list[torch.Generator], device) -> torch.Tensor:
    """[B, *shape] noise, video i's from generators[i] (drawn on the CPU: the same numbers on every device)."""
    return torch.stack([torch.randn(*shape, generator=g) for g in generators]).to(device)
