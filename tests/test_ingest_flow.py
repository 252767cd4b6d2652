"""The ingest flow against a real Prefect server: bad inputs, reruns, events, Dask, kill + rerun."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from data_prep.dataset import load_manifest, version_info
from data_prep.ffmpeg_bin import ffmpeg_exe
from flows.ingest import DATASET_EVENT, ingest, with_task_runner
from tests.http_faults import FaultServer

REPO = Path(__file__).resolve().parent.parent


def make_bad_inputs(folder: Path, samples: Path) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("this is not a video\n")
    data = (samples / "bigbuckbunny.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    exe = ffmpeg_exe()
    subprocess.run([exe, "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
                    "-c:a", "aac", str(folder / "audio_only.mp4")], check=True)
    subprocess.run([exe, "-v", "error", "-y", "-i", str(samples / "bigbuckbunny.mp4"), "-t", "0.4", "-an",
                    "-c:v", "libx264", str(folder / "too_short.mp4")], check=True)


def clip_table(data_root: Path, dataset: str) -> pd.DataFrame:
    return clip_table_at(data_root, dataset, "latest")


def clip_table_at(data_root: Path, dataset: str, version: str) -> pd.DataFrame:
    manifest = load_manifest(data_root, dataset, version)
    return manifest.drop(columns=["clip_abspath"]).sort_values("clip_id").reset_index(drop=True)


def test_bad_inputs_are_reported_and_the_rest_goes_on(prefect_server, tmp_path, video_dir, samples):
    bad = tmp_path / "bad"
    make_bad_inputs(bad, samples)
    config = tmp_path / "ingest.yaml"
    config.write_text("download:\n  read_timeout_s: 0.5\n  retries: 1\n  backoff_s: 0.05\n  max_bytes: 100000\n")
    big = (samples / "asl_book.mkv").read_bytes()
    routes = {"/missing.mp4": ("404", b""), "/stall.mp4": ("stall", b"x" * 50_000), "/cut.mp4": ("cut", b"x" * 50_000),
              "/redirect.mp4": ("redirect", "file:///etc/passwd"), "/big.mkv": ("ok", big)}
    with FaultServer(routes) as srv:
        urls = [f"{srv.base}{path}" for path in routes]
        summary = ingest(sources=[str(video_dir), str(bad), *urls], data_root=str(tmp_path / "root"),
                         dataset="mixed", config=str(config))
    assert summary["sources"] == {"new": 2, "unchanged": 0, "duplicate": 0, "failed": 10}
    reasons = {Path(f["source"]).name: (f["stage"], f["reason"]) for f in summary["failures"]}
    assert reasons["zero.mp4"] == ("probe", "empty file (0 bytes)")
    assert "not a readable video" in reasons["text.mp4"][1]
    assert "truncated" in reasons["truncated.mp4"][1]
    assert reasons["audio_only.mp4"][1] == "no video stream (audio streams only)"
    assert "shorter than the minimum scene" in reasons["too_short.mp4"][1]
    assert reasons["missing.mp4"] == ("download", "HTTP 404 Not Found")
    assert "stalled" in reasons["stall.mp4"][1]
    assert "cut short" in reasons["cut.mp4"][1]
    assert "non-http" in reasons["redirect.mp4"][1]
    assert "size cap" in reasons["big.mkv"][1]
    failures = pd.read_parquet(tmp_path / "root/datasets/mixed/versions" / summary["version"] / "failures.parquet")
    assert len(failures) == 10 and set(failures.columns) == {"source", "stage", "reason"}
    manifest = clip_table(tmp_path / "root", "mixed")
    assert set(manifest["source"].map(lambda s: Path(s).name)) == {"asl_book.mkv", "bigbuckbunny.mp4"}

    # what the bytes alone decide is recorded (not probed or decoded again); downloads are retried
    records = [json.loads(p.read_text()) for p in (tmp_path / "root/datasets/mixed/sources").glob("*.json")]
    rejected = {Path(r["source"]).name: (r["rejected"]["stage"], r["rejected"]["reason"]) for r in records
                if "rejected" in r}
    assert rejected == {name: reasons[name] for name in ("zero.mp4", "text.mp4", "truncated.mp4", "audio_only.mp4",
                                                          "too_short.mp4")}
    shorter = tmp_path / "shorter.yaml"  # other scene settings: the too-short video is cut after all
    shorter.write_text("scenes:\n  min_scene_s: 0.3\n")
    again = ingest(sources=[str(bad)], data_root=str(tmp_path / "root"), dataset="mixed", config=str(shorter))
    assert again["sources"] == {"new": 1, "unchanged": 0, "duplicate": 0, "failed": 4}
    assert {Path(f["source"]).name: (f["stage"], f["reason"]) for f in again["failures"]} == \
        {name: reasons[name] for name in ("zero.mp4", "text.mp4", "truncated.mp4", "audio_only.mp4")}


def test_rerun_is_idempotent_and_a_new_video_is_processed_alone(prefect_server, tmp_path, video_dir, samples):
    root = tmp_path / "root"
    one_at_a_time = tmp_path / "ingest.yaml"
    one_at_a_time.write_text("workers: 1\n")  # not part of the clip settings: later runs find the same sources
    state = ingest(sources=[str(video_dir)], data_root=str(root), dataset="d", config=str(one_at_a_time),
                   return_state=True)
    first = state.result()
    assert first["created"] and first["sources"]["new"] == 2
    # the flow's own (unbounded) thread runner still processed one source at a time
    runs = _finished_task_runs(state.state_details.flow_run_id, "process ", 2)
    assert runs[0].end_time <= runs[1].start_time, [(r.start_time, r.end_time) for r in runs]
    files_before = sorted(p.name for p in (root / "datasets/d/clips").iterdir())
    again = ingest(sources=[str(video_dir)], data_root=str(root), dataset="d")
    assert not again["created"] and again["version"] == first["version"] and again["sources"]["unchanged"] == 2
    assert sorted(p.name for p in (root / "datasets/d/clips").iterdir()) == files_before
    assert len(list((root / "datasets/d/versions").iterdir())) == 1

    shutil.copy(samples / "big_buck_bunny_0_30.webm", video_dir)
    third = ingest(sources=[str(video_dir)], data_root=str(root), dataset="d")
    assert third["sources"] == {"new": 1, "unchanged": 2, "duplicate": 0, "failed": 0}
    assert third["created"] and third["parent"] == first["version"] and third["new_clips"] == 5
    info = version_info(root, "d")
    assert info["num_clips"] == first["total_clips"] + 5 and len(info["shards"]) == 2
    # the shards hold exactly the manifest's clips
    import tarfile
    members = set()
    for shard in info["shards"]:
        with tarfile.open(root / "datasets/d" / shard) as tar:
            members |= {m.name for m in tar.getmembers()}
    table = clip_table(root, "d")
    ids = set(table["clip_id"])
    assert members == {f"{i}.mp4" for i in ids} | {f"{i}.json" for i in ids}
    assert set(table["shard"]) == set(info["shards"])  # which shard holds each clip, without reading the tars
    assert table["motion"].notna().all() and (table["motion"] > 0).all()  # measured in the cutting pass

    # one source cut again with other clip settings: its new clips replace its old ones in the next version
    smaller = tmp_path / "smaller.yaml"
    smaller.write_text("clips:\n  short_side: 64\n")
    bunny = video_dir / "bigbuckbunny.mp4"
    fourth = ingest(sources=[str(bunny)], data_root=str(root), dataset="d", config=str(smaller))
    assert fourth["created"] and fourth["sources"] == {"new": 1, "unchanged": 0, "duplicate": 0, "failed": 0}
    recut = clip_table(root, "d")
    old_bunny = table[table["source"] == str(bunny)]
    new_bunny = recut[recut["source"] == str(bunny)]
    assert len(new_bunny) and (new_bunny[["width", "height"]].min(axis=1) == 64).all()
    assert not set(old_bunny["clip_id"]) & set(recut["clip_id"])
    others = table[table["source"] != str(bunny)].reset_index(drop=True)
    assert others.equals(recut[recut["source"] != str(bunny)].reset_index(drop=True))
    assert fourth["total_clips"] == len(others) + len(new_bunny)
    info = version_info(root, "d")
    assert info["replaced_clips"] == len(old_bunny) and info["new_clips"] == len(new_bunny)
    assert clip_table_at(root, "d", third["version"]).equals(table)  # the earlier version is untouched
    for shard in info["shards"]:  # every listed shard holds clips of this version, as the manifest says
        with tarfile.open(root / "datasets/d" / shard) as tar:
            held = {m.name.removesuffix(".mp4") for m in tar.getmembers() if m.name.endswith(".mp4")}
        assert held & set(recut["clip_id"]) == set(recut.loc[recut["shard"] == shard, "clip_id"]) != set()

    # the same source under settings that reject it (no scene that long): its clips leave too
    strict = tmp_path / "strict.yaml"
    strict.write_text("clips:\n  short_side: 64\nscenes:\n  min_scene_s: 100\n  max_scene_s: 200\n")
    fifth = ingest(sources=[str(bunny)], data_root=str(root), dataset="d", config=str(strict))
    assert fifth["sources"] == {"new": 0, "unchanged": 0, "duplicate": 0, "failed": 1} and fifth["created"]
    assert clip_table(root, "d").drop(columns=["shard"]).equals(others.drop(columns=["shard"]))
    assert version_info(root, "d")["replaced_clips"] == len(new_bunny)

    # other bytes at a path already ingested: the path's old clips leave with its old bytes
    asl = video_dir / "asl_book.mkv"
    old_asl = clip_table(root, "d").query("source == @asl.__str__()")
    edited = tmp_path / "edited.mkv"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(asl), "-t", "4", "-an", "-c:v", "libx264",
                    str(edited)], check=True)
    os.replace(edited, asl)
    sixth = ingest(sources=[str(asl)], data_root=str(root), dataset="d")
    assert sixth["created"] and sixth["sources"] == {"new": 1, "unchanged": 0, "duplicate": 0, "failed": 0}
    new_asl = clip_table(root, "d").query("source == @asl.__str__()")
    assert len(old_asl) and len(new_asl) == sixth["new_clips"] and set(new_asl["source_sha256"]) != \
        set(old_asl["source_sha256"]) and new_asl["source_sha256"].nunique() == 1
    assert version_info(root, "d")["replaced_clips"] == len(old_asl)


def test_a_dataset_whose_only_source_is_rejected_gets_an_empty_version(prefect_server, tmp_path, samples):
    """The clips of a source that new settings reject leave the version even when no clip is left:
    the new version is empty (training on it says so) and the earlier one keeps them."""
    from models.config import load_config
    from models.data import DataError, StageDataModule

    source, root = samples / "asl_book.mkv", tmp_path / "data"
    first = ingest(sources=[str(source)], data_root=str(root), dataset="one",
                   config=str(REPO / "configs" / "tiny" / "ingest.yaml"))
    assert first["created"] and first["total_clips"] > 0
    strict = tmp_path / "strict.yaml"
    strict.write_text("clips:\n  short_side: 128\nscenes:\n  min_scene_s: 100\n  max_scene_s: 200\n")
    second = ingest(sources=[str(source)], data_root=str(root), dataset="one", config=str(strict))
    assert second["created"] and second["total_clips"] == 0 and second["version"] != first["version"]
    assert load_manifest(root, "one").empty
    assert len(load_manifest(root, "one", first["version"])) == first["total_clips"]
    assert version_info(root, "one")["replaced_clips"] == first["total_clips"]
    again = ingest(sources=[str(source)], data_root=str(root), dataset="one", config=str(strict))
    assert not again["created"] and again["version"] == second["version"]  # a rerun changes nothing
    with pytest.raises(DataError, match="'one' is empty: no clips to train on"):
        StageDataModule(load_config(REPO / "configs" / "tiny" / "decoder.yaml"), root, "one").check()


def _finished_task_runs(flow_run_id, name_prefix: str, count: int) -> list:
    """The flow run's finished task runs whose names start with `name_prefix`, by start time (the
    server records them asynchronously)."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    for _ in range(40):
        runs = [r for r in anyio.run(read) if r.name.startswith(name_prefix) and r.end_time is not None]
        if len(runs) >= count:
            return sorted(runs, key=lambda r: r.start_time)
        time.sleep(0.5)
    raise AssertionError(f"{count} finished '{name_prefix}...' task runs never appeared")


def test_new_version_emits_event_and_artifact(prefect_server, tmp_path, video_dir):
    import anyio
    from prefect.client.orchestration import get_client

    # the pipeline's own ingest does not announce (it trains on the version itself)
    quiet = ingest(sources=[str(video_dir)], data_root=str(tmp_path / "root"), dataset="quiet", announce=False)
    assert quiet["created"]
    summary = ingest(sources=[str(video_dir)], data_root=str(tmp_path / "root"), dataset="events-test")

    async def read():
        async with get_client() as client:
            response = await client._client.post("/events/filter", json={
                "filter": {"event": {"name": [DATASET_EVENT]},
                           "resource": {"id": ["mav.dataset.events-test", "mav.dataset.quiet"]}}, "limit": 10})
            response.raise_for_status()
            artifacts = await client.read_artifacts()
            return response.json()["events"], artifacts

    deadline = time.monotonic() + 60  # the server stores events asynchronously (flushed every 5 s)
    events, artifacts = anyio.run(read)
    while not events and time.monotonic() < deadline:
        time.sleep(0.5)
        events, artifacts = anyio.run(read)
    time.sleep(1.0)  # a wrong event from the quiet ingest, stored late, would show by now
    events, artifacts = anyio.run(read)
    (event,) = events
    assert event["resource"]["prefect.resource.id"] == "mav.dataset.events-test"
    assert event["payload"]["version"] == summary["version"]
    assert event["payload"]["new_clips"] == event["payload"]["total_clips"] == summary["total_clips"]
    table = next(a for a in artifacts if a.key == "ingest-events-test")
    assert "asl_book.mkv" in str(table.data)


def test_an_empty_source_is_refused_not_taken_for_the_working_directory(prefect_server, tmp_path, video_dir,
                                                                       monkeypatch):
    # a deployment's run has no `mav ingest` to check its parameters: "" was Path(""), the worker's
    # working directory (the repository), and every video in it became the dataset's new version
    monkeypatch.chdir(video_dir)
    root = tmp_path / "root"
    for sources in ([""], [str(video_dir), "  "], []):
        with pytest.raises(ValueError, match="an empty source|sources: none given"):
            ingest(sources=sources, data_root=str(root), dataset="empty-source")
    assert not (root / "datasets" / "empty-source").exists()


def test_an_empty_data_root_is_refused_not_taken_for_the_working_directory(prefect_server, tmp_path, video_dir,
                                                                         monkeypatch):
    # as mav ingest refuses --data-root "": a deployment's run wrote the dataset into the worker's
    # working directory (the repository), as ./datasets/NAME
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="data_root is empty"):
        ingest(sources=[str(video_dir)], data_root="", dataset="empty-root")
    assert not (tmp_path / "datasets").exists()


def dataset_events(dataset: str, wait_for: int, timeout: float = 60.0) -> list[dict]:
    """The server's mav.dataset.updated events of `dataset`, once at least `wait_for` are stored
    (the server stores events asynchronously, flushed every 5 s)."""
    import anyio
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            response = await client._client.post("/events/filter", json={
                "filter": {"event": {"name": [DATASET_EVENT]}, "resource": {"id": [f"mav.dataset.{dataset}"]}},
                "limit": 10})
            response.raise_for_status()
            return response.json()["events"]

    deadline = time.monotonic() + timeout
    events = anyio.run(read)
    while len(events) < wait_for and time.monotonic() < deadline:
        time.sleep(0.5)
        events = anyio.run(read)
    return events


def test_a_version_whose_ingest_was_killed_before_its_event_is_announced_by_the_rerun(prefect_server, tmp_path,
                                                                                     samples):
    # killed after the version was made, before mav.dataset.updated was sent: the rerun makes no new
    # version, so it sent no event either, and the version was never retrained
    root, dataset = tmp_path / "root", "killed-before-event"
    latest = root / "datasets" / dataset / "latest"
    source = str(samples / "asl_book.mkv")
    code = (f"from flows.ingest import ingest\n"
            f"ingest(sources=[{source!r}], data_root={str(root)!r}, dataset={dataset!r})\n")
    process = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PREFECT_API_URL": prefect_server},
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not latest.exists():  # polled: the kill lands as `latest` names the version (its artifact, event: after)
        assert process.poll() is None, "the ingest finished before the moment to kill it"
        assert time.monotonic() < deadline
        time.sleep(0.0005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    version = latest.read_text().strip()

    again = ingest(sources=[source], data_root=str(root), dataset=dataset)
    assert again["version"] == version and not again["created"]
    events = dataset_events(dataset, wait_for=1)
    assert [e["payload"]["version"] for e in events] == [version]
    clips = len(load_manifest(root, dataset, version))
    assert events[0]["payload"]["new_clips"] == events[0]["payload"]["total_clips"] == clips
    assert not (root / "datasets" / dataset / "unannounced").exists()  # announced once: later reruns send none


def test_the_same_bytes_at_two_paths_and_a_url_are_one_source(prefect_server, tmp_path, samples):
    """Given at once to two workers, the bytes are cut once and listed once, under the first path by
    name; the others are reported as its duplicates, and a rerun changes nothing."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("b.mkv", "a.mkv"):
        shutil.copy(samples / "asl_book.mkv", videos / name)
    with FaultServer({"/copy.mkv": ("ok", (samples / "asl_book.mkv").read_bytes())}) as srv:
        sources = [f"{srv.base}/copy.mkv", str(videos)]
        first = ingest(sources=sources, data_root=str(tmp_path / "root"), dataset="d", workers=2)
        downloads = srv.hits["/copy.mkv"]  # a source that found its bytes busy is taken up again as fetched
        again = ingest(sources=sources[::-1], data_root=str(tmp_path / "root"), dataset="d", workers=2)
    assert downloads == 1
    assert first["sources"] == {"new": 1, "unchanged": 0, "duplicate": 2, "failed": 0}
    said = f"same bytes as {videos / 'a.mkv'}"
    assert {d["source"]: d["reason"] for d in first["duplicates"]} == {f"{srv.base}/copy.mkv": said,
                                                                       str(videos / "b.mkv"): said}
    manifest = clip_table(tmp_path / "root", "d")
    assert first["total_clips"] == len(manifest) == manifest["clip_id"].nunique() > 0
    assert set(manifest["source"]) == {str(videos / "a.mkv")}
    assert sorted(p.stem for p in (tmp_path / "root/datasets/d/clips").iterdir()) == sorted(manifest["clip_id"])
    assert not again["created"] and again["version"] == first["version"]
    assert again["sources"] == {"new": 0, "unchanged": 1, "duplicate": 2, "failed": 0}


def test_a_urls_password_fetches_the_video_and_is_recorded_nowhere(prefect_server, tmp_path, samples, capsys):
    """Credentials in a URL (user:password@, or a token as the user) are sent to the server, but the
    manifest, the source records, the failures and the printed summary show **** in their place:
    everyone who reads the dataset or the run's artifact read them."""
    import base64

    with FaultServer({"/a.mkv": ("ok", (samples / "asl_book.mkv").read_bytes())}) as srv:
        good = srv.base.replace("://", "://alice:s3cret-pw@") + "/a.mkv"
        gone = srv.base.replace("://", "://tok3n-value@") + "/gone.mkv"
        summary = ingest(sources=[good, gone], data_root=str(tmp_path / "root"), dataset="d")
    assert f"Basic {base64.b64encode(b'alice:s3cret-pw').decode()}" in srv.authorizations
    assert summary["sources"] == {"new": 1, "unchanged": 0, "duplicate": 0, "failed": 1}
    assert summary["failures"] == [{"source": srv.base.replace("://", "://****@") + "/gone.mkv",
                                    "stage": "download", "reason": "HTTP 404 Not Found"}]
    manifest = clip_table(tmp_path / "root", "d")
    assert len(manifest) > 0 and set(manifest["source"]) == {srv.base.replace("://", "://alice:****@") + "/a.mkv"}
    failures = pd.read_parquet(next((tmp_path / "root/datasets/d/versions").glob("*/failures.parquet")))
    written = [json.dumps(failures.to_dict("records"))] + [
        path.read_text() for path in (tmp_path / "root").rglob("*") if path.suffix in (".json", ".jsonl")]
    for text in (*written, capsys.readouterr().out, json.dumps(summary)):
        assert "s3cret-pw" not in text and "tok3n-value" not in text


def test_a_source_whose_bytes_another_worker_is_cutting_does_not_wait_in_its_slot(tmp_path, samples):
    """A duplicate waited on the lock of its bytes and held one of the ingest's worker slots the
    while: without `wait` it comes back "busy" at once, with its fetched bytes, and is done after
    the rest (the flow's second pass), as fetched: here it cuts them, as the holder left no record."""
    from data_prep.config import IngestConfig
    from data_prep.dataset import source_lock
    from data_prep.download import sha256_file
    from data_prep.ingest import process_source
    from data_prep.sources import SourceRef

    video, ds_dir, cfg = tmp_path / "a.mkv", tmp_path / "root" / "datasets" / "d", IngestConfig()
    shutil.copy(samples / "asl_book.mkv", video)
    ref, digest = SourceRef(str(video), "file"), sha256_file(video)
    with source_lock(ds_dir, digest, cfg.clip_settings_hash()):  # another worker's
        busy = process_source(ref, tmp_path / "root", ds_dir, cfg, wait=False)
    assert (busy.status, busy.source_sha256, busy.fetched, busy.clips) == ("busy", digest, video, [])
    done = process_source(ref, tmp_path / "root", ds_dir, cfg, fetched=(busy.fetched, busy.source_sha256))
    assert done.status == "new" and done.clips


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on return: nothing listens there


@pytest.mark.parametrize("runner", [["--task-runner", "dask"], []])  # an address alone means dask
def test_an_unreachable_dask_scheduler_is_one_line_at_once_and_touches_nothing(tmp_path, samples, capsys, runner):
    """Before: the flow started, distributed retried for 30 s, and a 60-line trace came out (and an
    address without --task-runner dask was ignored: the ingest ran in threads)."""
    from flows.cli import main

    dataset = tmp_path / "root" / "datasets" / "default"  # what an earlier ingest left: stays as it is
    (dataset / "clips").mkdir(parents=True)
    (dataset / "clips" / "c.mp4").write_bytes(b"clip")
    (dataset / "latest").write_text("v1\n")
    before = {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    address = f"tcp://127.0.0.1:{_free_loopback_port()}"
    started = time.monotonic()
    code = main(["ingest", str(samples / "asl_book.mkv"), "--data-root", str(tmp_path / "root"), "--no-progress",
                 *runner, "--dask-address", address])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: --dask-address {address}: no Dask scheduler there (connection refused)"
    assert time.monotonic() - started < 25  # not distributed's 30 s of retries (slack for a loaded machine)
    assert {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before
    code = main(["ingest", str(samples / "asl_book.mkv"), "--data-root", str(tmp_path / "root"), "--no-progress",
                 "--task-runner", "threads", "--dask-address", address])
    assert code == 2 and "--dask-address is for --task-runner dask" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before


def test_a_dask_address_is_checked_for_a_scheduler(tmp_path):
    from distributed import LocalCluster

    from flows.ingest import check_scheduler

    with LocalCluster(n_workers=0, processes=False, protocol="tcp", dashboard_address=None) as cluster:
        check_scheduler(cluster.scheduler_address, timeout_s=2)  # a scheduler: no error
    with FaultServer({}) as web, pytest.raises(ValueError) as err:  # a web server, not a scheduler
        check_scheduler(web.base.replace("http", "tcp"), timeout_s=0.5)
    assert "something answers there, but no Dask handshake within 0.5 s" in str(err.value)
    for address, reason in [("ftp://host:1", "unknown address scheme 'ftp'"), ("tcp://host:70000", "port 70000")]:
        with pytest.raises(ValueError, match=f"--dask-address {address}: not a scheduler address .*{reason}"):
            check_scheduler(address)


@pytest.mark.slow
def test_dask_task_runner_gives_the_same_manifest(prefect_server, tmp_path, video_dir):
    threads = ingest(sources=[str(video_dir)], data_root=str(tmp_path / "a"), dataset="d")
    dask_flow = with_task_runner("dask", None, workers=2)
    on_dask = dask_flow(sources=[str(video_dir)], data_root=str(tmp_path / "b"), dataset="d")
    assert on_dask["version"] == threads["version"]
    pd.testing.assert_frame_equal(clip_table(tmp_path / "a", "d"), clip_table(tmp_path / "b", "d"))


@pytest.mark.slow
def test_killed_ingest_reruns_to_the_same_dataset(prefect_server, tmp_path, samples):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("big_buck_bunny_0_30.webm", "bottle-detection.mp4", "asl_book.mkv"):
        shutil.copy(samples / name, videos / name)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    command = [sys.executable, "-m", "flows.cli", "ingest", str(videos), "--workers", "1", "--no-progress"]

    def cli(root: Path, kill_when=None) -> None:
        process = subprocess.Popen([*command, "--data-root", str(root)], env=env, cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill_when is None:
            assert process.wait(timeout=300) == 0
            return
        deadline = time.monotonic() + 300
        while not kill_when():  # polled, not timed: the kill lands mid-source on a fast or a slow machine
            assert process.poll() is None, "the ingest finished before the moment to kill it"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()

    cli(tmp_path / "clean")
    killed = tmp_path / "killed"
    ds = killed / "datasets/default"

    def encoding(records: int):  # a clip half encoded, after `records` sources were done
        return lambda: len(list(ds.glob("sources/*.json"))) >= records and any(ds.glob("clips/.tmp-*.mp4"))

    def two_encoded():  # in a source, a clip done and the next begun: both under temporary names
        return len(list(ds.glob("clips/.tmp-*.mp4"))) >= 2

    cli(killed, kill_when=two_encoded)
    # no clip under its final name before its source's record (it stayed, listed nowhere, for good)
    listed = {c["clip_path"] for r in ds.glob("sources/*.json") for c in json.loads(r.read_text())["clips"]}
    assert {f"clips/{p.name}" for p in ds.glob("clips/*.mp4") if p.name[0] != "."} == listed
    cli(killed, kill_when=encoding(1))  # in a later source, the first one done
    assert list(ds.glob("clips/.tmp-*.mp4")) and not (ds / "latest").exists()
    cli(killed)
    pd.testing.assert_frame_equal(
        clip_table(tmp_path / "clean", "default").drop(columns=["source"]),
        clip_table(killed, "default").drop(columns=["source"]))
    leftovers = [p for p in (killed / "datasets/default").rglob(".tmp-*")]
    assert leftovers == []


def test_a_lock_held_by_another_is_waited_for_and_the_wait_is_said_once(tmp_path):
    """The dataset lock (and a pipeline step's): a second holder says once that it waits (else a run
    queued behind another ingest or training sat silent), and gets the lock when the first lets go."""
    import threading

    from data_prep.dataset import file_lock

    path, said, order = tmp_path / ".lock", [], []

    def second():
        with file_lock(path, lambda: said.append("waiting")):
            order.append("second")

    with file_lock(path, lambda: said.append("the first waited")):
        waiter = threading.Thread(target=second)
        waiter.start()
        deadline = time.monotonic() + 10
        while not said and time.monotonic() < deadline:
            time.sleep(0.01)
        order.append("first")
    waiter.join(10)
    assert said == ["waiting"] and order == ["first", "second"]


def test_two_ingests_into_one_dataset_at_once_lose_no_clips(prefect_server, tmp_path, samples):
    """Two processes ingest different videos into one dataset at the same time: the dataset lock
    makes one version build on the other's, so the latest version holds both sets of clips."""
    folders = {}
    for name in ("asl_book.mkv", "bigbuckbunny.mp4"):
        folders[name] = tmp_path / name.split(".")[0]
        folders[name].mkdir()
        shutil.copy(samples / name, folders[name] / name)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    root = tmp_path / "root"
    processes = [subprocess.Popen([sys.executable, "-m", "flows.cli", "ingest", str(folder), "--data-root", str(root),
                                   "--dataset", "shared", "--no-progress"], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for folder in folders.values()]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
    table = clip_table(root, "shared")
    assert set(table["source"].map(lambda s: Path(s).name)) == set(folders)
    info = version_info(root, "shared")
    assert info["parent"] is not None and info["num_clips"] == len(table)
