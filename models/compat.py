"""Which trained weights fit which stage config: the rules that `--init`, `--resume` and the
pipeline's `init_from` share. Configs only, no torch: the pipeline checks its steps with them
before it imports the training stack."""
from __future__ import annotations

from models.config import StageConfig, parse_config

CLIP_STAGES = ("prior", "decoder", "interpolation")  # the stages that read a CLIP (the SR stages do not)
# which checkpoints a stage may start from (--init)
INIT_FROM = {"prior": {"prior"}, "decoder": {"decoder"}, "interpolation": {"decoder", "interpolation"},
             "sr_low": {"sr_low"}, "sr_high": {"sr_high", "sr_low"}}
# what the weights compute depends on these, beyond their shapes (a v-prediction net read as an
# epsilon one, heads 4 x 4 read as 2 x 8, another CLIP's embedding space)
NET_SETTINGS = ("diffusion.prediction", "diffusion.schedule", "diffusion.timesteps", "unet.groups", "unet.heads",
                "unet.dim_head")
# the network's shape: when weights do not fit, these name why (rather than a list of weights)
SHAPE_SETTINGS = ("unet.channels", "unet.channel_mults", "unet.num_res_blocks", "unet.attn_levels",
                  "unet.context_tokens", "unet.temporal_kernel", "prior.width", "prior.depth")
# a resumed run continues with its optimizer, schedule and data stream as saved: these cannot change
# midway (the stream's position and randomness follow from the batch size and the seed)
RUN_SETTINGS = NET_SETTINGS + ("freeze_spatial", "trainer.lr", "trainer.weight_decay", "trainer.warmup_steps",
                               "trainer.accumulate_grad_batches", "trainer.ema_decay", "trainer.ema_warmup",
                               "data.batch_size", "trainer.seed", "data.lowres_noise_max")

# the data stream's order follows from these too (each reader's share of the data and its random
# windows): a resume with other values goes on, but draws other samples than the saved run would have
STREAM_SETTINGS = ("data.num_workers", "data.shuffle_buffer", "trainer.devices", "trainer.num_nodes")


def scratch_problem(config: StageConfig) -> str | None:
    """Why a stage of `config` cannot train from scratch (no --init, no init_from), or None."""
    if config.video and config.freeze_spatial:
        return (f"freeze_spatial: a video-mode {config.stage} trained from scratch with its spatial layers frozen "
                "cannot learn (its frozen output convolution starts at zero): --init an image-mode checkpoint "
                "(the paper's inflation), or set freeze_spatial: false")
    return None


def state_misfits(own: dict, state: dict, may_miss=lambda key: False) -> list[str]:
    """What stops `state` loading into a module whose state is `own` (at most 3 of each kind): keys of
    other shapes, unexpected keys, and missing keys that `may_miss` does not allow. Empty when it fits."""
    misshaped = [f"{k}: checkpoint {tuple(getattr(v, 'shape', ()))} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and getattr(v, "shape", None) != own[k].shape]  # (v: a number?)
    unexpected = [f"unexpected {k}" for k in state if k not in own]
    missing = [f"missing {k}" for k in own if k not in state and not may_miss(k)]
    return misshaped[:3] + unexpected[:3] + missing[:3]


def with_clip(keys: tuple[str, ...], stage: str) -> tuple[str, ...]:
    return keys + (("clip",) if stage in CLIP_STAGES else ())


def differing(recorded: dict, config: StageConfig, keys: tuple[str, ...],
              names: tuple[str, str] = ("checkpoint", "config")) -> list[str]:
    """'key: checkpoint X, config Y' for each setting that differs between a checkpoint and a config."""
    current = config.model_dump(mode="json")
    try:  # a setting added since the checkpoint was saved has its default there too
        recorded = parse_config(recorded, recorded=True).model_dump(mode="json")
    except ValueError:
        pass
    return [f"{key}: {names[0]} {_setting(recorded, key)!r}, {names[1]} {_setting(current, key)!r}"
            for key in keys if _setting(recorded, key) != _setting(current, key)]


def init_problem(source: dict, config: StageConfig, kind: str = "checkpoint",
                 names: tuple[str, str] = ("checkpoint", "config")) -> str | None:
    """Why weights trained under the recorded config `source` cannot start a stage of `config`, or
    None (checked as training starts, and by the pipeline on its steps' configs before any runs)."""
    src, stage = source["stage"], config.stage
    if src not in INIT_FROM[stage]:
        return f"a {src!r} {kind}; stage {stage!r} can start from {sorted(INIT_FROM[stage])} {kind}s only"
    if found := differing(source, config, with_clip(NET_SETTINGS, stage), names):
        return f"trained for other settings ({'; '.join(found)})"
    return None


def _setting(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config
