"""Training on a CUDA GPU: FSDP from config (with EMA and exact resume), bf16, channels_last, compile.

(test_models_stages.py checks FSDP's numbers against DDP's exactly, on two CPU processes in float32;
here FSDP runs on CUDA with bf16 parameter copies.)

Skipped without a GPU (CI has none); run on a GPU host with `pytest -m gpu`.
"""
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from data_prep.synthetic import write_synthetic_dataset
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
