"""The `ingest` flow: sources -> clips -> a new dataset version, an event and a summary artifact."""
from __future__ import annotations

import argparse
import asyncio
import re
import socket
import sys
import threading
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE as NO_CACHE
from prefect.events import emit_event
from tqdm.auto import tqdm

from data_prep.config import IngestConfig, load_ingest_config
from data_prep.atomic import atomic_write_bytes
from data_prep.dataset import (commit_version, dataset_dir, latest_version, locked, remove_stale_temporaries,
                               version_info)
from data_prep.ingest import SourceOutcome, merge_same_bytes, process_source
from data_prep.sources import SourceRef, expand_sources
from flows.cli import positive_int, writable_folder

DATASET_EVENT = "mav.dataset.updated"


@task(name="process-source", cache_policy=NO_CACHE, task_run_name="process {ref.source}")
def process_source_task(ref: SourceRef, data_root: str, ds_dir: str, config: dict, on_frames=None,
                        wait: bool = True, fetched: tuple[Path, str] | None = None) -> SourceOutcome:
    cfg = IngestConfig.model_validate(config)
    return process_source(ref, Path(data_root), Path(ds_dir), cfg, on_frames=on_frames, wait=wait, fetched=fetched)


def _artifact_key(name: str) -> str:
    return "ingest-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


UNANNOUNCED = "unannounced"  # in the dataset's folder: a version made whose event is not sent yet


def mark_unannounced(ds_dir: Path, announce: bool):
    """What commit_version does before `latest` names a new version: record it as not announced yet
    (a run killed before its event leaves the mark); the pipeline's own ingest (announce False)
    trains its new version, whose clips hold any unannounced one's, so it clears the mark."""
    mark = ds_dir / UNANNOUNCED
    if announce:
        return lambda version: atomic_write_bytes(mark, (version + "\n").encode())
    return lambda version: mark.unlink(missing_ok=True)


def version_to_announce(ds_dir: Path, result, announce: bool) -> dict | None:
    """The event payload of the version this run announces (under the dataset's lock): the one it
    made, or the one a killed run made and did not announce. That run's rerun makes no new version,
    and without the mark its version was never retrained."""
    if not announce:
        return None
    if result.created:
        return {"version": result.version, "parent": result.parent, "new_clips": result.new_clips,
                "total_clips": result.total_clips}
    mark = ds_dir / UNANNOUNCED
    left = mark.read_text().strip() if mark.exists() else None
    if not left or left != latest_version(ds_dir):  # (a mark of a run killed before `latest` named it)
        return None
    info = version_info(ds_dir.parent.parent, ds_dir.name, left)
    return {"version": left, "parent": info["parent"], "new_clips": info["new_clips"], "total_clips": info["num_clips"]}


def _publish(dataset: str, data_root: Path, outcomes: list[SourceOutcome], result, announced: dict | None) -> None:
    rows = [{"source": o.source, "status": o.status, "clips": len(o.clips), "cuts": len(o.cuts),
             "stage": o.stage, "reason": o.reason} for o in outcomes]
    create_table_artifact(key=_artifact_key(dataset), table=rows,
                          description=f"ingest into {dataset}: version {result.version or '-'}, "
                                      f"{result.new_clips} new clips, {result.total_clips} in total")
    if announced:
        emit_event(
            event=DATASET_EVENT,
            resource={"prefect.resource.id": f"mav.dataset.{dataset}", "prefect.resource.name": dataset},
            payload={"dataset": dataset, "data_root": str(data_root)} | announced,
        )
        mark = dataset_dir(data_root, dataset) / UNANNOUNCED
        if mark.exists() and mark.read_text().strip() == announced["version"]:  # (not a later ingest's)
            mark.unlink(missing_ok=True)


@flow(name="ingest", log_prints=True)
def ingest(sources: list[str], data_root: str = "mav-data", dataset: str = "default",
           config: str | None = None, progress: bool = False, workers: int | None = None,
           announce: bool = True) -> dict:
    """Ingest `sources` (files, folders, URLs, URL lists) into DATA_ROOT/datasets/DATASET,
    `workers` (default: the config's) sources at a time on whatever task runner the flow has.
    A new version emits `mav.dataset.updated` (which retrains) unless `announce` is False: the
    pipeline's own ingest trains on the version itself, and the event would start a second run."""
    logger = get_run_logger()
    check_sources(sources)  # (a deployment's run: mav ingest checked them before the flow)
    writable_folder(data_root, "data_root")  # "" too: Path("") is the working directory
    cfg = load_ingest_config(config)
    workers = workers or cfg.workers
    if workers < 1:
        raise ValueError(f"workers (sources processed at once) must be >= 1, got {workers}")
    root = Path(data_root).resolve()
    ds_dir = dataset_dir(root, dataset)
    refs = expand_sources(sources, cfg.video_extensions, root)
    logger.info("ingest %d sources into %s", len(refs), ds_dir)
    with locked(ds_dir, lambda: logger.info("another ingest into %s is running: waiting for it", ds_dir)):
        remove_stale_temporaries(ds_dir)
        frames_bar = tqdm(desc="frames", unit="frame", disable=not progress or None, position=1)
        lock = threading.Lock()

        def on_frames(n: int) -> None:
            with lock:
                frames_bar.update(n)

        callback = on_frames if progress and _runs_in_threads() else None
        sources_bar = tqdm(total=len(refs), desc="sources", unit="src", disable=not progress or None, position=0)
        # Prefect's default thread runner (the pipeline's, a deployment's) has no bound: each source
        # runs an ffmpeg decoder and encoders, so at most `workers` are submitted at once
        slots = threading.BoundedSemaphore(workers)

        def finished(_future) -> None:  # (asking a future its state here calls the API: mav's exit then hung)
            slots.release()
            with lock:
                sources_bar.update(1)

        def process_all(jobs: list[tuple[SourceRef, tuple | None]], wait: bool) -> list[SourceOutcome]:
            futures = []
            for ref, fetched in jobs:  # (fetched: a busy source's bytes)
                slots.acquire()
                futures.append(process_source_task.submit(ref, str(root), str(ds_dir), cfg.model_dump(), callback,
                                                          wait, fetched))
                futures[-1].add_done_callback(finished)
            return [future.result() for future in futures]

        # a source whose bytes another worker is cutting (a duplicate) is done again after the rest,
        # instead of holding a worker slot while it waits
        outcomes = process_all([(ref, None) for ref in refs], wait=False)
        busy = [i for i, o in enumerate(outcomes) if o.status == "busy"]
        sources_bar.total += len(busy)  # each counted again when it is done
        again = process_all([(refs[i], (outcomes[i].fetched, outcomes[i].source_sha256)) for i in busy], wait=True)
        for i, outcome in zip(busy, again):
            outcomes[i] = outcome
        outcomes = merge_same_bytes(outcomes)
        sources_bar.close()
        frames_bar.close()
        new_rows = [row for o in outcomes if o.status != "failed" for row in o.clips]
        failures = [o.failure_row() for o in outcomes if o.status == "failed"]
        rejected = {o.source_sha256 for o in outcomes if o.rejected}
        source_bytes = {o.source: o.source_sha256 for o in outcomes if o.source_sha256}
        result = commit_version(ds_dir, new_rows, failures, cfg.model_dump(), cfg.shard_max_clips, rejected,
                                source_bytes, before_latest=mark_unannounced(ds_dir, announce))
        announced = version_to_announce(ds_dir, result, announce)
    _publish(dataset, root, outcomes, result, announced)
    summary = {
        "dataset": dataset, "data_root": str(root), "version": result.version, "created": result.created,
        "parent": result.parent, "new_clips": result.new_clips, "total_clips": result.total_clips,
        "sources": {s: sum(o.status == s for o in outcomes) for s in ("new", "unchanged", "duplicate", "failed")},
        "failures": failures,
        "duplicates": [{"source": o.source, "reason": o.reason} for o in outcomes if o.status == "duplicate"],
    }
    for line in summary_lines(summary):
        print(line)
    return summary


def check_sources(sources: list[str]) -> None:
    """At least one source, none empty: an empty one names the working directory (Path("")), and a
    deployment's run, whose working directory is the repository, ingested every video in it."""
    if not sources:
        raise ValueError("sources: none given")
    if not all(source.strip() for source in sources):
        raise ValueError("an empty source was given (an unset shell variable?)")


def _runs_in_threads() -> bool:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context is None or type(context.task_runner).__name__ == "ThreadPoolTaskRunner"


def summary_lines(summary: dict) -> list[str]:
    state = "new version" if summary["created"] else "unchanged, no new version"
    counts = summary["sources"]
    same = f", {counts['duplicate']} the same bytes as another" if counts["duplicate"] else ""
    lines = [
        f"dataset {summary['dataset']} @ {summary['version'] or '-'} ({state}): "
        f"{summary['total_clips']} clips, {summary['new_clips']} new",
        f"sources: {counts['new']} processed, {counts['unchanged']} already done{same}, {counts['failed']} failed",
    ]
    lines += [f"  duplicate {d['source']}: {d['reason']}" for d in summary["duplicates"]]
    lines += [f"  failed [{f['stage']}] {f['source']}: {f['reason']}" for f in summary["failures"]]
    return lines


SCHEDULER_CHECK_S = 5.0  # a scheduler answers in milliseconds


def check_scheduler(address: str, timeout_s: float = SCHEDULER_CHECK_S) -> None:
    """A ValueError naming `address` and the reason, unless a Dask scheduler answers there within
    `timeout_s`. Checked before the flow starts: distributed itself retries for 30 s (for ever
    behind a port that is not a scheduler's) and then fails the flow with a trace."""
    from distributed.comm import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    try:
        scheme, location = parse_address(address)
        get_backend(scheme)  # a ValueError naming the schemes it knows
        host, port = parse_host_port(location, 8786) if scheme in ("tcp", "tls") else (None, None)
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port {port} is not in 1-65535")
    except ValueError as err:
        raise ValueError(f"--dask-address {address}: not a scheduler address ({err})") from None
    reason = _tcp_unreachable(host, port, timeout_s) if host else None
    if reason is None and scheme == "tcp":  # tls needs the cluster's certificates: the runner finds out
        reason = _not_a_scheduler(address, timeout_s)
    if reason:
        raise ValueError(f"--dask-address {address}: no Dask scheduler there ({reason})")


def _tcp_unreachable(host: str, port: int, timeout_s: float) -> str | None:
    """Why nothing takes a TCP connection at host:port (at once where the OS knows: refused,
    unknown host), or None if something does."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except socket.gaierror as err:
        return f"unknown host {host!r}: {err.strerror}"
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as err:
        return (err.strerror or str(err)).lower()
    return None


def _not_a_scheduler(address: str, timeout_s: float) -> str | None:
    """Why what answers at `address` is not a Dask scheduler (a web server, a worker's port), or None."""
    from distributed.comm import connect

    async def identity() -> dict:
        comm = await connect(address, timeout=timeout_s)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    try:  # distributed's own handshake waits for ever on a peer that never replies: our deadline
        reply = asyncio.run(asyncio.wait_for(identity(), timeout_s))
    except Exception as err:
        return f"something answers there, but no Dask handshake within {timeout_s:g} s: {err.__class__.__name__}"
    kind = reply.get("type") if isinstance(reply, dict) else None
    return None if kind == "Scheduler" else f"it answers as a {kind or 'peer of another kind'}, not a scheduler"


def with_task_runner(kind: str, address: str | None, workers: int):
    """The ingest flow on the chosen task runner: threads (default) or a Dask cluster (its
    scheduler at `address` checked first: a ValueError naming it, quickly, if none answers)."""
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as err:  # an install without the dependency (pyproject lists it)
            raise ValueError(f"--task-runner dask needs prefect-dask and distributed ({err})") from None
        if address:
            check_scheduler(address)
        runner = (DaskTaskRunner(address=address) if address else
                  DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}))
        return ingest.with_options(task_runner=runner)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ingest.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))


def register(subparsers) -> None:
    parser = subparsers.add_parser("ingest", help="ingest videos into a versioned clip dataset")
    parser.add_argument("sources", nargs="+", help="files, folders, http(s) URLs, or .txt/.csv/.tsv/.parquet URL lists")
    parser.add_argument("--data-root", default="mav-data")
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--config", default=None, help="ingest YAML (e.g. configs/base/ingest.yaml)")
    parser.add_argument("--task-runner", choices=["threads", "dask"], default=None,
                        help="threads (default), or dask: a local Dask cluster, or the one at --dask-address")
    parser.add_argument("--dask-address", default=None,
                        help="scheduler address of an existing Dask cluster (implies --task-runner dask)")
    parser.add_argument("--workers", type=positive_int, default=None, help="sources processed at once")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:  # bad input is one line, before a flow (and its logged trace) starts
        config = load_ingest_config(args.config)  # checked even when --workers is given
        workers = args.workers or config.workers
        dataset_dir(Path(args.data_root), args.dataset)
        writable_folder(args.data_root, "--data-root")
        check_sources(args.sources)
        if args.dask_address and args.task_runner == "threads":
            raise ValueError(f"--dask-address {args.dask_address}: --dask-address is for --task-runner dask, "
                             "not threads: drop one")
        runner = args.task_runner or ("dask" if args.dask_address else "threads")
        run = with_task_runner(runner, args.dask_address, workers)
        summary = run(sources=args.sources, data_root=args.data_root, dataset=args.dataset,
                      config=args.config, progress=not args.no_progress, workers=workers)
    except (ValueError, OSError) as err:  # a config, a dataset name, a data root that cannot be written
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if summary["total_clips"] else 1
