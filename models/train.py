"""`train_stage`: validate everything, then fit one stage with Lightning.

Order matters: the stage name, the config, the data and any checkpoint (--init or
--resume) are all checked before the Trainer starts, so bad input fails in seconds.
Checkpoints go to OUT_DIR/checkpoints (`last.ckpt` always; `--resume` continues from
it at the same step with the same optimizer state).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import TorchCheckpointIO

from data_prep.atomic import replacing
from models.compat import scratch_problem
from models.config import STAGES, ConfigError, StageConfig, as_config
from models.data import StageDataModule
from models.ema import ShardedEMA
from models.flops import StepFlops, peak_bf16
from models.stages import build_stage, check_resume, init_from_checkpoint, read_checkpoint


class AlreadyTrained(ConfigError):
    """--resume of a run whose checkpoint is at (or past) the step the run ends at."""

    def __init__(self, checkpoint: Path, step: int, end: int):
        super().__init__(f"--resume: {checkpoint} is at step {step}, and the run ends at step {end} "
                         "(--max-steps, else trainer.max_steps): raise it to train further")
        self.checkpoint, self.step = checkpoint, step


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, saying where the run can go on. (Lightning turns the interrupt into
    exit(1), which callers, Prefect among them, take for a crash.)"""


@dataclass
class TrainResult:
    stage: str
    checkpoint: Path  # last.ckpt
    best_checkpoint: Path | None
    global_step: int
    train_loss: float
    samples_per_s: float | None = None  # over the run but its first batch (TrainingSpeed)
    data_wait: float | None = None
    tflops: float | None = None  # model TFLOP/s, all ranks together
    mfu: float | None = None  # per GPU, of its bf16 peak (GPUs in models.flops.PEAK_BF16 only)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file beside their target, synced, then renamed over it, so a
    killed run leaves the previous last.ckpt whole (Lightning writes local checkpoints to a temp
    file in $TMPDIR and moves it: across file systems that move copies into last.ckpt)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if "://" in str(path) or storage_options is not None:  # object stores: Lightning's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        with replacing(Path(path)) as temp, open(temp, "wb") as handle:  # .part: never taken for a checkpoint
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())


class StepCheckpoint(ModelCheckpoint):
    """Also writes `last` at the final step, before EMA swaps the averaged weights in at train end
    (so `last.ckpt` keeps the raw weights for resuming and the EMA weights as the state_dict)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = self._every_n_train_steps
        if trainer.global_step >= trainer.max_steps > 0 and (not every or trainer.global_step % every):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class TrainingSpeed(Callback):
    """Logs, every `log_every` steps, `train/samples_per_s` (over all ranks) and `train/data_wait`: the
    share of the loop's time spent waiting for its next batch. Near 0, data is not what holds training
    back; well above it, raise data.num_workers. (On a GPU the wait is the host's: queued work may run
    through part of it.) The first batch is left out: it holds the start-up and any compilation.
    Also `train/tflops`, the model FLOP/s achieved over all ranks (models.flops: counted once, from the
    first batch's shapes), and on a GPU whose bf16 peak is known `train/mfu`, that per GPU over the peak."""

    def __init__(self):
        self.last_end: float | None = None  # when the previous batch ended
        self.elapsed = self.waited = 0.0  # since the first batch ended
        self.samples = 0
        self.at_log = (0.0, 0.0, 0)  # (elapsed, waited, samples) when it last logged
        self.logged_step = -1  # (batches of one accumulated step share its number)
        self.flops: StepFlops | None = None
        self.peak: float | None = None  # of all ranks' devices together

    def on_train_start(self, trainer, pl_module):
        self.peak = peak_bf16(trainer.strategy.root_device)
        self.peak = self.peak * trainer.world_size if self.peak else None
        self.flops = StepFlops(pl_module.net)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.last_end is not None:
            self.waited += time.perf_counter() - self.last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.flops.per_sample()  # counted once, after the first batch: in its time, not in a wait for data
        step = trainer.global_step
        logs = step % trainer.log_every_n_steps == 0 and step != self.logged_step and self.last_end is not None
        if logs and trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the interval's wall time includes the work queued in it
        now = time.perf_counter()
        if self.last_end is not None:
            self.elapsed += now - self.last_end
            self.samples += pl_module.last_batch_size * trainer.world_size
        self.last_end = now
        if logs:
            elapsed, waited, samples = (total - before for total, before in
                                        zip((self.elapsed, self.waited, self.samples), self.at_log))
            pl_module.log_dict({"train/samples_per_s": samples / elapsed, "train/data_wait": waited / elapsed,
                                **self.compute_rates(samples / elapsed)}, rank_zero_only=True, batch_size=1)
            self.at_log, self.logged_step = (self.elapsed, self.waited, self.samples), step

    def compute_rates(self, samples_per_s: float) -> dict[str, float]:
        """train/tflops and, where the peak is known, train/mfu at this rate of samples."""
        per_sample = self.flops.per_sample() if self.flops else None
        if per_sample is None:
            return {}
        achieved = samples_per_s * per_sample
        return {"train/tflops": achieved / 1e12} | ({"train/mfu": achieved / self.peak} if self.peak else {})

    def run_speed(self) -> tuple[float | None, float | None, float | None, float | None]:
        """(samples/s, data wait share, TFLOP/s, MFU) over the whole run but its first batch; None
        before a second batch, and MFU None where the peak is not known."""
        if self.elapsed <= 0:
            return None, None, None, None
        rates = self.compute_rates(self.samples / self.elapsed)
        return self.samples / self.elapsed, self.waited / self.elapsed, rates.get("train/tflops"), \
            rates.get("train/mfu")


def fsdp_strategy(cls=None, bf16: bool = False):
    """FSDP with one unit per U-Net block, and inside them a unit per layer that only the video
    model has: frozen spatial weights and trained temporal weights then never share a flat
    parameter (FSDP would keep a gradient for the whole of it). `cls`: an FSDPStrategy subclass.
    bf16: compute in bf16 but reduce gradients (and keep buffers) in float32, as DDP under
    bf16-mixed does; Lightning's default for bf16-mixed also reduces in bf16. The batch stays
    float32 (FSDP would cast the root's inputs): the noising is built from it outside the net, and
    x_t keeps its smallest noise (a standard deviation of 0.006 at the cosine schedule's first
    timestep, the size of a bf16 rounding) until the net's first layer. Lightning's autocast runs
    the net in bf16 all the same."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    from models.layers import ScalarEmbedding, TemporalAttention, TemporalConv
    from models.unet import AttentionBlock, ResBlock

    units = {ResBlock, AttentionBlock, TemporalConv, TemporalAttention, ScalarEmbedding}
    precision = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32,
                               cast_root_forward_inputs=False) if bf16 else None
    return (cls or FSDPStrategy)(auto_wrap_policy=units, activation_checkpointing_policy=None,
                                 mixed_precision=precision)


def _strategy(name: str, precision: str):
    if name == "fsdp":
        return fsdp_strategy(bf16=precision.startswith("bf16"))
    if name == "ddp":
        return "ddp"
    return "auto"


def build_trainer(cfg: StageConfig, out_dir: Path, *, logger=None, callbacks=None, max_steps=None,
                  strategy=None) -> L.Trainer:
    tc = cfg.trainer
    cuda = torch.cuda.is_available() and tc.accelerator in ("auto", "gpu", "cuda")
    precision = tc.precision if tc.precision != "auto" else ("bf16-mixed" if cuda else "32-true")
    # no version counter: it writes `last-v1.ckpt` beside an existing `last.ckpt` whenever the run folder
    # was moved since the checkpoint (Lightning compares absolute paths), and --resume would then
    # continue from the stale one. train_stage refuses a fresh run in a folder that has a last.ckpt
    checkpoint = StepCheckpoint(dirpath=out_dir / "checkpoints", filename="step{step:07d}", auto_insert_metric_name=False,
                                every_n_train_steps=tc.checkpoint_every, save_last=True, save_top_k=1,
                                enable_version_counter=False)
    cbs: list[Callback] = [checkpoint, TrainingSpeed(), *(callbacks or [])]
    if tc.ema_decay > 0:
        cbs.append(ShardedEMA(tc.ema_decay, warmup=tc.ema_warmup))
    logger = logger if logger is not None else CSVLogger(out_dir, name="logs")
    # only what reads the trainer settings is in the try: a bug of ours in the callbacks stays a bug.
    # Lightning refuses e.g. gpu on a machine without one, fsdp on a CPU (MisconfigurationException),
    # GPU ids on a CPU (TypeError), a precision whose package is missing (transformer-engine: ImportError)
    try:
        strategy = strategy or _strategy(tc.strategy, precision)
        # a Strategy object that brings its own CheckpointIO keeps it (Lightning refuses two)
        plugins = [] if getattr(strategy, "_checkpoint_io", None) else [AtomicCheckpointIO()]
        return L.Trainer(
            max_steps=max_steps or tc.max_steps, accelerator=tc.accelerator, devices=tc.devices,
            num_nodes=tc.num_nodes, strategy=strategy, precision=precision, gradient_clip_val=tc.grad_clip or None,
            accumulate_grad_batches=tc.accumulate_grad_batches, log_every_n_steps=tc.log_every, callbacks=cbs,
            plugins=plugins, benchmark=cuda,  # cuDNN picks its convolution algorithms (fixed shapes each step)
            logger=logger, default_root_dir=out_dir,
            enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
        )
    except (MisconfigurationException, TypeError, ValueError, ImportError) as err:
        raise ConfigError(f"trainer: accelerator {tc.accelerator}, devices {tc.devices}, num_nodes {tc.num_nodes}, "
                          f"strategy {tc.strategy}, precision {tc.precision}: {err}") from None


def train_stage(stage: str, config: StageConfig | dict | str | Path, *, data_root: str | Path | None = None,
                dataset: str | None = None, version: str | None = None, init: str | Path | None = None,
                resume: bool = False, out_dir: str | Path, logger=None, callbacks=None,
                max_steps: int | None = None, strategy=None) -> TrainResult:
    """`strategy`: a Lightning Strategy object to use instead of `trainer.strategy` (a cluster's own
    environment or FSDP settings)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    cfg = as_config(config)
    if cfg.stage != stage:
        raise ConfigError(f"stage: the config is for {cfg.stage!r}, not {stage!r}")
    out_dir = Path(out_dir)
    last = out_dir / "checkpoints" / "last.ckpt"
    if resume and init:
        raise ValueError("--resume continues from the run's own last.ckpt; --init only starts a new run: drop one")
    if resume and not last.exists():
        raise FileNotFoundError(f"--resume: no {last} to continue from")
    if not resume and last.exists():
        raise FileExistsError(f"{last} is an earlier run's: pass --resume to continue it, or another --out")

    if not (init or resume) and (problem := scratch_problem(cfg)):
        raise ConfigError(problem)
    datamodule = StageDataModule(cfg, data_root, dataset, version).check()
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module = build_stage(cfg)
    if cfg.trainer.precision in ("64-true", "64"):  # Lightning doubles the module only after it restored a
        module.double()  # --resume checkpoint into it: the float64 weights would pass through float32
    if resume:
        step, datamodule.curriculum_steps = check_resume(module, last)
        end = max_steps or cfg.trainer.max_steps
        if step >= end:
            raise AlreadyTrained(last, step, end)
    elif init:
        init_from_checkpoint(module, init)

    trainer = build_trainer(cfg, out_dir, logger=logger, callbacks=callbacks, max_steps=max_steps, strategy=strategy)
    on_ctrl_c = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None)
    except SystemExit as exit_:
        if not isinstance(exit_.__context__, KeyboardInterrupt):  # Lightning's Ctrl-C is exit(1) while handling it
            raise
        signal.signal(signal.SIGINT, on_ctrl_c)  # Lightning ignores SIGINT for its shutdown (restored only sometimes)
        saved = (f"{last} holds step {read_checkpoint(last)['global_step']}, where a resume goes on (mav train "
                 "--resume; a pipeline resumes by itself when run again)" if last.exists() else "no checkpoint yet")
        raise TrainingInterrupted(f"{stage} stopped at step {trainer.global_step}; {saved}") from None
    ckpt_cb = trainer.checkpoint_callback
    best = Path(ckpt_cb.best_model_path) if ckpt_cb and ckpt_cb.best_model_path else None
    speed = next(cb for cb in trainer.callbacks if isinstance(cb, TrainingSpeed))
    return TrainResult(stage, last, best, trainer.global_step, float(module.last_loss), *speed.run_speed())
