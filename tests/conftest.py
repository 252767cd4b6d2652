"""Shared fixtures: the real test videos, a Prefect test server, a local HTTP server."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# pytest-xdist: share the cores among the workers. torch's default (a thread per core) in each
# worker, and in the processes the tests start, oversubscribes the cores, and its threads spin.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"
SHARED_VIDEOS = REPO.parent / "shared" / "data" / "videos"


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    """../shared/data/videos (real videos with labelled cuts); absent in a user's clone."""
    if not (SHARED_VIDEOS / "bikes.cuts.json").exists():
        pytest.skip(f"the shared test videos are not at {SHARED_VIDEOS} (only CI and developer machines have them)")
    return SHARED_VIDEOS


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real (temporary) Prefect server for the whole session, on loopback."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        from prefect.settings import PREFECT_API_URL

        yield PREFECT_API_URL.value()


@pytest.fixture()
def video_dir(tmp_path, samples) -> Path:
    """A writable folder with two of the bundled sample videos."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("asl_book.mkv", "bigbuckbunny.mp4"):
        shutil.copy(samples / name, folder / name)
    return folder
