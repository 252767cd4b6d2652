"""One training step of the tiny decoder through FSDP's root forward with the project's bf16
mixed precision, as Lightning's FSDPStrategy runs it (under autocast; here the CPU's). Prints, as
JSON, the dtype of x0 inside the diffusion loss and whether the loss is finite.

    python tests/fsdp_bf16_probe.py PORT
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.config import load_config  # noqa: E402
from models.stages import build_stage  # noqa: E402
from models.train import fsdp_strategy  # noqa: E402

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
strategy = fsdp_strategy(bf16=True)
stage = build_stage(load_config(REPO / "configs" / "tiny" / "decoder.yaml"))
stage.log = lambda *args, **kwargs: None  # no trainer attached
seen = {}
loss_fn = stage.diffusion.loss


def spy(denoise, x0, noise=None, t=None):
    seen["x0"] = str(x0.dtype)
    return loss_fn(denoise, x0, noise, t)


stage.diffusion.loss = spy
model = FSDP(stage, auto_wrap_policy=strategy.kwargs["auto_wrap_policy"], mixed_precision=strategy.mixed_precision,
             device_id=torch.device("cpu"), use_orig_params=True)
batch = {"video": torch.rand(2, 3, 8, 16, 16) * 2 - 1, "fps": torch.tensor([29.97, 11.988])}
with torch.autocast("cpu", dtype=torch.bfloat16):  # Lightning's forward_context for bf16-mixed (on CUDA)
    loss = _ForwardRedirection()(model, stage, "training_step", batch, 0)
print(json.dumps({"x0": seen["x0"], "finite": bool(torch.isfinite(loss).item())}))
dist.destroy_process_group()
