"""The sampling chain: text -> P -> D^t -> ↑F -> SR^t_l -> SR_h -> mp4 (+ gif).

    prior          prompt -> CLIP image embedding
    decoder        embedding + fps -> `sampling.frames` frames (16) at the decoder size
    interpolation  skip s (5): 16 -> (16 - 1) * s + 1 = 76 frames, fps * s
    sr_low         spatiotemporal upsampling of the whole clip (overlapping windows of its training
                   length, their predictions averaged at every step)
    sr_high        per frame, the SAME initial noise for every frame (keeps detail from flickering)

Only prior and decoder are required; a stage without a checkpoint is skipped.
↑F runs on windows shaped like its training clips: each window has a known frame
every `skip` frames (its first and last frame known), windows share their end frames,
and known frames are copied through exactly.
"""
from __future__ import annotations

import json
import math
import warnings

from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange, repeat

from data_prep.atomic import atomic_write_json
from models.compat import CLIP_STAGES
from models.diffusion import one_each, per_video_noise
from models.stages import DiffusionStage, InterpolationStage, load_stage
from models.video_io import write_gif, write_mp4

CHAIN = ("prior", "decoder", "interpolation", "sr_low", "sr_high")


@dataclass
class SampleResult:
    prompt: str
    mp4: Path
    gif: Path | None
    frames: torch.Tensor  # uint8 [T,H,W,3]
    fps: float
    seed: int  # its generator's: alone with this seed, the prompt gives this video again


def load_chain(checkpoints: dict[str, str | Path], device: str | torch.device = "cpu") -> dict[str, DiffusionStage]:
    unknown = set(checkpoints) - set(CHAIN)
    if unknown:
        raise ValueError(f"unknown stages in checkpoints: {sorted(unknown)}; stages are {', '.join(CHAIN)}")
    for required in ("prior", "decoder"):
        if required not in checkpoints:
            raise ValueError(f"sampling needs a {required} checkpoint")
    chain = {stage: load_stage(path, stage, device) for stage, path in checkpoints.items() if path}
    if not chain["decoder"].config.video:
        raise ValueError(f"the decoder checkpoint ({checkpoints['decoder']}) is an image decoder; sample with the "
                         "inflated (mode: video) one")
    if "sr_low" in chain and not chain["sr_low"].config.video:  # works, but is not the paper's SR^t_l
        warnings.warn(f"the sr_low checkpoint ({checkpoints['sr_low']}) is an image-mode one: it super-resolves "
                      "frame by frame, without temporal layers (expect flicker); the inflated (mode: video) "
                      "one is SR^t_l", stacklevel=2)
    decoded = chain["decoder"].config.data.size
    if "interpolation" in chain and chain["interpolation"].config.data.size != decoded:
        # it runs at whatever size the decoder makes (convolutions), not at the size it learned
        warnings.warn(f"the interpolation checkpoint ({checkpoints['interpolation']}) trained on "
                      f"{chain['interpolation'].config.data.size} px frames and the decoder makes {decoded} px ones: "
                      "it interpolates at the decoder's size; train both at one data.size", stacklevel=2)
    # the prior's output is a CLIP image embedding: the stages it feeds must read the same CLIP's space
    clips = {stage: chain[stage].config.clip for stage in CLIP_STAGES if stage in chain}
    if len(set(clips.values())) > 1:
        raise ValueError(f"the checkpoints were trained with different CLIP models ({clips}); the prior's "
                         "embeddings only mean something to stages trained with its CLIP")
    return chain


def seeded(seed: int, n: int) -> list[torch.Generator]:
    """One generator per video, video i's seeded `seed + i` (diffusers' convention): a video's noise
    is its own, the same whatever the batch it is sampled in and its place there."""
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def interpolate_frames(net: InterpolationStage, video: torch.Tensor, image_emb: torch.Tensor, fps: float,
                       skip: int, generators: list[torch.Generator], steps=None, guidance=None) -> torch.Tensor:
    """[B,3,T,H,W] -> [B,3,(T-1)*skip+1,H,W]; video i's noise from generators[i]."""
    b, c, t, h, w = video.shape
    if t < 2:
        raise ValueError(f"frame interpolation needs at least 2 frames, the decoder made {t}")
    one_each(generators, b)
    known_per_window = min(t, max(2, (net.config.data.frames - 1) // skip + 1))
    n_windows = -(-(t - 1) // (known_per_window - 1))
    starts = [min(i * (known_per_window - 1), t - known_per_window) for i in range(n_windows)]
    length = (known_per_window - 1) * skip + 1
    known = torch.stack([video[:, :, s : s + known_per_window] for s in starts], dim=1)  # [B,N,3,K,H,W]
    dense = torch.zeros(b, len(starts), c, length, h, w, device=video.device)
    dense[:, :, :, ::skip] = known
    mask = torch.zeros(1, 1, length, 1, 1, device=video.device)
    mask[:, :, ::skip] = 1
    dense = rearrange(dense, "b n c t h w -> (b n) c t h w")
    cond = {"image_emb": repeat(image_emb, "b d -> (b n) d", n=len(starts)),
            "fps": torch.full((dense.shape[0],), fps * skip, device=video.device),
            "extra": net.extra(dense, mask)}
    noise = rearrange(per_video_noise((len(starts), c, length, h, w), generators, video.device),
                      "b n c t h w -> (b n) c t h w")
    out = net.generate(cond, noise, steps, guidance)
    out = torch.where(mask.bool(), dense, out)  # known frames exactly
    out = rearrange(out, "(b n) c t h w -> b n c t h w", b=b)
    result = torch.zeros(b, c, (t - 1) * skip + 1, h, w, device=video.device)
    for i, s in enumerate(starts):
        result[:, :, s * skip : s * skip + length] = out[:, i]
    return result


def time_windows(frames: int, window: int, overlap: int) -> list[slice]:
    """Windows of `window` frames over [0, frames), each sharing at least `overlap` frames with the
    next (the last one moved back to end at the last frame); one window if the clip is shorter."""
    if frames <= window:
        return [slice(0, frames)]
    starts = list(range(0, frames - window + 1, window - overlap))
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return [slice(s, s + window) for s in starts]


def denoise_in_windows(denoise, window: int, overlap: int):
    """MultiDiffusion over time (Bar-Tal et al. 2023): the net sees windows of its training length
    and, at every step, a frame's prediction is the mean over the windows that hold it, so
    neighbouring windows agree on the frames they share and leave no seam between them.
    The sampler then takes one step (clipping x0 once) from the mean prediction, where the paper
    steps each window and averages the results: the same for DDIM and DPM-Solver++ without
    clipping (both are linear in the prediction), close with it.
    Condition tensors with a time axis ([B,C,T,H,W]) are cut with the frames."""
    def windowed(x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        total = torch.zeros_like(x_t)
        count = torch.zeros(x_t.shape[2], device=x_t.device)
        for frames in time_windows(x_t.shape[2], window, overlap):
            part = {k: v[:, :, frames] if v.ndim == 5 else v for k, v in cond.items()}
            total[:, :, frames] += denoise(x_t[:, :, frames], t, part)
            count[frames] += 1
        return total / count[:, None, None]
    return windowed


def super_resolve_video(net: DiffusionStage, video: torch.Tensor, fps: float, generators: list[torch.Generator],
                        steps=None, lowres_noise: float | None = None) -> torch.Tensor:
    """SR^t_l over the whole clip in overlapping windows of its training length; [B,3,T,h,w] -> [B,3,T,H,W],
    video i's noise from generators[i].
    `lowres_noise`: the input's augmentation level (default: the config's sampling.lowres_noise)."""
    low, size, window = net.config.data.lowres_size, net.config.data.size, net.config.data.frames
    overlap = net.config.sampling.window_overlap
    overlap = window // 2 if overlap is None else overlap
    if not net.config.video:  # frame by frame: windows only bound the memory
        overlap = 0
    one_each(generators, video.shape[0])
    if video.shape[-1] != low:
        video = net.upsample(video, low)
    level = lowres_level(net, lowres_noise)
    cond = net.lowres_condition(video, size, level, _lowres_noise(net, video.shape[1:], generators))
    cond["fps"] = torch.full((video.shape[0],), fps, device=video.device)
    b, c, t = video.shape[:3]
    denoise = denoise_in_windows(net.denoise, window, overlap)
    noise = per_video_noise((c, t, size, size), generators, video.device)
    return net.generate(cond, noise, steps, 1.0, denoise=denoise)


def lowres_level(net: DiffusionStage, level: float | None) -> float:
    """The augmentation level to sample at: `level`, or the config's; within what the net trained on."""
    most = net.config.data.lowres_noise_max
    if level is None:
        return net.config.sampling.lowres_noise
    if not 0 <= level <= most:
        raise ValueError(f"lowres noise {level:g}: the {net.config.stage} checkpoint trained on levels from 0 to "
                         f"data.lowres_noise_max = {most:g}")
    return level


def check_steps(net: DiffusionStage, steps: int | None) -> None:
    """`steps` (None: the config's sample_steps) must not exceed the net's diffusion timesteps."""
    d = net.config.diffusion
    if (steps or d.sample_steps) > d.timesteps:
        given = f"steps {steps}" if steps else f"diffusion.sample_steps {d.sample_steps} of its config"
        raise ValueError(f"{given}: the {net.config.stage} checkpoint's schedule has {d.timesteps} timesteps, "
                         f"so it samples in at most {d.timesteps} steps")


def _lowres_noise(net: DiffusionStage, shape, generators: list[torch.Generator]) -> torch.Tensor | None:
    """The noise for the low-res input's augmentation (None where the net was trained without it)."""
    return per_video_noise(shape, generators, net.device) if net.config.data.lowres_noise_max else None


def super_resolve_frames(net: DiffusionStage, video: torch.Tensor, generators: list[torch.Generator], steps=None,
                         frames_per_batch: int = 16, lowres_noise: float | None = None) -> torch.Tensor:
    """SR_h per frame; every frame of a clip starts from the same noise, video i's from generators[i].
    [B,3,T,h,w] -> [B,3,T,H,W]."""
    low, size = net.config.data.lowres_size, net.config.data.size
    level = lowres_level(net, lowres_noise)
    b, _, t = video.shape[:3]
    one_each(generators, b)
    if video.shape[-1] != low:
        video = net.upsample(video, low)
    shared = per_video_noise((3, size, size), generators, video.device)
    shared_lowres = _lowres_noise(net, (3, low, low), generators)  # shared too, for the same reason
    frames = rearrange(video, "b c t h w -> (b t) c h w")
    noise = repeat(shared, "b c h w -> (b t) c h w", t=t)
    if shared_lowres is not None:
        shared_lowres = repeat(shared_lowres, "b c h w -> (b t) c h w", t=t)
    outs = []
    for first in range(0, b * t, frames_per_batch):
        part = slice(first, first + frames_per_batch)
        cond = net.lowres_condition(frames[part], size, level, None if shared_lowres is None else shared_lowres[part])
        outs.append(net.generate(cond, noise[part], steps, 1.0))
    return rearrange(torch.cat(outs), "(b t) c h w -> b c t h w", b=b)


@torch.no_grad()
def generate(chain: dict[str, DiffusionStage], prompts: list[str], *, steps: int | None = None,
             guidance: float | None = None, seed: int = 0, lowres_noise: float | None = None
             ) -> tuple[torch.Tensor, float]:
    """-> (video float [B,3,T,H,W] in [-1,1], fps). Video i draws all its noise from its own generator,
    seeded `seed + i`: alone with that seed it comes out the same. `lowres_noise`: both SR stages'
    augmentation level (default: each one's sampling.lowres_noise)."""
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):  # nan: a black video
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
    for stage in ("sr_low", "sr_high"):  # before minutes of sampling the stages before them
        if stage in chain:
            lowres_level(chain[stage], lowres_noise)
    for net in chain.values():
        check_steps(net, steps)
    generators = seeded(seed, len(prompts))
    prior, decoder = chain["prior"], chain["decoder"]
    device = decoder.device
    image_emb = prior.sample(prompts, generators, steps=steps, guidance=guidance).to(device)
    s = decoder.config.sampling
    size = decoder.config.data.size
    cond = {"image_emb": image_emb, "fps": torch.full((len(prompts),), s.fps, device=device)}
    noise = per_video_noise((3, s.frames, size, size), generators, device)
    video = decoder.generate(cond, noise, steps, guidance)
    fps = s.fps
    if "interpolation" in chain:
        skip = chain["interpolation"].config.sampling.skip
        video = interpolate_frames(chain["interpolation"], video, image_emb, fps, skip, generators, steps, guidance)
        fps = fps * skip
    if "sr_low" in chain:
        video = super_resolve_video(chain["sr_low"], video, fps, generators, steps, lowres_noise)
    if "sr_high" in chain:
        video = super_resolve_frames(chain["sr_high"], video, generators, steps, lowres_noise=lowres_noise)
    return video.clamp(-1, 1), fps


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[3,T,H,W] in [-1,1] -> uint8 [T,H,W,3]."""
    return ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).cpu()


def sample_videos(prompts: list[str], checkpoints: dict[str, str | Path], out_dir: str | Path, *,
                  steps: int | None = None, guidance: float | None = None, seed: int = 0,
                  device: str | torch.device = "cpu", batch_size: int = 8, gif: bool = True,
                  chain: dict[str, DiffusionStage] | None = None, lowres_noise: float | None = None
                  ) -> list[SampleResult]:
    """Sample one video per prompt (in batches) -> out_dir/sample-0000.mp4 (+ .gif), video i with seed
    `seed + i`, each with its prompt in out_dir/prompts.json and its prompt, seed and what sampled it
    (sampling_settings) in out_dir/samples.json (update_sidecar: an earlier run's videos keep theirs)."""
    chain = chain or load_chain(checkpoints, device)
    settings = sampling_settings(checkpoints, steps, guidance, lowres_noise)
    out_dir = Path(out_dir)
    names = [f"sample-{i:04d}" for i in range(len(prompts))]
    # the videos about to be overwritten lose their old prompts first: a run that fails part way
    # leaves them unlisted (evaluate then asks for prompts) rather than listed with the wrong text
    for sidecar in ("prompts.json", "samples.json"):
        update_sidecar(out_dir / sidecar, {}, dropped=[f"{n}.mp4" for n in names])
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        video, fps = generate(chain, batch, steps=steps, guidance=guidance, seed=seed + start,
                              lowres_noise=lowres_noise)
        for i, prompt in enumerate(batch):
            frames = to_uint8(video[i])
            stem = out_dir / names[start + i]
            mp4 = write_mp4(frames, stem.with_suffix(".mp4"), fps)
            results.append(SampleResult(prompt, mp4, write_gif(frames, stem.with_suffix(".gif"), fps) if gif else None,
                                        frames, fps, seed + start + i))
        made = results[start:]
        update_sidecar(out_dir / "prompts.json", {r.mp4.name: r.prompt for r in made})
        update_sidecar(out_dir / "samples.json", {r.mp4.name: {"prompt": r.prompt, "seed": r.seed,
                                                               "sampled_with": settings} for r in made})
    return results


def sampling_settings(checkpoints: dict[str, str | Path], steps: int | None, guidance: float | None,
                      lowres_noise: float | None) -> dict:
    """What a run sampled with, as samples.json records it: two videos with the same settings come from
    the same model. A checkpoint is its file's path, size and modification time (a resumed training
    rewrites last.ckpt in place); None: each stage config's value."""
    def identity(path):
        stat = Path(path).stat()
        return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    used = {stage: path for stage, path in checkpoints.items() if path}
    if not {"sr_low", "sr_high"} & set(used):  # no stage read it: recorded, it told equal runs apart
        lowres_noise = None
    return {"checkpoints": {stage: identity(path) for stage, path in used.items()},
            "steps": steps, "guidance": guidance, "lowres_noise": lowres_noise}


def update_sidecar(path: Path, entries: dict, dropped: list[str] = ()) -> None:
    """A {video file name: ...} record beside the videos (prompts.json: the prompt, what `mav evaluate
    --fake folder` reads; samples.json: prompt, seed and settings): `dropped` names leave, `entries`
    are added; the other videos' entries stay."""
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):  # unreadable: rewritten from what this run knows
        known = {}
    dropped = set(dropped)
    known = {k: v for k, v in (known if isinstance(known, dict) else {}).items() if k not in dropped}
    atomic_write_json(path, known | entries)


def sample_video(prompt: str, checkpoints: dict[str, str | Path], out: str | Path, *, steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, device: str | torch.device = "cpu",
                 lowres_noise: float | None = None) -> SampleResult:
    """One prompt -> `out` (mp4) and the same name with .gif."""
    chain = load_chain(checkpoints, device)
    video, fps = generate(chain, [prompt], steps=steps, guidance=guidance, seed=seed, lowres_noise=lowres_noise)
    frames = to_uint8(video[0])
    out = Path(out)
    mp4 = write_mp4(frames, out, fps)
    return SampleResult(prompt, mp4, write_gif(frames, out.with_suffix(".gif"), fps), frames, fps, seed)
