"""Trains the tiny decoder on two CPU processes (gloo) with DDP or FSDP; run by the distributed tests.

One node of two devices: Lightning relaunches this script for rank 1. Two nodes of one
device each: the test starts it once per node, with NODE_RANK, MASTER_ADDR and MASTER_PORT
set as a cluster's launcher would. Each rank writes OUT/rank<N>.json: the clip ids of the
batches it trained on, its step, the world size, a hash of its final weights (under FSDP,
of its own shards), and per step its own loss and the logged one.

    python tests/dist_probe.py DATA_ROOT DATASET OUT [--nodes N] [--strategy ddp|fsdp]
                               [--steps N] [--resume] [--init CKPT] [--set KEY=VALUE ...]
                               [--then OUT [options] ...]

Each `--then OUT [options]` is one more training run, in the same processes after the one
before (each seeded, into its own OUT, on the process group the first set up; --nodes is the
first run's): a test of several runs starts the processes (torch, Lightning: ~15 s of CPU each
on 2 busy cores) once.
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.config import load_config, parse_overrides  # noqa: E402
from models.train import fsdp_strategy, train_stage  # noqa: E402


class Record(Callback):
    def __init__(self, out: Path):
        self.out, self.ids, self.losses, self.logged = out, [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids += list(batch["clip_id"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))  # this rank's own
        self.logged.append(float(trainer.callback_metrics["train/loss"]))  # what the logger gets

    def on_train_end(self, trainer, pl_module):
        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in pl_module.parameters())
        record = {"ids": self.ids, "step": trainer.global_step, "world": trainer.world_size,
                  "weights": hashlib.sha256(weights).hexdigest(), "losses": self.losses, "logged": self.logged}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class CPUFSDPStrategy(FSDPStrategy):
    """torch's FSDP on CPU processes, which Lightning 2.6 refuses: its Trainer accepts FSDP only
    with a CUDA accelerator (an exact-type check, which a subclass passes), and FSDP must then be
    told the device, as FSDP cannot infer CPU."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **self.kwargs)
        self.kwargs.pop("auto_wrap_policy")  # wrapped: Lightning's own setup now only checks the model
        return super()._setup_model(model)


def _full_state_dict_on_cpu(module, world_size, rank0_only=True):
    """Lightning's full-state-dict context without `offload_to_cpu`. On CPU that "offload" copies
    nothing, so the gathered tensors stay views of buffers that FSDP frees or reuses: the weights
    segfault (Lightning-AI/pytorch-lightning#21804), and an optimizer moment can be saved as
    the next one gathered into the same buffer (seen: a bias's `exp_avg` saved as its `exp_avg_sq`)."""
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        StateDictType,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


def cpu_fsdp() -> FSDPStrategy:
    import lightning.pytorch.strategies.fsdp as pytorch_fsdp

    pytorch_fsdp._get_full_state_dict_context = _full_state_dict_on_cpu
    return fsdp_strategy(CPUFSDPStrategy)


def parse_runs(argv: list[str]) -> list[argparse.Namespace]:
    """The first run's arguments, then one Namespace per `--then OUT [options]` (its DATA_ROOT,
    DATASET and --nodes are the first run's)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("data_root", type=Path)
    parser.add_argument("dataset")
    parser.add_argument("out", type=Path)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--init", type=Path, help="a checkpoint to start from (an image decoder: inflation)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (YAML values)")
    segments = [[]]
    for arg in argv:
        if arg == "--then":
            segments.append([])
        else:
            segments[-1].append(arg)
    first = parser.parse_args(segments[0])
    runs = [first]
    for segment in segments[1:]:
        run = parser.parse_args([str(first.data_root), first.dataset, *segment])
        if run.nodes != parser.get_default("nodes") and run.nodes != first.nodes:
            parser.error("--nodes is the first run's: the processes are started once")
        run.nodes = first.nodes
        runs.append(run)
    return runs


def main() -> None:
    for args in parse_runs(sys.argv[1:]):
        overrides = {"mode": "image", "data.batch_size": 2, "data.num_workers": 0, "data.shuffle_buffer": 0,
                     "trainer.strategy": args.strategy, "trainer.accelerator": "cpu",
                     "trainer.devices": 2 // args.nodes, "trainer.num_nodes": args.nodes}
        overrides |= parse_overrides(args.set)
        cfg = load_config(REPO / "configs" / "tiny" / "decoder.yaml", overrides)
        train_stage("decoder", cfg, data_root=args.data_root, dataset=args.dataset, out_dir=args.out,
                    max_steps=args.steps, resume=args.resume, init=args.init, callbacks=[Record(args.out)],
                    strategy=cpu_fsdp() if args.strategy == "fsdp" else None)


if __name__ == "__main__":
    main()
