"""Training on a CUDA GPU: FSDP from config (with EMA and exact resume), bf16, channels_last, compile.

Skipped without a GPU (CI has none); run on a GPU host with `pytest -m gpu`.
"""
from pathlib import Path

import pytest
import torch

from data_prep.synthetic import write_synthetic_dataset
from models.config import load_config
from models.stages import load_stage, read_checkpoint
from models.train import train_stage

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FSDP, bf16 kernels)")]


def tiny(stage, **overrides):
    return load_config(ROOT / "configs" / "tiny" / f"{stage}.yaml",
                       {"trainer.accelerator": "gpu", "trainer.devices": 1, **overrides})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(root, "shapes", num_clips=8, frames=20, size=64, fps=12)
    return root


def trainable(state: dict, module) -> dict:
    names = {f"net.{n}" for n, p in module.net.named_parameters() if p.requires_grad}
    return {k: v.float().cpu() for k, v in state.items() if k in names}


def test_fsdp_trains_like_one_device_and_resumes(data_root, tmp_path):
    """The video decoder (frozen spatial layers: mixed requires_grad inside FSDP units) trains under
    FSDP to the same weights as without it, writes plain checkpoints with the EMA, and resumes."""
    common = {"data.shuffle_buffer": 0, "trainer.ema_decay": 0.5, "trainer.precision": "bf16-mixed"}
    plain = train_stage("decoder", tiny("decoder", **common), data_root=data_root, dataset="shapes",
                        out_dir=tmp_path / "plain", max_steps=3)
    cfg = tiny("decoder", **common, **{"trainer.strategy": "fsdp"})
    sharded = train_stage("decoder", cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path / "fsdp",
                          max_steps=3)
    assert sharded.global_step == 3
    a, b = read_checkpoint(plain.checkpoint), read_checkpoint(sharded.checkpoint)
    assert a["state_dict"].keys() == b["state_dict"].keys()  # FSDP wrappers left no trace in the names
    module = load_stage(sharded.checkpoint, "decoder")  # loads as a plain module
    for key in ("state_dict", "current_model_state"):
        ta, tb = trainable(a[key], module), trainable(b[key], module)
        assert ta and all(torch.allclose(ta[k], tb[k], atol=2e-3, rtol=0) for k in ta), key
    moved = [k for k, v in trainable(b["current_model_state"], module).items()
             if not torch.equal(v, trainable(b["state_dict"], module)[k])]
    assert moved  # the EMA differs from the raw weights
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
