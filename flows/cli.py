"""The `mav` command: one subcommand per flow.

Each flows module that offers a subcommand defines `register(subparsers)`,
which adds its parser and sets `func` to a handler taking the parsed args.
Only the module of the command being run is imported (torch, MLflow and Prefect
take seconds to import), and commands that run Prefect flows start Prefect's
temporary server first, so that it boots while the imports run.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path

from flows.early_server import ServerError, serving, start_if_needed

COMMAND_MODULES = {"ingest": "flows.ingest", "train": "flows.train", "sample": "flows.train",
                   "evaluate": "flows.evaluate", "pipeline": "flows.pipeline"}
FLOW_COMMANDS = {"ingest", "evaluate", "pipeline"}


def at_least(low: int, below: int | None = None):
    """An argparse type for whole numbers >= low (and < below): anything else is a usage error naming
    the option."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be below {below}, got {value}")
        return value
    return parse


positive_int, non_negative_int = at_least(1), at_least(0)
# torch generators take 64-bit seeds, and video i gets seed + i (a negative seed wrapped to a large one)
seed_int = at_least(0, 2**63)


def non_negative_float(text: str) -> float:
    """An argparse type for finite numbers >= 0 (nan and inf are typos, never settings)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type for finite numbers > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def with_notes(err: BaseException) -> str:
    """The error's message and its notes (what was kept where), one per line."""
    return "\n".join([str(err), *getattr(err, "__notes__", [])]).strip()


def writable_folder(folder: str | Path, name: str) -> Path:
    """`folder`, created if missing; a ValueError naming `name` if it cannot be made or written
    (checked before a flow starts: its failure would come after work, behind a trace)."""
    if not str(folder).strip():  # Path("") is the working directory
        raise ValueError(f"{name} is empty (an unset shell variable?)")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{name} {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{name} {folder}: cannot be created ({err.strerror or err})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{name} {folder}: cannot be written")
    return folder


def device_name(text: str) -> str:
    """An argparse type: auto, or a device torch knows and this machine has."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (auto, cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    # mps, xpu, meta...: they failed only after the checkpoints were read
    backend = getattr(torch, device.type, None)
    if device.type not in ("cpu", "cuda") and not (hasattr(backend, "is_available") and backend.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no such device (auto, cpu, cuda, ...)")
    return text


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command` alone, or for every command (help, unknown commands)."""
    parser = argparse.ArgumentParser(prog="mav", description="Make-A-Video platform")
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else COMMAND_MODULES.values()
    for name in dict.fromkeys(modules):
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("DO_NOT_TRACK", "1")  # offline: no telemetry calls
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # a fresh PREFECT_HOME runs database migrations on the temporary server's first start
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    command = argv[0] if argv else None
    server = start_if_needed() if command in FLOW_COMMANDS and "-h" not in argv and "--help" not in argv else None
    try:
        args = build_parser(command).parse_args(argv)
        with serving(server):
            return int(args.func(args) or 0)
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        said = with_notes(err)
        print(f"interrupted: {said}" if said else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
