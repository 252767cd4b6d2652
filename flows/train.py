"""`mav train STAGE --config ...` and `mav sample --prompt ...`: thin CLI over models.train / models.sampling."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flows.cli import device_name, non_negative_float, positive_int, seed_int, writable_folder
from flows.registry import add_registry_options, chain_from_registry, checkpoints_from_registry, describe
from flows.tracking import default_tracking_uri

STAGES = ("prior", "decoder", "interpolation", "sr_low", "sr_high")
CHAIN_FLAGS = {"prior": "--prior", "decoder": "--decoder", "interpolation": "--interpolation",
               "sr_low": "--sr-low", "sr_high": "--sr-high"}


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train one Make-A-Video stage")
    train.add_argument("stage", help=f"one of: {', '.join(STAGES)}")
    train.add_argument("--config", required=True, type=Path, help="configs/<size>/<stage>.yaml")
    train.add_argument("--data-root", type=Path)
    train.add_argument("--dataset")
    train.add_argument("--init", type=Path, help="checkpoint to start from (inflation / decoder -> interpolation)")
    train.add_argument("--resume", action="store_true", help="continue OUT/checkpoints/last.ckpt exactly")
    train.add_argument("--out", type=Path, help="output folder (default runs/<stage>)")
    train.add_argument("--max-steps", type=positive_int)
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set mode=image --set trainer.lr=1e-4 (YAML values)")
    train.set_defaults(func=run_train)

    sample = subparsers.add_parser("sample", help="text -> video through the trained stages")
    sample.add_argument("--prompt", required=True, action="append", help="repeat for several videos")
    sample.add_argument("--out", type=Path, default=Path("video.mp4"),
                        help="the .mp4 (a .gif beside it); for several prompts, the folder of that name")
    sample.add_argument("--checkpoints", type=Path, help="folder with <stage>.ckpt or <stage>/checkpoints/last.ckpt")
    add_registry_options(sample, instead_of="--checkpoints")
    sample.add_argument("--tracking-uri", help="with --registry or models:/ URIs: the MLflow store "
                                               "(default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    for stage, flag in CHAIN_FLAGS.items():
        sample.add_argument(flag, dest=f"ckpt_{stage}", metavar="CKPT",
                            help=f"{stage} checkpoint: a file, or a registered version (models:/NAME@ALIAS, "
                                 "models:/NAME/VERSION)")
    sample.add_argument("--steps", type=positive_int)
    sample.add_argument("--guidance", type=non_negative_float)
    sample.add_argument("--seed", type=seed_int, default=0,
                        help="the first video's seed; the i-th prompt's video gets seed + i, and alone with that "
                             "seed comes out the same")
    sample.add_argument("--lowres-noise", type=float, metavar="LEVEL",
                        help="noise level of the SR stages' low-res input, 0 to the level they trained up to "
                             "(default: each one's sampling.lowres_noise)")
    sample.add_argument("--device", type=device_name, default="auto", help="cuda, cpu, ... (default: cuda when available)")
    sample.set_defaults(func=run_sample)


def unwrapped(err: Exception) -> str:
    """An error's own message: one raised in a DataLoader worker arrives as "Caught DataError in
    DataLoader worker process 0." with the worker's traceback, whose last line is the message."""
    text = str(err).strip()
    if text.startswith("Caught ") and "\n" in text:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text


def run_train(args) -> int:
    from models.config import ConfigError, load_config, parse_overrides
    from models.data import DataError
    from models.stages import CheckpointError
    from models.train import train_stage

    if args.stage not in STAGES:
        print(f"error: unknown stage {args.stage!r}; stages are {', '.join(STAGES)}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, parse_overrides(args.set))
        out_dir = writable_folder(args.out or Path("runs") / args.stage, "--out")  # a file there failed in fit
        result = train_stage(args.stage, config, data_root=args.data_root, dataset=args.dataset, init=args.init,
                             resume=args.resume, out_dir=out_dir, max_steps=args.max_steps)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {unwrapped(err)}", file=sys.stderr)
        return 2
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:  # (every process of a multi-device run gets here, each with its own loss)
        mfu = f" ({100 * result.mfu:.1f} % MFU)" if result.mfu is not None else ""
        speed = (f"{result.samples_per_s:.1f} samples/s, {result.tflops:.3g} model TFLOP/s{mfu}, waiting for data "
                 f"{100 * result.data_wait:.0f} % of the time, " if result.samples_per_s else "")
        print(f"{result.stage}: step {result.global_step}, loss {result.train_loss:.4f}, {speed}"
              f"checkpoint {result.checkpoint}")
    return 0


def find_checkpoints(folder: Path | None, explicit: dict[str, Path | None]) -> dict[str, Path]:
    found = {}
    for stage in STAGES:
        if explicit.get(stage):
            found[stage] = explicit[stage]
        elif folder:
            for candidate in (folder / f"{stage}.ckpt", folder / stage / "checkpoints" / "last.ckpt"):
                # a link whose checkpoint is gone is kept, for loading to name: skipped, it silently
                # left its stage out of the chain
                if candidate.exists() or candidate.is_symlink():
                    found[stage] = candidate
                    break
    return found


def chain_checkpoints(args) -> dict[str, Path]:
    """The checkpoint of each stage `mav sample` was given: files, a folder, registered versions."""
    given = {stage: getattr(args, f"ckpt_{stage}") for stage in STAGES if getattr(args, f"ckpt_{stage}")}
    uris = {stage: value for stage, value in given.items() if value.startswith("models:/")}
    checkpoints = find_checkpoints(args.checkpoints, {s: Path(v) for s, v in given.items() if s not in uris})
    versions = {}
    tracking_uri = args.tracking_uri or default_tracking_uri()
    if args.registry:  # a stage named by its own flag keeps it
        found, versions = chain_from_registry(tracking_uri, args.registry, args.model_prefix, skip=given)
        checkpoints |= found
    if uris:
        found, named = checkpoints_from_registry(tracking_uri, uris)
        checkpoints, versions = checkpoints | found, versions | named
    if versions:
        print(f"from the registry ({tracking_uri}): {describe(versions)}")
    return checkpoints


def unwritable(out: Path, several: bool) -> str | None:
    """Why `mav sample` could not write to `out`, found before any sampling (None: it can)."""
    if not out.name:  # ".", "/": no name for the videos' folder (with_suffix raised)
        return "name an .mp4 file, or for several prompts a folder for their videos"
    if several:  # videos go to the folder of out's name without its suffix
        folder = out.with_suffix("")
        if folder.exists() and not folder.is_dir():
            return f"several prompts' videos go to the folder {folder}, which is a file"
    elif out.suffix.lower() != ".mp4":
        return "name an .mp4 file (its .gif preview is written beside it)"
    elif out.is_dir():
        return "is a folder; name an .mp4 file"
    else:
        folder = out.parent
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK):
        return f"cannot write in {existing}"
    return None


def run_sample(args) -> int:
    import torch

    from models.sampling import sample_video, sample_videos
    from models.stages import CheckpointError

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.checkpoints and not args.checkpoints.is_dir():
        print(f"error: --checkpoints {args.checkpoints}: no such folder", file=sys.stderr)
        return 2
    if args.checkpoints and args.registry:
        print("error: give --checkpoints DIR or --registry ALIAS, not both", file=sys.stderr)
        return 2
    try:
        checkpoints = chain_checkpoints(args)
    except ValueError as err:  # RegistryError: no such version, a checkpoint gone or corrupt
        print(f"error: {err}", file=sys.stderr)
        return 2
    missing = [CHAIN_FLAGS[s] for s in ("prior", "decoder") if s not in checkpoints]
    if missing:
        where = (f"in {args.checkpoints} (as <stage>.ckpt or <stage>/checkpoints/last.ckpt)" if args.checkpoints
                 else "(give --checkpoints DIR, e.g. the pipeline's mav-runs/checkpoints, or --registry champion)")
        print(f"error: no {' or '.join(s.removeprefix('--') for s in missing)} checkpoint {where}; "
              f"or name it with {', '.join(missing)}", file=sys.stderr)
        return 2
    if problem := unwritable(args.out, several=len(args.prompt) > 1):
        print(f"error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    try:
        if len(args.prompt) == 1:
            results = [sample_video(args.prompt[0], checkpoints, args.out, steps=args.steps, guidance=args.guidance,
                                    seed=args.seed, device=args.device, lowres_noise=args.lowres_noise)]
        else:
            results = sample_videos(args.prompt, checkpoints, args.out.with_suffix(""), steps=args.steps,
                                    guidance=args.guidance, seed=args.seed, device=args.device,
                                    lowres_noise=args.lowres_noise)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder made read-only meanwhile
        print(f"error: writing the video under {args.out}: {err}", file=sys.stderr)
        return 1
    for r in results:
        t, h, w, _ = r.frames.shape
        print(f"{r.prompt!r}: {t} frames {w}x{h} @ {r.fps:g} fps, seed {r.seed} -> {r.mp4} {r.gif or ''}")
    return 0


if __name__ == "__main__":  # python -m flows.train ...
    parser = argparse.ArgumentParser(prog="mav")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
