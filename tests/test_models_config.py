"""Configs: every tiny stage config loads; wrong keys or types are errors that name the key."""
from pathlib import Path

import pytest

from models.config import STAGES, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("size", ["tiny", "base", "large"])
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_config_loads(size, stage):
    """Each size is what the README says it is: tiny runs anywhere with the tiny CLIP (float32 on
    the CPU, bf16 on a GPU: "auto"), base on one GPU, large with FSDP on 8 nodes of 8 GPUs, both in bf16."""
    cfg = load_config(ROOT / "configs" / size / f"{stage}.yaml")
    assert cfg.stage == stage
    t = cfg.trainer
    if size == "tiny":
        assert t.precision == "auto" and cfg.clip == "tiny"
    else:
        assert t.precision == "bf16-mixed"
        assert (t.strategy, t.devices, t.num_nodes) == (("auto", 1, 1) if size == "base" else ("fsdp", 8, 8))


def test_the_base_decoder_has_the_parameters_the_readme_says():
    import re

    import torch

    from models.unet import UNet

    cfg = load_config(ROOT / "configs" / "base" / "decoder.yaml")
    with torch.device("meta"):  # no memory, no init time
        net = UNet(in_channels=3, out_channels=3, cond_dim=512, temporal=True, **cfg.unet.model_dump())
    millions = sum(p.numel() for p in net.parameters()) / 1e6
    assert 100 <= millions <= 200  # the issue: "about 100M+ parameters" on one 80 GB GPU
    said = re.search(r"decoder (\d+)M parameters at 16x64x64", (ROOT / "README.md").read_text())
    assert said and int(said.group(1)) == round(millions)
    assert (cfg.data.frames, cfg.data.size) == (16, 64)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: decoder\nunet: {chanels: 8}\n")
    with pytest.raises(ConfigError, match=r"unet\.chanels: unknown key"):
        load_config(path)


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: decoder\ntrainer: {max_steps: lots}\n")
    with pytest.raises(ConfigError, match=r"trainer\.max_steps"):
        load_config(path)


def test_unknown_stage_and_stage_rules():
    with pytest.raises(ConfigError, match="stage"):
        parse_config({"stage": "upscaler"})
    with pytest.raises(ConfigError, match="lowres_size"):
        parse_config({"stage": "sr_low"})
    with pytest.raises(ConfigError, match="mode"):
        parse_config({"stage": "interpolation", "mode": "image"})
    assert parse_config({"stage": "sr_high", "data": {"lowres_size": 32}}).mode == "image"


def test_overrides_and_missing_file(tmp_path):
    cfg = load_config(ROOT / "configs/tiny/decoder.yaml", {"mode": "image", "trainer.max_steps": 3})
    assert cfg.mode == "image" and cfg.trainer.max_steps == 3
    with pytest.raises(ConfigError, match=r"config \S+nope.yaml: no such file"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override,named", [
    ({"data.frames": 1}, "data.frames: video mode needs windows of at least 2 frames"),
    ({"data.size": 0}, "data.size"),
    ({"data.size": 17}, "data.size: the U-Net halves it 1 times, so it must be a multiple of 2"),
    ({"data.batch_size": 0}, "data.batch_size"),
    ({"data.mask_modes": []}, "data.mask_modes"),
    ({"unet.temporal_kernel": 2}, "unet.temporal_kernel: must be odd"),
    ({"trainer.accumulate_grad_batches": 0}, "trainer.accumulate_grad_batches"),
    ({"trainer.max_steps": 0}, "trainer.max_steps"),
    ({"trainer.grad_clip": -1.0}, "trainer.grad_clip"),
    ({"cond_dropout": 1.5}, "cond_dropout"),
    ({"unet.heads": 0}, "unet.heads"),
    ({"unet.channels": 0}, "unet.channels"),
    ({"unet.channel_mults": []}, "unet.channel_mults"),
    ({"unet.attn_levels": [5]}, r"unet.attn_levels: levels are 0 to 1 \(one per unet.channel_mults\), got \[5\]"),
    ({"sampling.frames": 0}, "sampling.frames"),
    ({"sampling.fps": -3}, "sampling.fps"),
    ({"diffusion.guidance": float("nan")}, "diffusion.guidance: Input should be a finite number"),
    ({"diffusion.sample_steps": 1001}, r"diffusion.sample_steps: .*timesteps = 1000, so at most that many, got 1001"),
    ({"trainer.lr": float("inf")}, "trainer.lr"),
    ({"trainer.devices": 0}, r"trainer.devices: Value error, a count >= 1, -1 \(all\), a list of GPU ids, \"0,1\" or "
                             r"auto, got 0$"),  # one message, not one per member of the type's union
    ({"trainer.devices": "foo"}, "trainer.devices"),
    ({"trainer.devices": [0, -1]}, "trainer.devices"),
    ({"trainer.accelerator": "tpux"}, "trainer.accelerator"),
    ({"trainer.precision": "foo"}, "trainer.precision"),
    # float16 Adam moments: a gradient under ~1e-3 squares to 0 and the step divides by it (the tiny
    # decoder: 195704 of its 196131 weights inf or NaN after one step, loss nan from the second)
    ({"trainer.precision": "16-true"}, "trainer.precision: 16-true keeps the weights and AdamW's moments in float16"),
    ({"trainer.num_nodes": 0}, "trainer.num_nodes"),
    ({"mode.x": 1}, r"setting mode.x: mode is a value \('video'\), not a group of settings"),
    ({"trainer": 5, "trainer.lr": 1}, "setting trainer.lr: trainer is a value"),
])
def test_values_that_would_fail_late_or_silently_are_config_errors(override, named):
    """Each failed inside training (a KeyError, an einops error, a ZeroDivisionError) or quietly
    changed it (no clipping, no conditioning, no steps): now an error that names the key."""
    with pytest.raises(ConfigError, match=named):
        load_config(ROOT / "configs" / "tiny" / "decoder.yaml", override)


def test_lowres_noise_belongs_to_super_resolution_and_stays_within_training():
    with pytest.raises(ConfigError, match="sampling.lowres_noise: the net trains on levels up to "
                                         "data.lowres_noise_max = 0.5, got 0.6"):
        load_config(ROOT / "configs" / "tiny" / "sr_high.yaml", {"sampling.lowres_noise": 0.6})
    with pytest.raises(ConfigError, match="data.lowres_noise_max: only super-resolution stages have a low-res "
                                         "input, this is decoder"):
        load_config(ROOT / "configs" / "tiny" / "decoder.yaml", {"data.lowres_noise_max": 0.5})


def test_sr_low_windows_must_advance():
    with pytest.raises(ConfigError, match="sampling.window_overlap: windows are data.frames = 6 frames long, so "
                                         "they can share at most 5, got 6"):
        load_config(ROOT / "configs" / "tiny" / "sr_low.yaml", {"sampling.window_overlap": 6})
    most = load_config(ROOT / "configs" / "tiny" / "sr_low.yaml", {"sampling.window_overlap": 5})
    assert most.sampling.window_overlap == 5


def test_interpolation_samples_at_a_skip_it_trained_on():
    with pytest.raises(ConfigError, match="sampling.skip: the net trains on skips 2 to data.max_skip = 5, got 9"):
        load_config(ROOT / "configs" / "tiny" / "interpolation.yaml", {"sampling.skip": 9})
    with pytest.raises(ConfigError, match="sampling.skip"):
        load_config(ROOT / "configs" / "tiny" / "interpolation.yaml", {"sampling.skip": 0})
