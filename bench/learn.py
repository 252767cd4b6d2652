"""Does the tiny video decoder learn? ~10 minutes of CPU training on synthetic moving shapes.

    python bench/learn.py [--minutes 10]

Trains the tiny decoder (video mode, all layers, from scratch) with the real
LightningModule, DataModule and Trainer, and reports at init and at the end:
  - loss on a fixed held-out set (fixed clips, noise and timesteps),
  - Fréchet distance between generated and real clips in the feature space of a
    FIXED random 3D conv net (seeded; no weights to download).
Target: distance falls >= 50 %, loss >= 30 %. The last line prints the ratios.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_prep.synthetic import write_synthetic_dataset  # noqa: E402
from eval.frechet import frechet_distance_features  # noqa: E402
from models.config import load_config  # noqa: E402
from models.data import StageDataModule  # noqa: E402
from models.stages import build_stage, load_stage  # noqa: E402
from models.train import train_stage  # noqa: E402


def feature_net() -> nn.Module:
    torch.manual_seed(1234)  # fixed random features
    net = nn.Sequential(
        nn.Conv3d(3, 32, 3, stride=(1, 2, 2), padding=1), nn.ReLU(),
        nn.Conv3d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv3d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(),
    )
    return net.eval().requires_grad_(False)


def held_out(cfg, data_root, n):
    dm = StageDataModule(cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": n})}),
                         data_root, "eval").check()
    torch.manual_seed(0)
    return next(iter(dm.train_dataloader()))


@torch.no_grad()
def evaluate(module, batch, feats, steps):
    module.eval()
    # a copy: the module may share its config object with the one training goes on with
    module.config = module.config.model_copy(update={"cond_dropout": 0.0})
    gen = torch.Generator().manual_seed(0)
    x0, cond = module.conditioning(batch)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.linspace(20, 980, x0.shape[0]).long()
    loss = module.diffusion.loss(lambda x, tt: module.denoise(x, tt, cond), x0, noise, t).item()
    fake = module.generate(cond, torch.randn(x0.shape, generator=gen), steps=steps, guidance=1.0)
    fd = float(frechet_distance_features(feats(x0), feats(fake), unbiased=True))  # FVD's exact distance
    return loss, fd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--eval-clips", type=int, default=128)
    ap.add_argument("--sample-steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_dataset(root, "train", num_clips=256, frames=16, size=32, fps=12, seed=0)
        write_synthetic_dataset(root, "eval", num_clips=args.eval_clips, frames=16, size=32, fps=12, seed=1)
        cfg = load_config(ROOT / "configs/tiny/decoder.yaml", {
            "freeze_spatial": False, "trainer.max_steps": 10**6, "trainer.lr": 2e-3, "trainer.warmup_steps": 20,
            "trainer.log_every": 50, "trainer.checkpoint_every": 10**6, "data.batch_size": 16})
        feats = feature_net()
        batch = held_out(cfg, root, args.eval_clips)
        torch.manual_seed(0)
        loss0, fd0 = evaluate(build_stage(cfg), batch, feats, args.sample_steps)
        print(f"init : loss {loss0:.4f}  frechet {fd0:.4f}", flush=True)
        from lightning.pytorch.callbacks import Timer

        t0 = time.time()
        result = train_stage("decoder", cfg, data_root=root, dataset="train", out_dir=root / "run",
                             callbacks=[Timer(duration={"seconds": int(args.minutes * 60)})])
        print(f"trained {result.global_step} steps in {time.time() - t0:.0f} s", flush=True)
        loss1, fd1 = evaluate(load_stage(result.checkpoint), batch, feats, args.sample_steps)
        print(f"final: loss {loss1:.4f}  frechet {fd1:.4f}")
        loss_drop, fd_drop = 1 - loss1 / loss0, 1 - fd1 / fd0
        ok = loss_drop >= 0.3 and fd_drop >= 0.5
        print(f"loss ratio {loss1 / loss0:.3f} (fell {loss_drop:.0%}, target >= 30%)  frechet ratio {fd1 / fd0:.3f} "
              f"(fell {fd_drop:.0%}, target >= 50%)  {'PASS' if ok else 'MISS'}")


if __name__ == "__main__":
    main()
