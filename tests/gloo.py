"""Run a function on several CPU processes joined in one gloo process group, as the metric tests do.

    run_in_gloo_group(fn, world, *args)  # calls fn(rank, world, *args) in each; results via shared tensors

Each process leaves with os._exit once its group is destroyed. A normal interpreter shutdown
can free a tensor that one of gloo's threads still holds; the thread then takes the GIL of a
finalising interpreter and the process aborts ("terminate called without an active exception",
SIGABRT), after the work is done and its results written (seen once in CI).
"""
from __future__ import annotations

import gc
import os
import sys

import torch.distributed as dist
import torch.multiprocessing as mp

from tests.servers import free_port


def run_in_gloo_group(fn, world: int, *args) -> None:
    """fn(rank, world, *args) on `world` spawned processes; raises if any of them failed."""
    mp.spawn(_member, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _member(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # no process tears its group down while another still gathers
    finally:
        dist.destroy_process_group()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # an exception above leaves through mp.spawn's own handler, which reports it
