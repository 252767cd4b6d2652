"""Where MLflow records go: the tracking URI and experiments (artifacts beside a SQLite store)."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in the working directory (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id, created if missing. A SQLite store keeps its artifacts beside the
    database (MLflow's default, ./mlruns of whatever folder a process runs in, scatters them)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    existing = client.get_experiment_by_name(name)
    if existing is not None and existing.lifecycle_stage == "deleted":  # MLflow refuses to log to it
        raise ValueError(f"MLflow experiment {name!r} in {tracking_uri} is deleted: restore it "
                         f"(mlflow experiments restore --experiment-id {existing.experiment_id}) or name another")
    if existing is not None:
        return existing.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # (MLflow's own form sqlite:///mlflow.db is relative to the working directory, as_uri refuses it)
        store = Path(tracking_uri.removeprefix("sqlite:///")).absolute().parent
        location = (store / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def store_identity(tracking_uri: str, name: str) -> str:
    """The experiment as a cache key: its store, id and creation time. A store deleted and made
    again at the same URI (rm mlflow.db) is a new identity, so cached steps whose MLflow runs
    lived in the old store are trained again instead of pointing at runs that are gone."""
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri).get_experiment_by_name(name)  # use_experiment made it
    return f"{tracking_uri}|{exp.experiment_id}|{exp.creation_time}"


def use_experiment(tracking_uri: str, name: str) -> None:
    """Point fluent MLflow (mlflow.start_run, Lightning's logger) at this store and experiment."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI, which a later command in this process
    # (a notebook, a test calling main()) would take as its default store: keep the process's own
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    mlflow.set_experiment(experiment_id=experiment_id(tracking_uri, name))


@contextmanager
def start_run(tags: dict | None = None, **kwargs):
    """mlflow.start_run, except that a run stopped by Ctrl-C or SIGTERM ends KILLED (MLflow's own marks
    it FAILED, as for an error, so the UI could not tell the two apart), and that the run names the
    process that runs it (process_tags) and beats while it runs (heartbeat)."""
    import mlflow

    with mlflow.start_run(tags=(tags or {}) | process_tags(), **kwargs) as run:
        try:
            with heartbeat(mlflow.get_tracking_uri(), run.info.run_id):
                yield run
        except BaseException as err:
            if not stopped(err):
                raise
            release_interrupted_frames(err)
            end_killed(run.info.run_id)
            raise


def stopped(err: BaseException) -> bool:
    """Whether the error stops the run from outside: Ctrl-C, or SIGTERM, which Prefect's engine raises in
    a flow as TerminationSignal (a deployment's run cancelled, its worker shut down)."""
    from prefect.exceptions import TerminationSignal

    return isinstance(err, (KeyboardInterrupt, TerminationSignal))


def release_interrupted_frames(interrupt: BaseException) -> None:
    """Free what the code that a Ctrl-C stopped still holds through the interrupt's traceback (the
    locals of its finished frames), before the store is written again. A Ctrl-C landing in a query of
    MLflow's SQLite store (its SELECT run, its rows not fetched: Lightning logging train/loss in the main
    thread) makes SQLAlchemy close that connection without closing the cursor; SQLite keeps a closed
    connection open while a statement of it is alive, and the cursor, a local of those frames, kept its
    read lock on the file: every write (ending the runs KILLED, the system-metrics threads) then waited
    MLflow's 20 s and failed with 'database is locked'. The traceback still prints (it needs no locals)."""
    import gc
    import traceback

    seen, pending = set(), [interrupt]
    while pending:  # the interrupt and what it was raised from or during (Lightning: exit(1) during it)
        err = pending.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)  # (frames still running are left as they are)
        pending += [err.__cause__, err.__context__]
    gc.collect()  # the cursor may also sit in a reference cycle


def end_killed(run_id: str) -> None:
    """End the active run KILLED (the `with` around it then leaves it alone). Where the store still
    refuses (another process holding its lock past MLflow's 20 s wait, or this one before
    release_interrupted_frames; the run deleted), the run is left RUNNING for the next run of its
    experiment to end as KILLED (its process is gone), in one line, and the Ctrl-C goes on stopping
    the command instead of an MLflow error and exit 1 taking its place."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.end_run("KILLED")
    except MlflowException as err:
        # SQLAlchemy's message runs over lines (its SQL, parameters, a docs link): the DB-API error's line
        lines = str(err).strip().splitlines() or ["no reason given"]
        reason = next((line for line in lines if "Error) " in line), lines[0])
        print(f"MLflow run {run_id} is left RUNNING ({reason}); the next run of its experiment ends it as KILLED",
              file=sys.stderr)


# the stores MLflow opens (a database scheme may name its driver: postgresql+psycopg2)
STORE_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                 "databricks-uc", "uc")


def check_tracking(uri: str, experiment: str) -> None:
    """A store MLflow opens and, over http(s), one that answers, before any work (nothing is created):
    a server that is down was retried for minutes inside the flow, after the ingest, and ended in a
    trace; an unknown scheme likewise."""
    if not experiment.strip():
        raise ValueError("experiment: empty")
    scheme = urllib.parse.urlparse(uri).scheme.split("+")[0]
    if scheme not in STORE_SCHEMES:
        raise ValueError(f"tracking URI {uri}: not a store MLflow opens ({', '.join(filter(None, STORE_SCHEMES))}, "
                         "or a folder)")
    if scheme in ("http", "https"):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
        except requests.RequestException as err:
            raise ValueError(f"tracking URI {uri}: no MLflow server answers ({err.__class__.__name__})") from None


# -- runs of killed processes ----------------------------------------------------------
# A SIGKILL (or an out-of-memory kill, a machine that died) ends no MLflow run: it stays RUNNING
# for good. Each run names its process; a later one ends the runs whose process is gone. A process
# is its pid and start time within one kernel boot and PID namespace (pids are reused, and a
# container with the host's name has pids of its own). Runs of other machines, namespaces or boots
# cannot be checked so: their process stamps `mav.heartbeat` (its clock's epoch seconds) every
# HEARTBEAT_S, and a run silent for STALE_AFTER_S is gone (so the clocks of machines that share a
# store may differ by up to STALE_AFTER_S - HEARTBEAT_S).
HEARTBEAT_S = 60.0
STALE_AFTER_S = 15 * 60.0


@contextmanager
def heartbeat(tracking_uri: str, run_id: str):
    """Stamp the run's `mav.heartbeat` tag every HEARTBEAT_S while the block runs."""
    from mlflow import MlflowClient

    stop = threading.Event()

    def beat() -> None:
        client = MlflowClient(tracking_uri)
        while not stop.wait(HEARTBEAT_S):
            try:
                client.set_tag(run_id, "mav.heartbeat", f"{time.time():.0f}")
            except Exception:  # a store down or locked for a while: the next beat tries again
                pass

    thread = threading.Thread(target=beat, name=f"mav-heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:  # not waited for long: a beat in a store query that a Ctrl-C left locked waits 20 s
        stop.set()
        thread.join(timeout=1.0)


def _pid_space() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:  # not Linux: the host name alone
        return ""


def _started(pid: int) -> str:
    import psutil

    return f"{psutil.Process(pid).create_time():.2f}"


def process_tags() -> dict:
    process = f"{_pid_space()}|{os.getpid()}|{_started(os.getpid())}"
    return {"mav.host": socket.gethostname(), "mav.process": process, "mav.heartbeat": f"{time.time():.0f}"}


def _gone(tags: dict) -> str | None:
    """Why the process that the tags name is known to be gone; None where it may be running."""
    import psutil

    named = tags.get("mav.process", "").split("|")
    if len(named) == 3 and tags.get("mav.host") == socket.gethostname() and named[0] == _pid_space():
        pid, start = named[1:]
        if not pid.isdigit():
            return None
        try:
            return None if _started(int(pid)) == start else f"process {pid} is gone"
        except psutil.NoSuchProcess:
            return f"process {pid} is gone"
        except psutil.Error:  # e.g. access denied: it exists
            return None
    try:
        silent = time.time() - float(tags.get("mav.heartbeat", ""))
    except ValueError:  # untagged (older runs), or malformed
        return None
    host = tags.get("mav.host", "another machine")
    return f"no heartbeat from {host} for {silent / 60:.0f} min" if silent > STALE_AFTER_S else None


def end_orphaned_runs(tracking_uri: str, experiment: str, say=print) -> list[str]:
    """End as KILLED the experiment's RUNNING runs whose process is gone, saying so. -> their names."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    ended = {}
    for run in running:
        if reason := _gone(run.data.tags):
            client.set_terminated(run.info.run_id, "KILLED")
            ended[run.info.run_name] = reason
    if ended:
        say("MLflow runs still marked running whose process is gone, ended as KILLED: "
            + ", ".join(f"{name} ({reason})" for name, reason in ended.items()))
    return list(ended)
