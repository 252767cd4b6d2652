"""Training on a CUDA GPU: FSDP from config (with EMA and exact resume), bf16, channels_last, compile.

(test_models_stages.py checks FSDP's numbers against DDP's exactly, on two CPU processes in float32;
here FSDP runs on CUDA with bf16 parameter copies.)

Skipped without a GPU (CI has none); run on a GPU host with `pytest -m gpu`.
"""
import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from data_prep.synthetic import moving_shape_frames, write_synthetic_dataset
from models.config import load_config
from models.stages import build_stage, init_from_checkpoint, load_stage, read_checkpoint
from models.train import train_stage

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FSDP, bf16 kernels)")]


def tiny(stage, **overrides):
    return load_config(ROOT / "configs" / "tiny" / f"{stage}.yaml",
                       {"trainer.accelerator": "gpu", "trainer.devices": 1, **overrides})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The clips are written with an ffmpeg binary. A GPU host without one (the device machine) is
    given a copy written elsewhere: MAV_GPU_TEST_DATA names its root, as bench/gpu_run.sh does."""
    if os.environ.get("MAV_GPU_TEST_DATA"):
        return Path(os.environ["MAV_GPU_TEST_DATA"])
    root = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(root, "shapes", num_clips=8, frames=20, size=64, fps=12)
    return root


def write_base_chain_data(root: Path) -> Path:
    """What configs/base/pipeline.yaml's steps read, at their sizes: 256 px clips (the base ingest's) long
    enough for interpolation's widest window ((16 - 1) x 5 + 1 frames), and 768 px image-text pairs
    for the prior and sr_high. -> root (under 1 MB: bench/gpu_run.sh carries it to the device)."""
    from PIL import Image

    write_synthetic_dataset(root, "clips256", num_clips=6, frames=80, size=256, fps=24)
    pairs = root / "image-text"
    pairs.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        frames, caption = moving_shape_frames(rng, 1, 768)
        Image.fromarray(frames[0]).save(pairs / f"{i}.jpg", quality=90)
        (pairs / f"{i}.txt").write_text(caption)
    return root


def train_and_sample_base_chain(root: Path, out: Path, accelerator: str) -> torch.Tensor:
    """configs/base/pipeline.yaml's steps, each from its base config with the pipeline's overrides and
    init_from, two training steps each; then the chain samples one video. -> float [3,T,H,W].
    Eager (the compiled step is bench/train_step.py's), batch 2, and the tiny CLIP: the device
    machine has no hub access, so the base CLIP cannot load there; the networks are the base ones."""
    from models.sampling import generate, load_chain

    pipeline = yaml.safe_load((ROOT / "configs" / "base" / "pipeline.yaml").read_text())
    checkpoints, chain = {}, {}
    for step in pipeline["steps"]:
        overrides = {**step.get("overrides", {}), "clip": "tiny", "data.batch_size": 2, "data.num_workers": 2,
                     "trainer.compile": False, "trainer.accelerator": accelerator, "trainer.devices": 1}
        if accelerator == "cpu":  # a check of this function itself: bf16 autocast is slow on a CPU, and the
            overrides |= {"trainer.precision": "32-true", "data.batch_size": 1}  # video decoder's batch 2 took 15 GB
        if "data.image_path" in overrides:
            overrides["data.image_path"] = str(root / "image-text")
        cfg = load_config(ROOT / step["config"], overrides)
        result = train_stage(step["stage"], cfg, data_root=root, dataset="clips256", out_dir=out / step["name"],
                             init=checkpoints.get(step.get("init_from")), max_steps=2)
        assert result.global_step == 2 and math.isfinite(result.train_loss), step["name"]
        checkpoints[step["name"]] = chain[step["stage"]] = result.checkpoint  # a stage's last step samples
    device = "cuda" if accelerator == "gpu" else "cpu"
    video, _ = generate(load_chain(chain, device), ["a dog running on a beach"], steps=2)
    return video[0]


def update(state: dict, init: dict) -> torch.Tensor:
    """All trainable weights' change from initialisation, as one vector."""
    return torch.cat([(state[k].float().cpu() - v).flatten() for k, v in init.items()])


def test_fsdp_trains_like_one_device_and_resumes(data_root, tmp_path):
    """The video decoder (frozen spatial layers: mixed requires_grad inside FSDP units) trains under
    FSDP along the same path as without it, writes plain checkpoints with the EMA, and resumes.
    (FSDP's bf16-mixed keeps bf16 parameter copies, plain bf16-mixed autocasts fp32 ones: the two
    updates agree in direction and size, not bit for bit.)"""
    # inflated from a trained image decoder: from scratch, the zero-initialised (and frozen) output
    # conv would keep every gradient but its own at zero
    image = train_stage("decoder", tiny("decoder", mode="image"), data_root=data_root, dataset="shapes",
                        out_dir=tmp_path / "image", max_steps=2).checkpoint
    common = {"data.shuffle_buffer": 0, "trainer.ema_decay": 0.5, "trainer.precision": "bf16-mixed"}
    cfg_plain = tiny("decoder", **common)
    L.seed_everything(cfg_plain.trainer.seed, workers=True, verbose=False)  # as train_stage does: same init
    module = build_stage(cfg_plain)
    init_from_checkpoint(module, image)
    init = {f"net.{n}": p.detach().clone() for n, p in module.net.named_parameters() if p.requires_grad}
    plain = train_stage("decoder", cfg_plain, data_root=data_root, dataset="shapes", out_dir=tmp_path / "plain",
                        init=image, max_steps=3)
    cfg = tiny("decoder", **common, **{"trainer.strategy": "fsdp"})
    sharded = train_stage("decoder", cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path / "fsdp",
                          init=image, max_steps=3)
    assert sharded.global_step == 3
    a, b = read_checkpoint(plain.checkpoint), read_checkpoint(sharded.checkpoint)
    assert a["state_dict"].keys() == b["state_dict"].keys()  # FSDP wrappers left no trace in the names
    load_stage(sharded.checkpoint, "decoder")  # loads as a plain module
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        ua, ub = update(a[key], init), update(b[key], init)
        assert ua.norm() > 0 and torch.cosine_similarity(ua, ub, dim=0) > 0.9, key
        assert 0.8 < ub.norm() / ua.norm() < 1.25, key
    assert not torch.equal(update(b["state_dict"], init), update(b["current_model_state"], init))  # EMA != raw
    resumed = train_stage("decoder", cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path / "fsdp",
                          resume=True, max_steps=5)
    assert resumed.global_step == 5 and resumed.train_loss == resumed.train_loss


def test_compiled_channels_last_bf16_training(data_root, tmp_path):
    cfg = tiny("decoder", mode="image", **{"trainer.compile": True, "trainer.channels_last": True,
                                           "trainer.precision": "bf16-mixed"})
    result = train_stage("decoder", cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path, max_steps=3)
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.train_loss))
    state = read_checkpoint(result.checkpoint)["state_dict"]
    assert not any("_orig_mod" in k for k in state)


def test_the_base_pipeline_steps_train_and_sample_at_the_papers_sizes(tmp_path):
    """Every step of configs/base/pipeline.yaml trains at its base size on the GPU, each from the one
    its init_from names, and the chain samples a video of the paper's size: 16 frames interpolated to
    76 ((16 - 1) x skip 5 + 1), 64 -> 256 -> 768 px. (Without Prefect, MLflow and the base CLIP,
    which the device machine lacks: `mav pipeline --config configs/base/pipeline.yaml` adds those.)"""
    root = Path(os.environ["MAV_GPU_TEST_DATA"]) if os.environ.get("MAV_GPU_TEST_DATA") else \
        write_base_chain_data(tmp_path / "data")
    if not (root / "image-text").is_dir():
        pytest.skip(f"{root} holds no base-chain data: write it with tests.test_models_gpu.write_base_chain_data")
    video = train_and_sample_base_chain(root, tmp_path / "runs", "gpu")
    assert tuple(video.shape) == (3, 76, 768, 768)
    assert torch.isfinite(video).all() and video.std() > 0
