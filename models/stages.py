"""The five Make-A-Video stages as LightningModules, and their checkpoints.

Every stage is a denoising diffusion model: `conditioning(batch)` gives the clean
target x0 and the conditioning, `denoise(x_t, t, cond)` runs the network, and
`generate(cond, noise)` samples with classifier-free guidance (the conditioning is
replaced by `null_condition(cond)`: zeros, which is also what CFG dropout trains).

    prior          CLIP text emb + tokens -> CLIP image emb              (DiffusionPrior)
    decoder        image emb (+ fps) -> 64px images (mode image) / clips (mode video, inflated)
    interpolation  decoder video net + 4 zero-initialised input channels (masked frames, mask)
    sr_low         upsampled low-res frames as 3 extra channels; image, then inflated video
    sr_high        the same, images only (per frame at sampling time)
"""
from __future__ import annotations

import math
import re
import warnings
import zipfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange

from models.compat import RUN_SETTINGS, SHAPE_SETTINGS, STREAM_SETTINGS, differing, init_problem, with_clip
from models.config import StageConfig, as_config, parse_config
from models.data import clip_frames, stream_seed
from models.diffusion import Diffusion, at_least_float32, guided, one_each, per_video_noise
from models.inflate import temporal_misfits, widen_input
from models.layers import TemporalConv
from models.prior import DiffusionPrior
from models.unet import UNet

# what `null_condition` zeroes: the unconditional input that CFG dropout trains (a zero token_mask masks every token)
NULLED = ("image_emb", "text_emb", "tokens", "token_mask")
# the prefixes FSDP, activation checkpointing and torch.compile add to parameter names
WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")

_CLIPS: dict[str, object] = {}


class CheckpointError(ValueError):
    pass


def load_clip(name: str):
    """FrozenCLIP by hub id / folder; "tiny" is the tiny random one, built once (models.clip.tiny_clip_path)."""
    from models.clip import FrozenCLIP, tiny_clip_path

    if name not in _CLIPS:
        _CLIPS[name] = FrozenCLIP.load(tiny_clip_path() if name == "tiny" else name)
    return _CLIPS[name]


def drop(cond: torch.Tensor, p: float) -> torch.Tensor:
    """Classifier-free guidance dropout: zero each sample's conditioning with probability p."""
    if p <= 0:
        return cond
    keep = (torch.rand(cond.shape[0], device=cond.device) >= p).to(cond.dtype)
    return cond * keep.view(-1, *([1] * (cond.ndim - 1)))


def _draw(low: int, high: int) -> int:
    """A random integer in [low, high] from torch's generator (the one training seeds per batch)."""
    return int(torch.randint(low, high + 1, ()))


def sharded(trainer: L.Trainer) -> bool:
    """Whether the trainer shards the model (FSDP): clipping, checkpoints and EMA then differ."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


class DiffusionStage(L.LightningModule):
    def __init__(self, config: StageConfig | dict):
        super().__init__()
        self.config = as_config(config)
        self.save_hyperparameters({"stage": self.config.stage, "config": self.config.model_dump(mode="json")})
        d = self.config.diffusion
        self.diffusion = Diffusion(d.timesteps, d.schedule, d.prediction, clip_sample=self.config.stage != "prior")
        self.net = self.build_net()
        if self.config.video and self.config.freeze_spatial:
            for name, p in self.net.named_parameters():
                p.requires_grad_(self.trained_when_spatial_frozen(name))
        # which parameters weight decay applies to, decided now: under FSDP the optimizer sees flat
        # 1-D shards, where no weight matrix can be told from a bias any more. Not the temporal
        # convolutions' kernels: they start as the identity, and decay would pull them to zero
        identity = {f"{name}.weight" for name, m in self.named_modules() if isinstance(m, TemporalConv)}
        self._decayed = {name for name, p in self.named_parameters()
                         if p.ndim >= 2 and not name.endswith(("pos", "query")) and name not in identity}
        self.last_loss = torch.tensor(float("nan"))

    def trained_when_spatial_frozen(self, name: str) -> bool:
        return "temporal" in name

    def configure_model(self):
        """The training form of the net (Lightning calls this before the strategy wraps the model);
        sampling (load_stage) keeps the plain eager net in its default layout."""
        if self.config.trainer.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.config.trainer.compile:  # in place: state_dict keys unchanged
            if isinstance(self.net, UNet):
                self.net.compile_blocks(channels_last=self.config.trainer.channels_last)
            else:  # static shapes: a shape change recompiles instead of switching to symbolic ones
                self.net.compile(dynamic=False)

    # the frozen CLIP is shared and kept out of state_dict / EMA copies
    @property
    def clip(self):
        clip = load_clip(self.config.clip)
        if clip.device != self.device:
            clip.to(self.device)
        return clip

    def build_net(self):
        raise NotImplementedError

    def conditioning(self, batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def null_condition(self, cond: dict) -> dict:
        return {k: (torch.zeros_like(v) if k in NULLED else v) for k, v in cond.items()}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        if "extra" in cond:
            x_t = torch.cat([x_t, cond["extra"].to(x_t.dtype)], dim=1)
        return self.net(x_t, t, cond.get("image_emb"), cond.get("fps"), cond.get("noise_level"))

    def on_train_start(self):
        self.batches_seen = self.trainer.global_step * self.trainer.accumulate_grad_batches

    def on_train_batch_start(self, batch, batch_idx):
        # noise, timesteps, condition dropout and masks (all from torch's generator) follow from
        # (seed, rank, batch): a resumed run draws what the uninterrupted one would have, and each
        # rank draws its own
        torch.manual_seed(stream_seed(self.config.trainer.seed, self.global_rank, self.batches_seen))
        self.batches_seen += 1
        # the rate this step trains with (every group has the same): the warm-up's ramp beside the loss
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1, rank_zero_only=True)

    def training_step(self, batch, batch_idx):
        x0, cond = self.conditioning(batch)
        loss = self.diffusion.loss(lambda x, t: self.denoise(x, t, cond), x0)
        # the mean over ranks (each rank sees its own batch), not rank 0's alone
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0], sync_dist=True)
        self.last_loss = loss.detach()  # a tensor: float() here would wait for the GPU every step
        self.last_batch_size = x0.shape[0]  # (models.train.TrainingSpeed)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if gradient_clip_val and sharded(self.trainer):
            # the norm over every rank's shards: only FSDP's own method computes it (Lightning's clipping
            # refuses FSDP, Lightning-AI/pytorch-lightning#19235)
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint):
        """Optimizer state numbered as FSDP numbers it, by position among all the module's parameters
        (frozen ones included) rather than among the optimizer's, so a checkpoint resumes under any
        strategy: FSDP maps the numbers to names by that position (a frozen spatial layer would get
        a temporal layer's moments), a plain optimizer by the order of the saved groups."""
        if sharded(self.trainer) or "optimizer_states" not in checkpoint:
            return
        position = {id(p): i for i, p in enumerate(self.parameters())}
        for optimizer, state in zip(self.trainer.optimizers, checkpoint["optimizer_states"]):
            params = [p for group in optimizer.param_groups for p in group["params"]]  # saved as 0, 1, ...
            renumber = {i: position[id(p)] for i, p in enumerate(params)}
            state["state"] = {renumber[i]: v for i, v in state["state"].items()}
            for group in state["param_groups"]:
                group["params"] = [renumber[i] for i in group["params"]]

    def configure_optimizers(self):
        tc = self.config.trainer
        params = [(WRAPPERS.sub("", n), p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [{"params": [p for _, p in params]}]
        if tc.weight_decay > 0:  # on weight matrices and kernels only: not biases, norms, learned positions
            groups = [{"params": [p for n, p in params if n in self._decayed]},
                      {"params": [p for n, p in params if n not in self._decayed], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
        warmup = max(1, tc.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def generate(self, cond: dict, noise: torch.Tensor, steps: int | None = None, guidance: float | None = None,
                 sampler: str | None = None, denoise=None) -> torch.Tensor:
        """`denoise(x_t, t, cond)`: what predicts at each step (default: the net on the whole input)."""
        d = self.config.diffusion
        guidance = d.guidance if guidance is None else guidance
        denoise = denoise or self.denoise
        null = self.null_condition(cond)
        fn = guided(lambda x, t, use_cond: denoise(x, t, cond if use_cond else null), guidance)
        with torch.autocast(noise.device.type, torch.bfloat16, enabled=noise.device.type == "cuda"):
            return self.diffusion.sample(fn, noise, steps or d.sample_steps, sampler or d.sampler).float()


class PriorStage(DiffusionStage):
    def build_net(self):
        p = self.config.prior
        return DiffusionPrior(self.clip.embed_dim, self.clip.text_width, p.width, p.depth, p.heads, p.dropout)

    @property
    def scale(self) -> float:  # unit-norm CLIP vectors -> ~unit variance per coordinate
        return math.sqrt(self.net.kwargs["embed_dim"])

    def text_condition(self, captions: list[str]) -> dict:
        text_emb, tokens, token_mask = self.clip.encode_text(list(captions))
        return {"text_emb": text_emb, "tokens": tokens.float(), "token_mask": token_mask}

    def conditioning(self, batch):
        # CLIP gives float32; a *-true precision runs the net in another dtype (the net casts the rest to x's)
        x0 = (self.clip.encode_images((batch["image"] + 1) / 2) * self.scale).to(self.dtype)
        cond = self.text_condition(batch["caption"])
        keep = drop(torch.ones(x0.shape[0], device=x0.device), self.config.cond_dropout)
        cond = {"text_emb": cond["text_emb"] * keep[:, None], "tokens": cond["tokens"] * keep[:, None, None],
                "token_mask": cond["token_mask"] & keep.bool()[:, None]}
        return x0, cond

    def denoise(self, x_t, t, cond):
        return self.net(x_t, t, cond["text_emb"], cond["tokens"], cond["token_mask"])

    @torch.no_grad()
    def sample(self, captions: list[str], generators: list[torch.Generator], **kw) -> torch.Tensor:
        """Prompts -> L2-normalised CLIP image embeddings [B,D]; caption i's noise from generators[i]."""
        one_each(generators, len(captions))
        cond = self.text_condition(captions)
        noise = per_video_noise((self.net.kwargs["embed_dim"],), generators, self.device)
        return F.normalize(self.generate(cond, noise, **kw), dim=-1)


class DecoderStage(DiffusionStage):
    extra_channels = 0

    def build_net(self):
        return UNet(in_channels=3 + self.extra_channels, out_channels=3, cond_dim=self.clip.embed_dim,
                    temporal=self.config.video, **self.config.unet.model_dump())

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding of images [B,3,H,W], or the mean over frames [B,3,K,H,W]; pixels in [-1, 1]."""
        x = (x.float() + 1) / 2
        if x.ndim == 4:
            return self.clip.encode_images(x)
        emb = self.clip.encode_images(rearrange(x, "b c t h w -> (b t) c h w"))
        return F.normalize(rearrange(emb, "(b t) d -> b t d", b=x.shape[0]).mean(1), dim=-1)

    def conditioning(self, batch):
        x0 = batch["video"] if self.config.video else batch["image"]
        if "clip_image" in batch:  # the data's frame(s) at CLIP's input size
            pixels = batch["clip_image"].float() / 127.5 - 1
        else:  # the target's own frame(s), upsampled by CLIP's preprocessing
            pixels = x0[:, :, clip_frames(self.config.data.clip_frame, x0.shape[2])] if x0.ndim == 5 else x0
        cond = {"image_emb": drop(self.image_embedding(pixels), self.config.cond_dropout)}
        if self.config.video:
            cond["fps"] = batch["fps"].float()
        return x0, cond


class InterpolationStage(DecoderStage):
    """↑F: the video decoder with masked frames + mask as 4 extra input channels."""
    extra_channels = 4

    def trained_when_spatial_frozen(self, name: str) -> bool:
        # the input conv's new channels start at zero: frozen, the net would never see the known frames
        return super().trained_when_spatial_frozen(name) or name.startswith("conv_in.spatial")

    def random_mask(self, b: int, t: int) -> torch.Tensor:
        """[B,1,T,1,1] of 1 = known frame. Interpolate: every k-th frame (k in 2..max_skip; k = 1 would
        leave nothing to generate); extrapolate: the first n frames; animate: the first frame only."""
        data = self.config.data
        mask = torch.zeros(b, 1, t, 1, 1, device=self.device)
        for i in range(b):
            mode = data.mask_modes[_draw(0, len(data.mask_modes) - 1)]
            if mode == "interpolate":
                mask[i, :, :: _draw(2, max(2, data.max_skip))] = 1
            elif mode == "extrapolate":
                mask[i, :, : _draw(1, max(1, t // 2))] = 1
            else:
                mask[i, :, 0] = 1
        return mask

    @staticmethod
    def extra(video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.expand(video.shape[0], 1, *video.shape[2:3], *video.shape[3:])
        return torch.cat([video * mask, mask.to(video.dtype)], dim=1)

    def conditioning(self, batch):
        x0, cond = super().conditioning(batch)
        cond["extra"] = self.extra(x0, self.random_mask(x0.shape[0], x0.shape[2]))
        return x0, cond


class SuperResStage(DiffusionStage):
    """SR: the bilinearly upsampled low-res input as 3 extra channels (no text/image conditioning).

    With `data.lowres_noise_max` > 0, noise conditioning augmentation (Imagen, Saharia et al. 2022):
    training noises the low-res input to a random level of the diffusion schedule and tells the net
    which, so it learns to repair what the stage before it got wrong rather than trusting its
    input as a clean downsample; sampling noises it to `sampling.lowres_noise`."""

    def build_net(self):
        return UNet(in_channels=6, out_channels=3, cond_dim=0, temporal=self.config.video,
                    noise_level_cond=self.config.data.lowres_noise_max > 0, **self.config.unet.model_dump())

    def lowres_condition(self, low: torch.Tensor, size: int, level: float | torch.Tensor, noise=None) -> dict:
        """{"extra": the low-res [B,3,(T,)h,w] upsampled to size}; under noise augmentation `low` is first
        noised to `level` (a fraction of the schedule, per sample or one for all) with `noise` (default:
        drawn here), and {"noise_level": the timestep} tells the net how much."""
        if not self.config.data.lowres_noise_max:
            return {"extra": self.upsample(low, size)}
        level = torch.as_tensor(level, dtype=torch.float32, device=low.device).expand(low.shape[0])
        t = (level * (self.diffusion.timesteps - 1)).round().long()
        noise = torch.randn_like(low) if noise is None else noise
        return {"extra": self.upsample(self.diffusion.q_sample(low, noise, t), size), "noise_level": t.float()}

    @staticmethod
    def downsample(x, size):  # in float32: the CPU has no bf16 antialiased resize (a bf16-true batch)
        return _per_frame(lambda f: F.interpolate(at_least_float32(f), size=(size, size), mode="bilinear",
                                                  antialias=True).to(f.dtype), x)

    @staticmethod
    def upsample(x, size):
        return _per_frame(lambda f: F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False), x)

    def conditioning(self, batch):
        x0 = batch["video"] if self.config.video else batch["image"]
        most = self.config.data.lowres_noise_max
        levels = torch.rand(x0.shape[0], device=x0.device) * most if most else 0.0
        cond = self.lowres_condition(self.downsample(x0, self.config.data.lowres_size), x0.shape[-1], levels)
        if self.config.video:
            cond["fps"] = batch["fps"].float()
        return x0, cond


def _per_frame(fn, x):
    if x.ndim == 4:
        return fn(x)
    b = x.shape[0]
    y = fn(rearrange(x, "b c t h w -> (b t) c h w"))
    return rearrange(y, "(b t) c h w -> b c t h w", b=b)


STAGE_CLASSES = {"prior": PriorStage, "decoder": DecoderStage, "interpolation": InterpolationStage,
                 "sr_low": SuperResStage, "sr_high": SuperResStage}


def build_stage(config: StageConfig | dict) -> DiffusionStage:
    config = as_config(config)
    return STAGE_CLASSES[config.stage](config)


# -- checkpoints --------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        gone = f" (a link to {path.readlink()}, which does not exist)" if path.is_symlink() else ""
        raise CheckpointError(f"checkpoint not found: {path}{gone}")
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint (e.g. its checkpoints/last.ckpt)")
    if not zipfile.is_zipfile(path):  # what torch.save writes; else torch's message is about mmap
        raise CheckpointError(f"{path}: not a readable checkpoint (not a whole file written by torch.save: cut "
                              "short, or another kind of file)")
    try:
        # mmap: checks such as --resume's read only the pages they touch, not the whole file twice
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from None
    if not isinstance(ckpt, dict) or "stage" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(f"{path}: not a Make-A-Video stage checkpoint (no stage recorded)")
    return ckpt


def net_state(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}


def finite(state: dict[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """`state`, unless a weight holds NaN or infinity: corrupt bytes in a file that still reads (or a
    run that diverged) trained to loss nan, or sampled a black video, and both exited 0."""
    broken = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:
        raise CheckpointError(f"{source}: weight {broken} holds NaN or infinity (a corrupt file, or a run "
                              "that diverged)")
    return state


def fit_state(module: DiffusionStage, state: dict, source: str, recorded: dict) -> dict:
    """Adapt a net state to the module (inflation, widened input) or raise naming what does not fit:
    the shape settings that differ from the `recorded` config the weights were trained under, then
    the weights."""
    own = module.net.state_dict()
    if not module.config.video:  # video -> image net (e.g. sr_high from sr_low): drop temporal weights
        state = {k: v for k, v in state.items() if "temporal" not in k}
    key = "conv_in.spatial.weight"
    if key in state and key in own and state[key].shape[1] < own[key].shape[1]:
        state = widen_input(state, own[key].shape[1])  # decoder -> interpolation: new channels start at zero
    problems = temporal_misfits(own, state)  # temporal layers may be missing: inflation
    if any("noise_level_embed" in problem for problem in problems):  # name the setting, not the weights
        problems.insert(0, "it was trained with low-res noise augmentation: set data.lowres_noise_max > 0"
                        if "noise_level_embed.0.weight" in state else
                        "it was trained without low-res noise augmentation: set data.lowres_noise_max and "
                        "sampling.lowres_noise to 0")
    if problems:
        problems[:0] = differing(recorded, module.config, SHAPE_SETTINGS)
        raise CheckpointError(f"{source}: weights do not fit this {module.config.stage} model ({'; '.join(problems)})")
    return state


def init_from_checkpoint(module: DiffusionStage, path: str | Path) -> DiffusionStage:
    ckpt = read_checkpoint(path)
    if problem := init_problem({**ckpt["hyper_parameters"]["config"], "stage": ckpt["hyper_parameters"]["stage"]},
                               module.config):
        raise CheckpointError(f"{path}: {problem}")
    state = fit_state(module, finite(net_state(ckpt), path), str(path), ckpt["hyper_parameters"]["config"])
    module.net.load_state_dict(state, strict=False)
    return module


def check_resume(module: DiffusionStage, path: str | Path) -> tuple[int, int]:
    """A checkpoint to resume from must be this stage, mode and shape exactly; -> its step, and the
    run length its config had (the fps curriculum's, kept when trainer.max_steps changes)."""
    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    if hp["stage"] != module.config.stage or hp["config"].get("mode") != module.config.mode:
        raise CheckpointError(f"{path} is a {hp['stage']!r} ({hp['config'].get('mode')}) checkpoint, "
                              f"cannot resume {module.config.stage!r} ({module.config.mode})")
    if found := differing(hp["config"], module.config, with_clip(RUN_SETTINGS, module.config.stage)):
        raise CheckpointError(f"{path}: --resume continues the run as it was saved, but the config changed "
                              f"({'; '.join(found)}); restore these settings, or start a new run with --init")
    if found := differing(hp["config"], module.config, STREAM_SETTINGS):
        warnings.warn(f"{path}: resuming with other data-stream settings ({'; '.join(found)}): training goes on, "
                      "but on other samples, in another order, than the saved run would have drawn")
    state = net_state(ckpt)
    own = module.net.state_dict()
    if set(state) != set(own) or any(own[k].shape != v.shape for k, v in state.items()):
        fit_state(module, state, str(path), hp["config"])  # raises with the details
        raise CheckpointError(f"{path}: the network differs from this config (missing temporal layers?)")
    return int(ckpt.get("global_step", 0)), int(hp["config"].get("trainer", {}).get("max_steps", 0))


def load_stage(path: str | Path, stage: str | None = None, device: str | torch.device = "cpu") -> DiffusionStage:
    """A trained stage for sampling (eval mode; EMA weights when training kept them)."""
    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    if stage is not None and hp["stage"] != stage:
        raise CheckpointError(f"{path} is a {hp['stage']!r} checkpoint, expected {stage!r}")
    config = parse_config(hp["config"], f"{path}: its recorded config", recorded=True)
    module = build_stage(config.model_copy(update={"freeze_spatial": False}))
    module.net.load_state_dict(finite(net_state(ckpt), path))
    return module.to(device).eval()
