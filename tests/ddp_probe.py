"""Trains the tiny decoder on two CPU processes with Lightning's DDP (gloo); run by the DDP tests.

One node of two devices: Lightning relaunches this script for rank 1. Two nodes of one
device each: the test starts it once per node, with NODE_RANK, MASTER_ADDR and MASTER_PORT
set as a cluster's launcher would. Each rank writes OUT/rank<N>.json: the clip ids of the
batches it trained on, its step, the world size and a hash of its final weights.

    python tests/ddp_probe.py DATA_ROOT DATASET OUT [NUM_NODES]
"""
import hashlib
import json
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.config import load_config  # noqa: E402
from models.train import train_stage  # noqa: E402


class Record(Callback):
    def __init__(self, out: Path):
        self.out, self.ids = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids += list(batch["clip_id"])

    def on_train_end(self, trainer, pl_module):
        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in pl_module.parameters())
        record = {"ids": self.ids, "step": trainer.global_step, "world": trainer.world_size,
                  "weights": hashlib.sha256(weights).hexdigest()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    data_root, dataset, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    nodes = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    cfg = load_config(REPO / "configs" / "tiny" / "decoder.yaml", {
        "mode": "image", "data.batch_size": 2, "data.num_workers": 0, "data.shuffle_buffer": 0,
        "trainer.strategy": "ddp", "trainer.accelerator": "cpu", "trainer.devices": 2 // nodes,
        "trainer.num_nodes": nodes, "trainer.max_steps": 4})
    train_stage("decoder", cfg, data_root=data_root, dataset=dataset, out_dir=out, callbacks=[Record(out)])


if __name__ == "__main__":
    main()
