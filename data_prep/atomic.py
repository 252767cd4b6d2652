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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as temp, open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_json(path: Path, payload) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=1, sort_keys=True, default=str).encode())
