"""Real services on loopback for the integration tests: a Prefect server, a process worker, an MLflow server.

Each helper is a context manager that starts the service as a subprocess in its own
process group (free port, its own state in a temp folder, output in a log file), waits
until it answers its health endpoint, and on exit terminates the whole group and every
descendant (the worker's flow-run processes included), then SIGKILLs what is left.

    with prefect_server(tmp / "prefect") as server:          # PREFECT_API_URL = server.api_url
        with prefect_worker(server, pool="mav-process"):      # creates the pool, cwd = repo root
            subprocess.run(["prefect", "--no-prompt", "deploy", "--all"], env=server.env, cwd=REPO)
    with mlflow_server(tmp / "mlflow") as ml:                 # ml.url = http://127.0.0.1:P
        ...

The pytest fixtures at the bottom wrap them (import them in a test module with
`from tests.servers import prefect_stack, mlflow_tracking_server`, or use the context
managers directly).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # the interpreter running the tests: its bin has prefect and mlflow
LOOPBACK = "127.0.0.1"


# -- plumbing ----------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port that was free on loopback a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def tool(name: str) -> str:
    """The venv's console script `name` (prefect, mlflow), else whatever PATH has."""
    path = VENV_BIN / name
    return str(path) if path.exists() else name


def base_env(**extra: str) -> dict[str, str]:
    """os.environ without any PREFECT_* / MLFLOW_* leaking in, offline telemetry off, venv bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def spawn(name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> Service:
    """Start `cmd` in a new session (its own process group), stdout+stderr into `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab", buffering=0)
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(cwd) if cwd else None, start_new_session=True)
    finally:
        out.close()  # the child has its own copy
    return Service(name, proc, log, env=env)


def stop(service: Service, grace: float = 15.0) -> None:
    """SIGTERM the process group and all descendants (they may have left the group), then SIGKILL."""
    proc = service.proc
    procs = []
    try:
        import psutil

        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(proc.pid)
            procs = [parent, *parent.children(recursive=True)]
    except ImportError:  # psutil is a dependency, but stay usable without it
        psutil = None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for p in procs[1:]:
        with contextlib.suppress(Exception):
            p.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    if psutil is not None:
        _, alive = psutil.wait_procs(procs, timeout=max(0.0, grace / 3))
        for p in alive:
            with contextlib.suppress(Exception):
                p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def wait_http(service: Service, url: str, timeout: float, ok=lambda r: r.status_code == 200) -> None:
    """Poll `url` until `ok(response)`; fail early (with the log) if the process died."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(f"{service.name} exited with {service.proc.returncode} before it was healthy:\n"
                               f"{service.log_tail()}")
        try:
            r = requests.get(url, timeout=5)
            if ok(r):
                return
            last = f"HTTP {r.status_code}"
        except requests.RequestException as err:
            last = type(err).__name__
        time.sleep(0.5)
    raise TimeoutError(f"{service.name} not healthy at {url} after {timeout:.0f} s ({last}):\n{service.log_tail()}")


def run_cli(cmd: list[str], env: dict[str, str], cwd: Path = REPO, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run a CLI command to completion; on failure raise with its output."""
    done = subprocess.run(cmd, env=env, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> exit {done.returncode}\n--- stdout\n{done.stdout[-6000:]}"
                           f"\n--- stderr\n{done.stderr[-6000:]}")
    return done


# -- Prefect ---------------------------------------------------------------------------------
def prefect_env(home: Path, api_url: str, **extra: str) -> dict[str, str]:
    """Environment for anything that talks to the server at api_url (CLI, worker, flow runs)."""
    return base_env(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.5",
        **extra,
    )


@contextlib.contextmanager
def prefect_server(root: Path, port: int | None = None, timeout: float = 180) -> Iterator[Service]:
    """`prefect server start` on loopback with PREFECT_HOME=root (SQLite inside it).

    The first start on a fresh home runs the DB migrations (30-120 s on 2 cores).
    Yields a Service with .url (http://127.0.0.1:P), .api_url via .env["PREFECT_API_URL"]
    and .env, the environment for clients."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://{LOOPBACK}:{port}"
    env = prefect_env(root, f"{url}/api",
                      PREFECT_UI_ENABLED="false",
                      PREFECT_SERVER_LOGGING_LEVEL="WARNING",
                      # a deployment run queued behind its concurrency limit is retried after this
                      # (default 30 s): the run it waits for has long finished by then
                      PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="2")
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    service = spawn("prefect server", [tool("prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port),
                                       "--no-ui"], root / "server.log", server_env)
    service.url = url
    service.env = env
    yield from _serve(service, f"{url}/api/health", timeout)


def _serve(service: Service, health_url: str, timeout: float) -> Iterator[Service]:
    """Yield the service once its health URL answers; stop it afterwards, whatever happened."""
    try:
        wait_http(service, health_url, timeout)
        yield service
    finally:
        stop(service)


def create_process_pool(server: Service, pool: str = "mav-process") -> None:
    run_cli([tool("prefect"), "--no-prompt", "work-pool", "create", pool, "--type", "process", "--overwrite"],
            server.env, timeout=120)


@contextlib.contextmanager
def prefect_worker(server: Service, pool: str = "mav-process", cwd: Path = REPO, create_pool: bool = True,
                   query_seconds: float = 2, extra_env: dict[str, str] | None = None,
                   timeout: float = 120) -> Iterator[Service]:
    """Create the process work pool (unless told not to) and run `prefect worker start -p POOL` in `cwd`.

    The worker polls every `query_seconds`; the flow runs it starts inherit its environment
    (PREFECT_API_URL, DO_NOT_TRACK, the venv's bin on PATH, plus extra_env) and its cwd."""
    if create_pool:
        create_process_pool(server, pool)
    env = dict(server.env, PREFECT_WORKER_QUERY_SECONDS=str(query_seconds),
               PREFECT_WORKER_PREFETCH_SECONDS="5", **(extra_env or {}))
    home = Path(env["PREFECT_HOME"])
    service = spawn("prefect worker", [tool("prefect"), "worker", "start", "-p", pool, "--type", "process"],
                    home / f"worker-{pool}.log", env, cwd=cwd)
    try:
        _wait_worker_online(service, server, pool, timeout)
        yield service
    finally:
        # a process worker that has run flows was still up 27 s after SIGTERM (Prefect 3.9.1 logs "Sending
        # SIGINT to the process worker" and stays; one that ran none exits in 0.4 s): wait little for it
        stop(service, grace=5)


def _wait_worker_online(service: Service, server: Service, pool: str, timeout: float) -> None:
    """The worker is up once it has sent a heartbeat (it is listed under the pool's workers)."""
    url = f"{server.url}/api/work_pools/{pool}/workers/filter"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {service.proc.returncode}:\n{service.log_tail()}")
        with contextlib.suppress(requests.RequestException):
            r = requests.post(url, json={}, timeout=5)
            if r.status_code == 200 and r.json():
                return
        time.sleep(0.5)
    raise TimeoutError(f"worker for pool {pool} did not come online in {timeout:.0f} s:\n{service.log_tail()}")


# -- MLflow ----------------------------------------------------------------------------------
@contextlib.contextmanager
def mlflow_server(root: Path, port: int | None = None, timeout: float = 120,
                  backend_store_uri: str | None = None) -> Iterator[Service]:
    """`mlflow server` on loopback: SQLite backend root/mlflow.db (absolute), artifacts proxied by the
    server into root/artifacts (clients upload through HTTP, so runs on other machines work too).

    Yields a Service whose .url is the tracking URI (http://127.0.0.1:P)."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "artifacts").mkdir(exist_ok=True)
    port = port or free_port()
    url = f"http://{LOOPBACK}:{port}"
    backend = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
    env = base_env(MLFLOW_TRACKING_URI=url)
    server_env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    # MLflow 3.17 otherwise starts a job runner and ~7 huey consumer processes (GenAI scorer jobs) that
    # nothing here uses: on 2 cores they double the start time
    server_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = [tool("mlflow"), "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend, "--artifacts-destination", str(root / "artifacts")]
    service = spawn("mlflow server", cmd, root / "server.log", server_env, cwd=root)
    service.url = url
    service.env = env
    yield from _serve(service, f"{url}/health", timeout)


# -- pytest fixtures ---------------------------------------------------------------------------
@dataclass
class PrefectStack:
    server: Service
    worker: Service
    root: Path

    @property
    def api_url(self) -> str:
        return self.server.env["PREFECT_API_URL"]

    @property
    def env(self) -> dict[str, str]:
        return self.server.env


@pytest.fixture(scope="module")
def mlflow_tracking_server(tmp_path_factory) -> Iterator[Service]:
    """A real MLflow tracking server on loopback for the module (its .url is the tracking URI)."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as service:
        yield service


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory, request) -> Iterator[PrefectStack]:
    """A real Prefect server + the `mav-process` pool + a process worker (cwd = repo root).

    A module may set `WORKER_ENV = {...}` to add variables to the worker (and so to its flow runs)."""
    root = tmp_path_factory.mktemp("prefect-server")
    extra = getattr(request.module, "WORKER_ENV", None)
    with prefect_server(root / "home") as server, prefect_worker(server, "mav-process", extra_env=extra) as worker:
        yield PrefectStack(server, worker, root)
