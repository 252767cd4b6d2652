"""Typed stage configs loaded from YAML (configs/<size>/<stage>.yaml).

Unknown keys and wrong types are errors that name the key, e.g.
`configs/tiny/decoder.yaml: data.frames: Input should be a valid integer`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from data_prep.config import describe, read_yaml_mapping

STAGES = ("prior", "decoder", "interpolation", "sr_low", "sr_high")


class ConfigError(ValueError):
    pass


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # nan/inf: a typo, never a setting


class UNetConfig(Strict):
    channels: int = Field(64, gt=0)
    channel_mults: list[PositiveInt] = Field([1, 2, 4], min_length=1)  # one level each, halving between
    num_res_blocks: int = Field(2, gt=0)
    attn_levels: list[NonNegativeInt] = [1, 2]  # indices into channel_mults
    heads: int = Field(4, gt=0)
    dim_head: int = Field(32, gt=0)
    context_tokens: int = Field(4, gt=0)
    temporal_kernel: int = Field(3, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    groups: int = Field(32, gt=0)  # GroupNorm groups (at most the channels of a layer)
    grad_checkpoint: bool = False


class PriorNetConfig(Strict):
    width: int = Field(512, gt=0)
    depth: int = Field(6, gt=0)
    heads: int = Field(8, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class DiffusionConfig(Strict):
    timesteps: int = Field(1000, ge=2)
    schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"
    prediction: Literal["epsilon", "v", "sample"] = "epsilon"
    sampler: Literal["ddim", "dpm++"] = "dpm++"
    sample_steps: int = Field(25, gt=0)
    guidance: float = Field(3.0, ge=0)  # classifier-free guidance scale (1: none, 0: unconditional)


class DataConfig(Strict):
    # video: the ingest's WebDataset shards ("shards"), its clip files via the manifest ("clips"),
    # or whichever exists ("auto"); the prior may also read image-text pairs ("images": image_path)
    source: Literal["auto", "shards", "clips", "images"] = "auto"
    image_path: str | None = None  # folder of <name>.jpg + <name>.txt, or a WebDataset .tar / folder of .tar
    # U-Net stages skip images below data.size, which tar headers cannot tell apart, so every reader
    # streams every image-text shard; true says each shard's images are all at least data.size (e.g.
    # img2dataset --min_image_size), and readers take whole shards: I/O stays flat in the readers
    image_shards_presized: bool = False
    size: int = Field(64, gt=0)  # output side in pixels (SR: the high-res side)
    lowres_size: int | None = Field(None, gt=0)  # SR input side
    frames: int = Field(16, gt=0)  # clip window (video mode)
    # video mode: skip clips whose manifest `motion` (mean absolute luma change per frame, 0-255) is
    # below this: still shots (slides, a photo behind music) teach the temporal layers nothing
    min_motion: float = Field(0.0, ge=0)
    fps_range: tuple[float, float] = (1.0, 30.0)
    # target fps = lo + (hi - lo) * Beta(a, b); a > b favours high fps (small strides, little motion)
    fps_beta: tuple[float, float] = (2.0, 1.0)
    # the paper's curriculum: the Beta moves linearly to this one by trainer.max_steps of the config
    # (b > a: low fps, the motion that sampling at sampling.fps asks for); None keeps fps_beta
    fps_beta_end: tuple[float, float] | None = None
    clip_frame: Literal["first", "middle", "mean"] = "middle"  # which frame(s) give the CLIP image embedding
    # decoder / interpolation: that frame is cut from the clip at CLIP's input size, not upsampled from
    # the data.size target: sampling conditions on the prior's embeddings, which are of full-size images
    clip_size: int = Field(224, gt=0)
    max_skip: int = Field(5, gt=0)  # interpolation: frame skips 2..max_skip (1 would leave nothing to fill in)
    mask_modes: list[Literal["interpolate", "extrapolate", "animate"]] = Field(
        ["interpolate", "extrapolate", "animate"], min_length=1)
    # prior on unlabeled video: clips without a caption are skipped; with none captioned at all,
    # "source_name" captions frames with their source's file name (weak text, said loudly), "error" stops
    caption_fallback: Literal["error", "source_name"] = "error"
    # super-resolution: noise conditioning augmentation, the low-res input noised to a level drawn
    # from [0, this] of the diffusion schedule in training (0: off; the net then has no level input)
    lowres_noise_max: float = Field(0.0, ge=0, le=1)
    random_crop: bool = True
    batch_size: int = Field(8, gt=0)
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(64, ge=0)


class SamplingConfig(Strict):
    frames: int = Field(16, ge=2)  # decoder: frames generated
    fps: float = Field(4.0, gt=0)  # decoder: fps conditioning at sampling (interpolation then runs at fps * skip)
    skip: int = Field(5, ge=2)  # interpolation: 16 -> (16 - 1) * 5 + 1 = 76 frames
    # sr_low: frames that neighbouring windows (data.frames long) share; None: half a window
    window_overlap: int | None = Field(None, ge=0)
    lowres_noise: float = Field(0.0, ge=0, le=1)  # sr_low, sr_high: the low-res input's noise level


class TrainerConfig(Strict):
    max_steps: int = Field(1000, gt=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0: no clipping
    accumulate_grad_batches: int = Field(1, gt=0)
    # Lightning's names and aliases; auto: bf16-mixed on GPU, 32-true on CPU
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32", "16",
                       "bf16", "64", "transformer-engine", "transformer-engine-float16"] = "auto"
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    # a count, -1 (all), GPU ids as a list or as Lightning's "0,1", or auto
    devices: PositiveInt | Literal[-1] | list[NonNegativeInt] | str = "auto"
    num_nodes: int = Field(1, gt=0)
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)  # 0 disables EMA of weights
    # decay min(ema_decay, (1+n)/(10+n)) at optimizer step n (diffusers' EMAModel): at 0.9999 a plain
    # EMA is still 82 % the initial weights after 2000 steps; the warm-up's is 1e-5 after 10
    ema_warmup: bool = True
    compile: bool = False
    # U-Net activations as [N H W C]: temporal convs without copies, but eager GroupNorm converts to
    # NCHW and back (H100, base decoder, eager: 12.0 % MFU vs 13.3 % without); pair it with compile
    channels_last: bool = False
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(500, gt=0)
    seed: int = 0

    @field_validator("devices", mode="before")  # one message, not one per member of the union
    @classmethod
    def _devices(cls, value):
        count = isinstance(value, int) and not isinstance(value, bool) and (value > 0 or value == -1)
        ids = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        text = isinstance(value, str) and re.fullmatch(r"auto|-1|\d+|\d+(,\d+)*,?", value.replace(" ", ""))
        if not (count or ids or text):
            raise ValueError(f"a count >= 1, -1 (all), a list of GPU ids, \"0,1\" or auto, got {value!r}")
        return value


class StageConfig(Strict):
    stage: Literal["prior", "decoder", "interpolation", "sr_low", "sr_high"]
    mode: Literal["image", "video"] = "video"  # decoder / sr_low: image pre-training, then inflated video
    clip: str = "tiny"  # CLIP hub id or folder; "tiny" builds a tiny random CLIP locally (tests, demo)
    freeze_spatial: bool = True  # video mode: train only the temporal layers
    cond_dropout: float = Field(0.1, ge=0, le=1)  # classifier-free guidance: drop the conditioning this often
    unet: UNetConfig = UNetConfig()
    prior: PriorNetConfig = PriorNetConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    data: DataConfig = DataConfig()
    sampling: SamplingConfig = SamplingConfig()
    trainer: TrainerConfig = TrainerConfig()

    @model_validator(mode="after")
    def _stage_rules(self, info: ValidationInfo):
        # a checkpoint's recorded config (context "recorded") skips the rules added after checkpoints
        # were trained without them: they keep loading for sampling as they did (the U-Net leaves out
        # attention levels it lacks); training with such a config is refused
        recorded = bool((info.context or {}).get("recorded"))
        if self.stage in ("prior", "sr_high") and self.mode == "video":
            self.mode = "image"  # spatial-only stages
        if self.stage == "interpolation" and self.mode != "video":
            raise ValueError("mode: interpolation works on video only")
        if self.stage in ("sr_low", "sr_high") and not self.data.lowres_size:
            raise ValueError("data.lowres_size: super-resolution needs the low-res input size")
        if self.data.lowres_size and self.data.size % self.data.lowres_size:
            raise ValueError("data.lowres_size: must divide data.size")
        if self.video and self.data.frames < 2:
            raise ValueError(f"data.frames: video mode needs windows of at least 2 frames, got {self.data.frames}")
        overlap = self.sampling.window_overlap
        if self.stage == "sr_low" and overlap is not None and overlap >= self.data.frames:
            raise ValueError(f"sampling.window_overlap: windows are data.frames = {self.data.frames} frames long, "
                             f"so they can share at most {self.data.frames - 1}, got {overlap}")
        for key, level in (("data.lowres_noise_max", self.data.lowres_noise_max),
                           ("sampling.lowres_noise", self.sampling.lowres_noise)):
            if level and self.stage not in ("sr_low", "sr_high"):
                raise ValueError(f"{key}: only super-resolution stages have a low-res input, this is {self.stage}")
        if self.sampling.lowres_noise > self.data.lowres_noise_max:
            raise ValueError(f"sampling.lowres_noise: the net trains on levels up to data.lowres_noise_max = "
                             f"{self.data.lowres_noise_max}, got {self.sampling.lowres_noise}")
        halvings = len(self.unet.channel_mults) - 1
        if self.stage != "prior" and self.data.size % 2**halvings:
            raise ValueError(f"data.size: the U-Net halves it {halvings} times, so it must be a multiple of "
                             f"{2**halvings}, got {self.data.size}")
        for key in ("fps_beta", "fps_beta_end"):
            beta = getattr(self.data, key)
            if beta is not None and min(beta) <= 0:
                raise ValueError(f"data.{key}: Beta parameters must be > 0, got {list(beta)}")
        lo, hi = self.data.fps_range
        if not 0 < lo <= hi:
            raise ValueError(f"data.fps_range: need 0 < low <= high, got {[lo, hi]}")
        if self.unet.temporal_kernel % 2 == 0:
            raise ValueError(f"unet.temporal_kernel: must be odd (same-length output), got {self.unet.temporal_kernel}")
        if not recorded and self.trainer.precision == "16-true":  # (bf16's exponent range holds them)
            raise ValueError("trainer.precision: 16-true keeps the weights and AdamW's moments in float16, where a "
                             "small gradient's square underflows to 0 and the step divides by it: the weights "
                             "are inf or NaN after the first step; use 16-mixed (float32 weights) or bf16-mixed")
        if self.stage == "prior" and self.prior.width % self.prior.heads:
            raise ValueError(f"prior.heads: must divide prior.width = {self.prior.width}, got {self.prior.heads}")
        levels = len(self.unet.channel_mults)
        if not recorded and self.stage != "prior" and any(level >= levels for level in self.unet.attn_levels):
            raise ValueError(f"unet.attn_levels: levels are 0 to {levels - 1} (one per unet.channel_mults), "
                             f"got {self.unet.attn_levels}")
        if not recorded and self.diffusion.sample_steps > self.diffusion.timesteps:  # (DPM-Solver++: NaN samples)
            raise ValueError(f"diffusion.sample_steps: the schedule has diffusion.timesteps = "
                             f"{self.diffusion.timesteps}, so at most that many, got {self.diffusion.sample_steps}")
        if not recorded and self.stage == "interpolation" and self.sampling.skip > max(2, self.data.max_skip):
            raise ValueError(f"sampling.skip: the net trains on skips 2 to data.max_skip = {self.data.max_skip}, "
                             f"got {self.sampling.skip}")
        return self

    @property
    def video(self) -> bool:
        return self.mode == "video"


def parse_config(raw: dict, source: str = "config", recorded: bool = False) -> StageConfig:
    """`recorded`: a config a checkpoint saved (see StageConfig._stage_rules)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return StageConfig.model_validate(raw, context={"recorded": recorded})
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe(err)}") from None


def load_config(path: str | Path, overrides: dict | None = None) -> StageConfig:
    path = Path(path)
    try:
        raw = read_yaml_mapping(path, "config")
    except ValueError as err:  # the same one-line error, as this module's ConfigError
        raise ConfigError(str(err)) from None
    for key, value in (overrides or {}).items():  # dotted keys: {"trainer.max_steps": 5}
        node = raw
        *parents, leaf = key.split(".")
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"setting {key}: {'.'.join(parents[:depth + 1])} is a value "
                                  f"({node!r}), not a group of settings")
        node[leaf] = value
    return parse_config(raw, str(path))


def parse_overrides(pairs: list[str]) -> dict:
    """Command-line `KEY=VALUE` settings (dotted keys, values read as YAML) -> load_config's overrides."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"a setting must be KEY=VALUE (e.g. trainer.max_steps=5), got {pair!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"setting {pair!r}: the value is not valid YAML: {err}") from None
    return out


def as_config(config: StageConfig | dict | str | Path) -> StageConfig:
    if isinstance(config, StageConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config)
    return load_config(config)
