"""List ("cat") metric states that gather across processes even where a process holds none."""
from __future__ import annotations

import torch
from torchmetrics.utilities.distributed import gather_all_tensors


class ShapedEmptyStates:
    """Mixin for a torchmetrics Metric. torchmetrics gathers an empty list state as a 1-D
    float32 placeholder, while the other processes send [N, D] float64 tensors: gloo aborts
    ("Received data size doesn't match"), NCCL may hang. Each empty list state is given an
    empty tensor of its own shape and dtype (`empty_state`) before the gather instead."""

    def empty_state(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _sync_dist(self, dist_sync_fn=gather_all_tensors, process_group=None) -> None:
        # the states were cached before this call, so unsync restores the empty lists
        for name in self._reductions:
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                setattr(self, name, [self.empty_state(name)])
        super()._sync_dist(dist_sync_fn, process_group)
