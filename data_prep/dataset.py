"""Versioned datasets on disk: per-source records, immutable versions, WebDataset shards.

See docs/dataset-format.md for the layout. Every write is a temp file (or
folder) + rename, so a killed ingest leaves either the old state or the new.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_prep.atomic import atomic_write_bytes, atomic_write_json, fsync_path, replacing

MANIFEST_COLUMNS = [
    "clip_id", "source", "source_sha256", "start_frame", "end_frame", "start_s", "end_s",
    "fps", "num_frames", "width", "height", "clip_path", "caption",
]
# measurements of a clip's frames, so functions of its id: not hashed into the version id (versions
# written before a measurement have none, and a rerun that changes no clip makes no new version)
MEASURE_COLUMNS = ["motion"]
FAILURE_COLUMNS = ["source", "stage", "reason"]


class DatasetError(ValueError, LookupError):
    """A dataset or version that is not there (a bad input, so the commands report it as one)."""


# a folder name, an MLflow tag value in filter strings and a Prefect event resource: nothing to quote
DATASET_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def dataset_dir(data_root: Path, name: str) -> Path:
    if not DATASET_NAME.fullmatch(name or ""):
        raise DatasetError(f"dataset name {name!r}: use letters, digits, '-', '_' and '.' (not first)")
    return Path(data_root) / "datasets" / name


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None):
    """An exclusive lock on `path` (created if missing); other holders, in any process, wait.
    `on_wait` is called once before waiting, if another holds it (to say why nothing happens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def locked(directory: Path, on_wait: Callable[[], None] | None = None):
    """One ingest at a time per dataset (other processes wait)."""
    return file_lock(directory / ".lock", on_wait)


def same_file(fd: int, path: Path) -> bool:
    """Is the open file still the one at `path` (not removed, nor replaced by a newer one)?"""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class LockBusy(Exception):
    """Another holds the lock, and the caller asked not to wait for it."""


@contextlib.contextmanager
def passing_lock(path: Path, wait: bool = True):
    """An exclusive lock like `file_lock` on a file that exists only while it is held, so that
    locks taken once per source leave no file behind: the holder removes it before letting go,
    and a waiter that then finds its file gone opens the path again. Without `wait`, LockBusy
    where another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(path) from None
        if same_file(fd, path):
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked: nobody can take this file over
        os.close(fd)


def source_lock(ds_dir: Path, source_sha: str, settings_hash: str, wait: bool = True):
    """One worker at a time on the same bytes under the same settings (two paths or a path and a
    URL holding them, in one run): the one that waited finds the other's record instead of cutting
    the same clip files at once (and deleting them if its own cut fails)."""
    return passing_lock(ds_dir / ".locks" / f"{source_sha}-{settings_hash}.lock", wait)


def remove_stale_temporaries(directory: Path, older_than_s: float = 0.0) -> int:
    """Temp files a killed run left behind (.tmp-*)."""
    now, removed = time.time(), 0
    for temp in directory.rglob(".tmp-*"):
        if now - temp.stat().st_mtime >= older_than_s:
            shutil.rmtree(temp, ignore_errors=True) if temp.is_dir() else temp.unlink(missing_ok=True)
            removed += 1
    return removed


# ---- per-source records: the unit of resumable work -------------------------------------

def source_record_path(ds_dir: Path, source_sha: str, settings_hash: str) -> Path:
    return ds_dir / "sources" / f"{source_sha}-{settings_hash}.json"


def read_source_record(ds_dir: Path, source_sha: str, settings_hash: str) -> dict | None:
    path = source_record_path(ds_dir, source_sha, settings_hash)
    return json.loads(path.read_text()) if path.exists() else None


def write_source_record(ds_dir: Path, record: dict, settings_hash: str) -> None:
    atomic_write_json(source_record_path(ds_dir, record["source_sha256"], settings_hash), record)


# ---- versions ------------------------------------------------------------------------------

def latest_version(ds_dir: Path) -> str | None:
    pointer = ds_dir / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def resolve_version(ds_dir: Path, version: str | None) -> str:
    if version in (None, "", "latest"):
        version = latest_version(ds_dir)
        if version is None:
            raise DatasetError(f"dataset {ds_dir.name!r} has no version yet under {ds_dir.parent}")
    if not (ds_dir / "versions" / version / "manifest.parquet").exists():
        raise DatasetError(f"dataset {ds_dir.name!r} has no version {version!r}")
    return version


def clip_id_for(source_sha: str, start: int, end: int, settings_hash: str) -> str:
    """A clip's id: its source's bytes, its frames and the settings that cut it."""
    return hashlib.sha256(f"{source_sha}:{start}:{end}:{settings_hash}".encode()).hexdigest()[:16]


def manifest_digest(manifest: pd.DataFrame) -> str:
    """Content hash of a manifest: the version id."""
    rows = manifest[MANIFEST_COLUMNS].sort_values("clip_id").to_dict("records")
    canonical = json.dumps(rows, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def empty_manifest() -> pd.DataFrame:
    ints, floats = ("start_frame", "end_frame", "num_frames", "width", "height"), ("start_s", "end_s", "fps")
    return pd.DataFrame({c: pd.Series(dtype="int64" if c in ints else "float64" if c in floats else "object")
                         for c in MANIFEST_COLUMNS})


def read_manifest_file(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def load_manifest(data_root: Path, name: str, version: str | None = "latest") -> pd.DataFrame:
    """The manifest of a version, with an absolute `clip_abspath` column added."""
    ds_dir = dataset_dir(data_root, name)
    version = resolve_version(ds_dir, version)
    manifest = read_manifest_file(ds_dir / "versions" / version / "manifest.parquet")
    manifest["clip_abspath"] = [str(ds_dir.resolve() / p) for p in manifest["clip_path"]]
    manifest.attrs["version"] = version
    return manifest


def version_info(data_root: Path, name: str, version: str | None = "latest") -> dict:
    ds_dir = dataset_dir(data_root, name)
    version = resolve_version(ds_dir, version)
    path = ds_dir / "versions" / version / "dataset.json"
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # damaged outside the ingest (its writes are atomic): json's message named no file
        raise DatasetError(f"{path}: not readable JSON ({err})") from None


def shard_paths(data_root: Path, name: str, version: str | None = "latest") -> list[Path]:
    ds_dir = dataset_dir(data_root, name)
    info = version_info(data_root, name, version)
    return [ds_dir / p for p in info["shards"]]


def write_shards(ds_dir: Path, manifest: pd.DataFrame, max_clips: int) -> dict[str, str]:
    """WebDataset tars (<clip_id>.mp4 + <clip_id>.json) of these clips; names are content hashes.
    Returns {clip_id: the shard holding it} (relative to the dataset folder)."""
    shard_dir = ds_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    rows = manifest[MANIFEST_COLUMNS].sort_values("clip_id").to_dict("records")
    holder = {}
    for start in range(0, len(rows), max_clips):
        chunk = rows[start:start + max_clips]
        digest = hashlib.sha256(",".join(r["clip_id"] for r in chunk).encode()).hexdigest()[:16]
        final = shard_dir / f"shard-{digest}.tar"
        holder.update({r["clip_id"]: f"shards/{final.name}" for r in chunk})
        if final.exists():
            continue
        with replacing(final) as temp:
            with tarfile.open(temp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for row in chunk:
                    _add_member(tar, f"{row['clip_id']}.mp4", (ds_dir / row["clip_path"]).read_bytes())
                    _add_member(tar, f"{row['clip_id']}.json", json.dumps(row, default=str, sort_keys=True).encode())
            fsync_path(temp)  # on disk before the version that lists it
    return holder


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed mtime: same clips, same bytes
    tar.addfile(info, io.BytesIO(data))


@dataclass
class VersionResult:
    version: str
    created: bool
    parent: str | None
    new_clips: int
    total_clips: int
    path: Path


def commit_version(ds_dir: Path, new_rows: list[dict], failures: list[dict], config: dict,
                   shard_max_clips: int, rejected: set[str] = frozenset(),
                   source_bytes: dict[str, str] | None = None,
                   before_latest: Callable[[str], None] | None = None) -> VersionResult:
    """Parent manifest + this run's clips -> a new immutable version, unless nothing changed.

    `new_rows`: every clip of the sources this run processed (new or unchanged). A source's clips
    in the version are those of its latest processing: re-cut with other clip settings, its
    earlier clips leave the version (they stay in the parent versions and on disk), and so do
    those of a source `rejected` (sha256s) for good under this run's settings, and those of a path
    or URL whose bytes changed (`source_bytes`: source -> the sha256 this run read there).
    `before_latest(version)` runs before `latest` names a new version (a killed run leaves its mark)."""
    parent = latest_version(ds_dir)
    if parent:
        parent_manifest = read_manifest_file(ds_dir / "versions" / parent / "manifest.parquet")
        parent_shards = json.loads((ds_dir / "versions" / parent / "dataset.json").read_text())["shards"]
    else:
        parent_manifest, parent_shards = empty_manifest(), []
    current = pd.DataFrame(new_rows, columns=MANIFEST_COLUMNS + MEASURE_COLUMNS) if new_rows else empty_manifest()
    source_bytes = source_bytes or {}
    overwritten = pd.Series([source_bytes.get(source, sha) != sha for source, sha in
                             zip(parent_manifest["source"], parent_manifest["source_sha256"])],
                            index=parent_manifest.index, dtype=bool)
    again = parent_manifest["clip_id"].isin(set(current["clip_id"]))
    replaced = (parent_manifest["source_sha256"].isin(set(current["source_sha256"]) | set(rejected))
                | overwritten) & ~again
    kept = parent_manifest[~replaced].copy()
    # a clip listed under a path that now holds other bytes, given again by another path with the
    # same bytes in this run: listed under that one
    renamed = (overwritten & again)[~replaced]
    if renamed.any():
        by_clip = current.drop_duplicates("clip_id").set_index("clip_id")["source"]
        kept.loc[renamed, "source"] = kept.loc[renamed, "clip_id"].map(by_clip)
    added = current[~current["clip_id"].isin(set(kept["clip_id"]))].drop_duplicates("clip_id")
    manifest = pd.concat([kept, added], ignore_index=True) if len(added) else kept
    manifest = manifest.sort_values(["source_sha256", "start_frame", "clip_id"]).reset_index(drop=True)
    manifest = manifest.astype({c: "int64" for c in ("start_frame", "end_frame", "num_frames", "width", "height")})
    # an empty manifest is a version too once there was one: its clips' sources were rejected or changed
    version = manifest_digest(manifest) if len(manifest) or parent else None
    if version is None or version == parent:
        return VersionResult(parent or "", False, parent, 0, len(manifest), ds_dir / "versions" / (parent or ""))
    holder = write_shards(ds_dir, added, shard_max_clips)
    if kept.empty or ("shard" in kept.columns and kept["shard"].notna().all()):
        known = dict(zip(kept["clip_id"], kept["shard"])) if len(kept) else {}
        manifest["shard"] = manifest["clip_id"].map({**known, **holder})
        parent_shards = [s for s in parent_shards if s in set(known.values())]  # shards left with no clip leave
    else:  # a parent written before the column: which clip is in which shard is in the tar headers only
        manifest = manifest.drop(columns=["shard"], errors="ignore")
    shards = parent_shards + list(dict.fromkeys(holder.values()))
    final = ds_dir / "versions" / version
    if not final.exists():
        temp = ds_dir / "versions" / f".tmp-{uuid.uuid4().hex}"
        temp.mkdir(parents=True)
        manifest.to_parquet(temp / "manifest.parquet", index=False)
        pd.DataFrame(failures, columns=FAILURE_COLUMNS).to_parquet(temp / "failures.parquet", index=False)
        atomic_write_json(temp / "dataset.json", {
            "version": version, "parent": parent, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "num_clips": len(manifest), "new_clips": len(added), "replaced_clips": int(replaced.sum()),
            "num_sources": int(manifest["source_sha256"].nunique()), "num_frames": int(manifest["num_frames"].sum()),
            "shards": shards, "config": config,
        })
        for written in ("manifest.parquet", "failures.parquet", "."):  # dataset.json flushes itself; ".": the names
            fsync_path(temp / written)
        os.replace(temp, final)
    fsync_path(ds_dir / "versions")  # the version and its shards on disk before `latest` names it
    fsync_path(ds_dir / "shards")
    if before_latest is not None:
        before_latest(version)
    atomic_write_bytes(ds_dir / "latest", (version + "\n").encode())
    return VersionResult(version, True, parent, len(added), len(manifest), final)
