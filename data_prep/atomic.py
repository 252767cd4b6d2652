"""Writes that are whole or absent: a temp file beside the target, renamed over it at the end.

Temp names start with `.tmp-` (a killed run's leftovers are what `remove_stale_temporaries`
removes) and end in `.part` unless asked otherwise, so no scan for videos, checkpoints or
records takes one for the real thing.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path, suffix: str = ".part"):
    """Yield a temp path beside `path`; it replaces `path` if the block ends without an error and
    is removed either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".tmp-{uuid.uuid4().hex}{suffix}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """Flush to disk a file's bytes, or a folder's entries (the names just renamed into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(temp: Path, path: Path) -> None:
    """Rename a complete temp file that another process wrote (an encoder) over `path`, its bytes
    flushed first as `atomic_write_bytes` flushes its own: after a crash, `path` is the old file or
    the whole new one, never a name whose bytes never reached the disk."""
    fsync_path(temp)
    os.replace(temp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as temp, open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_json(path: Path, payload) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=1, sort_keys=True, default=str).encode())
