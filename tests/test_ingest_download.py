import hashlib
from pathlib import Path

import pytest

from data_prep.config import DownloadConfig
from data_prep.download import DownloadError, PageURLError, download
from tests.http_faults import FaultServer

FAST = DownloadConfig(connect_timeout_s=2, read_timeout_s=0.5, retries=2, backoff_s=0.05, max_bytes=10_000_000)


@pytest.fixture(scope="module")
def video_bytes(samples):
    return (samples / "asl_book.mkv").read_bytes()


def test_download_is_content_addressed_and_stored_once(tmp_path, video_bytes):
    with FaultServer({"/a.mkv": ("ok", video_bytes), "/copy/b": ("ok", video_bytes)}) as srv:
        first, sha = download(f"{srv.base}/a.mkv", tmp_path, FAST)
        second, sha2 = download(f"{srv.base}/copy/b", tmp_path, FAST)
    assert sha == sha2 == hashlib.sha256(video_bytes).hexdigest()
    assert first.name == f"{sha}.mkv" and first.read_bytes() == video_bytes
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [first.name]  # one copy
    assert not list((tmp_path / ".partial").iterdir())  # no temporary left behind


def test_concurrent_downloads_of_one_url_do_not_mix_their_bytes(tmp_path, video_bytes):
    """Two datasets' ingests share DATA_ROOT/raw: fetching the same URL at once must not append
    to one partial file from two responses, and the one that waited takes what the other stored.
    A later ingest fetches the URL again (the bytes behind it may have changed)."""
    from concurrent.futures import ThreadPoolExecutor

    with FaultServer({"/same.mkv": ("slow", video_bytes)}) as srv:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: download(f"{srv.base}/same.mkv", tmp_path, FAST), range(2)))
        assert len(srv.requests) == 1
        later = download(f"{srv.base}/same.mkv", tmp_path, FAST)
        assert len(srv.requests) == 2
    expected = hashlib.sha256(video_bytes).hexdigest()
    assert [sha for _, sha in results] == [expected, expected] and later[1] == expected
    assert results[0][0] == results[1][0] == later[0] and results[0][0].read_bytes() == video_bytes


def test_a_response_cut_short_is_resumed_with_range(tmp_path, video_bytes):
    with FaultServer({"/v.mkv": ("cut_once", video_bytes)}) as srv:
        path, sha = download(f"{srv.base}/v.mkv", tmp_path, FAST)
        ranges = [r for p, r in srv.requests]
    assert path.read_bytes() == video_bytes
    assert ranges[0] is None
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(video_bytes) // 3  # picked up where the broken response stopped


def test_partial_bytes_resume_only_the_file_they_came_from(tmp_path, video_bytes):
    """A cut download leaves its partial bytes; the next ingest resumes them with If-Range, so a
    file that changed in between is fetched whole instead of spliced onto the old bytes."""
    one_try = FAST.model_copy(update={"retries": 0})
    changed = video_bytes[::-1]
    for later, resumed in ((video_bytes, True), (changed, False)):
        target = tmp_path / ("same" if resumed else "changed")
        with FaultServer({"/v.mkv": ("cut", video_bytes)}) as srv:
            with pytest.raises(DownloadError, match="cut short"):
                download(f"{srv.base}/v.mkv", target, one_try)
            srv.routes["/v.mkv"] = ("ok", later)
            path, sha = download(f"{srv.base}/v.mkv", target, one_try)
            ranges = [r for _, r in srv.requests]
        assert path.read_bytes() == later and sha == hashlib.sha256(later).hexdigest()
        assert ranges[1] is not None  # asked to resume either way; the server decided
        assert not list((target / ".partial").iterdir())


def test_a_resume_answered_from_the_wrong_byte_starts_over(tmp_path, video_bytes):
    with FaultServer({"/v.mkv": ("cut_once_then_wrong_range", video_bytes)}) as srv:
        path, _ = download(f"{srv.base}/v.mkv", tmp_path, FAST)
        ranges = [r for _, r in srv.requests]
    assert path.read_bytes() == video_bytes  # appending the 206 from byte 0 would have spliced it
    assert ranges[0] is None and ranges[1] is not None and ranges[2] is None


def test_server_without_range_support_restarts_cleanly(tmp_path, video_bytes):
    """A partial download with its validator is resumed with a Range request; a server that ignores
    Range sends the whole file (200), which replaces the partial bytes instead of following them."""
    partial = tmp_path / ".partial"
    partial.mkdir()
    garbage = b"garbage from an earlier try"
    with FaultServer({"/v.mkv": ("ok_no_range", video_bytes)}) as srv:
        url = f"{srv.base}/v.mkv"
        url_hash = hashlib.sha256(url.encode()).hexdigest()[:32]
        (partial / f"{url_hash}.part").write_bytes(garbage)
        (partial / f"{url_hash}.validator").write_text('"etag-of-the-earlier-try"')
        path, _ = download(url, tmp_path, FAST)
        ranges = [r for _, r in srv.requests]
    assert ranges[0] == f"bytes={len(garbage)}-"  # the resume was asked for
    assert path.read_bytes() == video_bytes


def test_a_resume_from_a_server_that_gzips_every_response_gives_the_files_own_bytes(tmp_path, video_bytes):
    """Asked for gzip (requests asks by default), such a server counts Content-Length and Range in
    encoded bytes while the body arrives decoded: a resume asked for a decoded offset of the encoded
    stream, and the file was spliced. Downloads ask for the bytes as they are (identity)."""
    with FaultServer({"/v.mkv": ("gzip_cut_once", video_bytes)}) as srv:
        path, sha = download(f"{srv.base}/v.mkv", tmp_path, FAST)
    assert path.read_bytes() == video_bytes and sha == hashlib.sha256(video_bytes).hexdigest()


@pytest.mark.parametrize("kind,payload,message", [
    ("404", b"", "HTTP 404"),
    ("stall", b"x" * 50_000, "stalled"),
    ("cut", b"x" * 50_000, "cut short"),
    ("redirect", "file:///etc/passwd", "redirect to a non-http URL"),
    ("big", 11_000_000, "size cap"),
])
def test_faults_become_clear_errors(tmp_path, kind, payload, message):
    with FaultServer({"/x.mp4": (kind, payload)}) as srv:
        with pytest.raises(DownloadError, match=message):
            download(f"{srv.base}/x.mp4", tmp_path, FAST)
        hits = srv.hits.get("/x.mp4", 0)
    transient = kind in ("stall", "cut")
    assert hits == (FAST.retries + 1 if transient else 1)  # only transient faults are retried
    assert not [p for p in tmp_path.iterdir() if p.is_file()]  # nothing stored under a final name


def test_a_refused_resume_starts_over(tmp_path, video_bytes):
    with FaultServer({"/v.mkv": ("cut_once_then_416", video_bytes)}) as srv:
        path, _ = download(f"{srv.base}/v.mkv", tmp_path, FAST)
        ranges = [r for _, r in srv.requests]
    assert path.read_bytes() == video_bytes
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-" and ranges[2] is None


def test_a_redirect_loop_and_an_empty_file_are_clear_errors(tmp_path):
    with FaultServer({"/empty.mp4": ("ok", b"")}) as srv:
        srv.routes["/loop.mp4"] = ("redirect", f"{srv.base}/loop.mp4")
        with pytest.raises(DownloadError, match=f"more than {FAST.max_redirects} redirects"):
            download(f"{srv.base}/loop.mp4", tmp_path, FAST)
        assert srv.hits["/loop.mp4"] == FAST.max_redirects + 1
        with pytest.raises(DownloadError, match=r"empty response \(0 bytes\)"):
            download(f"{srv.base}/empty.mp4", tmp_path, FAST)
        # a host urllib3 cannot parse, given or redirected to: said as such, not as a bug of ours
        srv.routes["/bad-host.mp4"] = ("redirect", "http://cdn..example.com/b.mp4")
        for url in ("http://cdn..example.com/a.mp4", f"{srv.base}/bad-host.mp4"):
            with pytest.raises(DownloadError, match=r"not a valid URL: http://cdn\.\.example\.com/.\.mp4 \(Failed to parse"):
                download(url, tmp_path, FAST)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_declared_size_over_the_cap_fails_before_reading(tmp_path, video_bytes):
    small = FAST.model_copy(update={"max_bytes": 1000})
    with FaultServer({"/v.mkv": ("ok", video_bytes)}) as srv:
        with pytest.raises(DownloadError, match=f"{len(video_bytes)} bytes, over the size cap"):
            download(f"{srv.base}/v.mkv", tmp_path, small)


def test_a_web_page_is_recognised(tmp_path):
    with FaultServer({"/watch": ("html", None)}) as srv:
        with pytest.raises(PageURLError, match="web page"):
            download(f"{srv.base}/watch", tmp_path, FAST)


def test_a_page_url_in_an_ingest_is_a_failed_source_saying_what_to_install(tmp_path):
    import importlib.util

    from data_prep.config import IngestConfig
    from data_prep.ingest import process_source
    from data_prep.sources import SourceRef

    with FaultServer({"/watch": ("html", None)}) as srv:
        outcome = process_source(SourceRef(f"{srv.base}/watch", "url"), tmp_path, tmp_path / "ds", IngestConfig())
    assert (outcome.status, outcome.stage) == ("failed", "download")
    if importlib.util.find_spec("yt_dlp") is None:  # the optional 'pages' extra
        assert outcome.reason == "the URL is a web page; install the 'pages' extra (yt-dlp) to fetch page URLs"
    else:  # yt-dlp finds no video on the page and says so
        assert outcome.reason


def test_the_url_lock_hands_its_result_to_waiters_and_leaves_no_file(tmp_path):
    """fetch_once: waiters take what the holder stored; a failed holder makes a waiter fetch itself;
    the lock file is gone once nobody fetches the URL."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from data_prep.download import fetch_once

    stored = tmp_path / "abc.mp4"
    stored.write_bytes(b"video")
    holding, release = threading.Event(), threading.Event()
    fetches = []

    def fetch(outcome):
        def run():
            fetches.append(outcome)
            holding.set()
            release.wait(5)
            if outcome == "fail":
                raise DownloadError("HTTP 503")
            return stored, "abc"
        return run

    for first in ("ok", "fail"):
        holding.clear(), release.clear(), fetches.clear()
        with ThreadPoolExecutor(3) as pool:
            holder = pool.submit(fetch_once, tmp_path, "http://h/v.mp4", fetch(first))
            holding.wait(5)  # the holder is fetching: these two wait on its lock
            waiters = [pool.submit(fetch_once, tmp_path, "http://h/v.mp4", fetch("ok")) for _ in range(2)]
            _wait_for_blocked_flocks(next((tmp_path / ".locks").iterdir()), 2)
            release.set()
            results = [w.result(10) for w in waiters]
        if first == "ok":
            assert fetches == ["ok"]  # the waiters took the holder's file
        else:  # both waiters try again as newcomers: one fetches, the other waits on it or comes after
            assert fetches[0] == "fail" and fetches[1:] in (["ok"], ["ok", "ok"])
        assert results == [(stored, "abc")] * 2
        if first == "fail":
            with pytest.raises(DownloadError, match="503"):
                holder.result()
        assert not list((tmp_path / ".locks").iterdir())


def _wait_for_blocked_flocks(path, count, timeout=10.0):
    """Until `count` flock() calls wait on `path` (Linux lists them in /proc/locks as '->')."""
    import os
    import time

    inode, deadline = os.stat(path).st_ino, time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = Path("/proc/locks").read_text().splitlines()
        if sum("->" in line and f":{inode} " in line for line in lines) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{count} waiters never blocked on {path}")
