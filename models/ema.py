"""EMA of the trained weights that also works on sharded (FSDP) models.

Lightning's EMAWeightAveraging keeps a deep copy of the whole, unsharded module and
averages it against `pl_module`'s parameters, which under FSDP are each rank's shards
(its docs: "sharded models do not work with weight averaging"). Here each rank keeps
the EMA of exactly the parameter storage it holds (the full tensors without FSDP, its
local shards with FSDP's `use_orig_params`), so the update is local and costs no
communication. Whole EMA weights are only assembled when a checkpoint is written, by
swapping the averages in and asking the strategy for its (gathered) state dict.

Checkpoints keep Lightning's layout: `state_dict` holds the EMA weights (what sampling
loads) and `current_model_state` the raw weights that `--resume` continues from.

The average is kept in float32 at least: at a 16-bit *-true precision an update of
(1 - decay) times the step's change rounds away in the weights' own dtype (bf16 keeps
8 bits), and the average would stay near the weights it started from.
"""
from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from models.stages import sharded


class ShardedEMA(Callback):
    def __init__(self, decay: float, warmup: bool = True):  # 0 < decay < 1: TrainerConfig.ema_decay checks it
        self.decay = decay
        self.warmup = warmup
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.shadow: list[torch.Tensor] = []
        self._resumed: dict | list | None = None  # EMA read from a checkpoint: whole state or local shards
        self._step = -1  # the optimizer step last averaged in

    def on_train_start(self, trainer, pl_module):
        # after the strategy wrapped (and sharded) the model and after any checkpoint was restored
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self._step = trainer.global_step
        if isinstance(self._resumed, dict):
            self.shadow = [self._resumed[n].to(device=p.device, dtype=averaged_dtype(p)).clone() for n, p in named]
        elif isinstance(self._resumed, list):
            self.shadow = self._resumed
        else:
            self.shadow = [p.detach().to(averaged_dtype(p), copy=True) for p in self.params]
        self._resumed = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._step:  # gradient accumulation: no optimizer step this batch
            return
        self._step = trainer.global_step
        weights = [p.detach().to(e.dtype) for p, e in zip(self.params, self.shadow)]
        torch._foreach_lerp_(self.shadow, weights, 1.0 - self.decay_at(self._step - 1))

    def decay_at(self, n: int) -> float:
        """The decay of the n-th optimizer step (from 0); the global step, so a resume keeps the schedule."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module):
        for p, e in zip(self.params, self.shadow):  # the trained module ends with the averaged weights
            p.copy_(e)
        self.names, self.params, self.shadow = [], [], []  # release the copy; later saves hold the average

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if not self.shadow:  # outside fit: the weights already are the averaged ones
            return
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        if not sharded(trainer):  # the parameter names are the state_dict's keys; saved before the next update
            checkpoint["state_dict"] = {**checkpoint["state_dict"], **dict(zip(self.names, self.shadow))}
            return
        raw = self._average_in()
        try:  # collective under FSDP: every rank is here. Unsharded state_dict tensors may share the
            # params' storage, which the restore overwrites: hence the copies
            state = trainer.strategy.lightning_module_state_dict()
            checkpoint["state_dict"] = {k: v.clone() for k, v in state.items()}
        finally:
            self._restore(raw)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if "current_model_state" not in checkpoint:
            return  # a checkpoint written without EMA: the average starts from its weights
        # Lightning has just loaded `state_dict` (the EMA) into the model; training continues from the raw weights
        if not sharded(trainer):  # restored before the strategy set the model up
            self._resumed = checkpoint["state_dict"]
            pl_module.load_state_dict(checkpoint["current_model_state"])
        else:  # FSDP restores after sharding and consumes `state_dict`: the local shards now hold the EMA
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            self._resumed = [p.detach().to(averaged_dtype(p), copy=True) for p in pl_module.parameters()
                             if p.requires_grad]
            model = trainer.strategy.model  # each rank reads the whole state and keeps its shards
            with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
                model.load_state_dict(checkpoint["current_model_state"])

    @torch.no_grad()
    def _average_in(self) -> list[torch.Tensor]:
        """Copy the averages into the parameters; -> the raw weights, for `_restore`. (Not a swap: the
        averages would come back through the parameters' dtype, rounded.)"""
        raw = [p.detach().clone() for p in self.params]
        for p, e in zip(self.params, self.shadow):
            p.copy_(e)
        return raw

    @torch.no_grad()
    def _restore(self, raw: list[torch.Tensor]):
        for p, r in zip(self.params, raw):
            p.copy_(r)


def averaged_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype the average of `p` is kept in: float32, or p's own if wider (64-true)."""
    return torch.promote_types(p.dtype, torch.float32)
