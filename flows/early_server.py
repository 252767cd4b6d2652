"""Prefect's temporary API server, started before `mav` imports anything heavy.

With no API URL configured, Prefect starts a temporary server when the first flow
runs: it imports its server module in our process (~2.5 s) and then waits for the
server to boot (~5 s), all before any work. `mav` instead starts the same server (the
command and flags Prefect's SubprocessASGIServer uses) as its first act, so the boot
overlaps the imports, and points the flow at it once the imports are done.

Where it differs from SubprocessASGIServer, on purpose: it passes no settings in the
child's environment (Prefect's settings are not loaded yet; the child reads the same
profile, prefect.toml and environment itself) and no `--app-dir` (that would need
Prefect's path: the child imports it from the same environment); it starts before the
arguments are parsed (parsing imports the command's module, the import it overlaps, so a
mistyped flag costs a server start and stop); and it tries another port only when the log
says the address was in use, not on uvicorn's exit status 3, which every start-up failure
gives (a database that cannot open would be retried until the timeout).
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager


class ServerError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent(parent: int) -> None:
    """In the server's process (Linux): SIGTERM when `mav` dies, even by SIGKILL, so no server is orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # not Linux: the server lives until it is stopped
        return
    if os.getppid() != parent:  # mav died between the fork and prctl: that signal will never come
        os._exit(1)


class EarlyServer:
    def __init__(self) -> None:
        self.port = _free_port()
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        self.log = tempfile.TemporaryFile()  # this process's output only
        command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        # a session of its own: the terminal's Ctrl-C interrupts mav, whose flow then still reports
        # its final states to a live server (sharing the signal, the server died first and Prefect
        # retried against it for minutes); it still dies with mav (_die_with_parent) and at exit
        return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                preexec_fn=functools.partial(_die_with_parent, os.getpid()), start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "address already in use" not in self._log().lower():
                    raise ServerError(f"the temporary Prefect server exited ({self.process.returncode}): {self._reason()}")
                self.port = _free_port()  # taken between _free_port and uvicorn's bind
                self.log.close()
                self.process = self._spawn()
            try:
                with direct.open(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        reason = self._reason()  # before stop() closes the log
        self.stop()
        raise ServerError(f"the temporary Prefect server did not start within {timeout_s:.0f} s: {reason}")

    def _log(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def _reason(self) -> str:
        """The exception line of the server's traceback, else its last line."""
        lines = [line.strip() for line in self._log().splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b.*:", line)]
        return (errors or lines or ["no output"])[-1]

    def stop(self) -> None:
        """Ask the server to shut down; it finishes on its own, nobody waits for it."""
        if self.process.poll() is None:
            self.process.terminate()
        self.log.close()


def start_if_needed() -> EarlyServer | None:
    """A server to overlap with the imports, unless Prefect is configured or already set up in-process.

    It stops at interpreter exit: Prefect's log and event workers drain to it when
    threads shut down, which comes before atexit (stopped any earlier, they retry for
    a minute or more)."""
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    server = EarlyServer()
    atexit.register(server.stop)
    return server


@contextmanager
def serving(server: EarlyServer | None):
    """Run the block against `server`, unless there is none or the settings name another API."""
    if server is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:  # a profile or prefect.toml names a server: use that one
        server.stop()
        yield
        return
    server.wait_ready(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")))
    # no UI on a temporary server, so no "View at" links to it
    updates = {"PREFECT_API_URL": server.url, "PREFECT_UI_URL": ""}
    before = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)  # threads without Prefect's context read the environment
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.url, PREFECT_UI_URL: ""}):
            yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
