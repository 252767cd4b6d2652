"""Fetch http(s) sources into a content-addressed store: DATA_ROOT/raw/<sha256><ext>.

Streams to a temporary name, resumes with Range where the server allows it,
retries transient failures with backoff, caps the size, and renames only a
complete, hashed file. No path is ever built from a name taken from the URL.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlparse

import requests
from urllib3.exceptions import LocationParseError

from data_prep.atomic import durable_replace
from data_prep.config import VIDEO_EXTENSIONS, DownloadConfig
from data_prep.dataset import same_file

CHUNK = 1 << 16  # small enough that a broken response still leaves most bytes for a resume


class DownloadError(RuntimeError):
    def __init__(self, reason: str, transient: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class PageURLError(DownloadError):
    """The URL answered with a web page: a job for yt-dlp, not for plain http."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _suffix(url: str) -> str:
    suffix = Path(urlparse(url).path).suffix.lower()
    return suffix if suffix in VIDEO_EXTENSIONS else ".video"


def _open(session: requests.Session, url: str, offset: int, cfg: DownloadConfig,
          validator: str | None = None) -> requests.Response:
    """GET with manual redirects so that every hop is checked to be http(s). A resume sends
    If-Range with the validator of the partial bytes: a server whose file changed sends it whole."""
    # the file's own bytes: requests asks for gzip by default, and a server that gzips videos counts
    # Content-Length and Range in encoded bytes while the body arrives decoded (a resume spliced the file)
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    if offset and validator:
        headers["If-Range"] = validator
    for _ in range(cfg.max_redirects + 1):
        try:
            response = session.get(
                url, headers=headers, stream=True, allow_redirects=False,
                timeout=(cfg.connect_timeout_s, cfg.read_timeout_s),
            )
        except requests.exceptions.ConnectTimeout:
            raise DownloadError(f"no connection within {cfg.connect_timeout_s:g} s", transient=True) from None
        except requests.exceptions.ReadTimeout:
            raise DownloadError(f"server sent nothing for {cfg.read_timeout_s:g} s (stalled)", transient=True) from None
        except requests.exceptions.ConnectionError as err:
            raise DownloadError(f"connection failed: {err.__class__.__name__}", transient=True) from None
        except (requests.exceptions.InvalidURL, LocationParseError) as err:  # "http://cdn..example.com/a.mp4"
            raise DownloadError(f"not a valid URL: {url} ({err})") from None
        if response.is_redirect:
            target = urljoin(url, response.headers.get("Location", ""))
            response.close()
            scheme = urlparse(target).scheme
            if scheme not in ("http", "https"):
                raise DownloadError(f"redirect to a non-http URL ({scheme or 'no'} scheme) refused")
            url = target
            continue
        return response
    raise DownloadError(f"more than {cfg.max_redirects} redirects")


def _validator(response: requests.Response) -> str | None:
    """What identifies these bytes for If-Range: a strong ETag, else Last-Modified."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _validator_file(part: Path) -> Path:
    """Where the validator of a partial download's bytes is kept, beside them."""
    return part.with_suffix(".validator")


def _restart(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validator_file(part).unlink(missing_ok=True)


def _fetch_once(session: requests.Session, url: str, part: Path, cfg: DownloadConfig, earlier_run: bool) -> None:
    """Fetch into `part`, resuming what it holds. Partial bytes from an earlier run are resumed only
    with a validator (If-Range): the file behind the URL may have changed since."""
    validator_file = _validator_file(part)
    validator = validator_file.read_text() if validator_file.exists() else None
    if earlier_run and part.exists() and not validator:
        _restart(part)
    offset = part.stat().st_size if part.exists() else 0
    response = _open(session, url, offset, cfg, validator)
    with response:
        status = response.status_code
        if status == 416 and offset:  # our partial file is stale: start over
            _restart(part)
            raise DownloadError("server refused the resume range", transient=True)
        if status in (408, 429) or status >= 500:
            raise DownloadError(f"HTTP {status} {response.reason}", transient=True)
        if status >= 400:
            raise DownloadError(f"HTTP {status} {response.reason}")
        if status == 206 and offset:
            first = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if first != str(offset):  # appending these bytes would splice the file
                _restart(part)
                raise DownloadError(f"server answered a resume from byte {offset} with Content-Range "
                                    f"{response.headers.get('Content-Range')!r}", transient=True)
        if status == 200:  # the whole file: a first request, a server without Range, or a changed file
            offset = 0
            part.parent.mkdir(parents=True, exist_ok=True)
            if (validator := _validator(response)) is not None:
                validator_file.write_text(validator)
            else:
                validator_file.unlink(missing_ok=True)
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length and length.isdigit() else None
        if expected is not None and expected > cfg.max_bytes:
            raise DownloadError(f"file is {expected} bytes, over the size cap of {cfg.max_bytes} bytes")
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("text/html"):
            raise PageURLError("the URL is a web page (text/html), not a video file")
        received = offset
        with open(part, "ab" if offset else "wb") as handle:
            try:
                for block in response.iter_content(CHUNK):
                    received += len(block)
                    if received > cfg.max_bytes:
                        raise DownloadError(f"download passed the size cap of {cfg.max_bytes} bytes")
                    handle.write(block)
            except requests.exceptions.ConnectionError as err:
                # requests reports a read timeout inside a body as a ConnectionError
                stalled = "timed out" in str(err).lower()
                raise DownloadError(
                    f"server stalled for {cfg.read_timeout_s:g} s after {received} bytes" if stalled
                    else f"connection broke after {received} bytes", transient=True) from None
            except requests.exceptions.ChunkedEncodingError:
                raise DownloadError(f"response cut short after {received} bytes", transient=True) from None
        if expected is not None and received < expected:
            raise DownloadError(f"response cut short: {received} of {expected} bytes", transient=True)


def download(url: str, raw_dir: Path, cfg: DownloadConfig) -> tuple[Path, str]:
    """Download `url` into raw_dir; return (path, sha256). Raises DownloadError."""
    scheme = urlparse(url).scheme
    if scheme not in ("http", "https"):
        raise DownloadError(f"unsupported URL scheme {scheme!r} (only http, https and file)")
    partial_dir = raw_dir / ".partial"
    partial_dir.mkdir(parents=True, exist_ok=True)
    return fetch_once(raw_dir, url, lambda: _download(url, partial_dir / f"{_url_key(url)}.part", raw_dir, cfg))


def _url_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def fetch_once(raw_dir: Path, url: str, fetch: Callable[[], tuple[Path, str]]) -> tuple[Path, str]:
    """`fetch()` under a lock per URL: raw/ is shared by every dataset under DATA_ROOT, and two
    ingests fetching one URL must not write the same partial file (or yt-dlp folder) at once.
    The lock file lives only while the URL is being fetched: its holder writes the stored file's
    name into it and removes it before letting go, and those that waited take that file instead
    of fetching again. A later ingest fetches again (the bytes behind a URL can change); if the
    holder failed, its waiters try again as if they had just come."""
    lock = raw_dir / ".locks" / f"{_url_key(url)}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # no truncation: a waiter reads what it holds
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if same_file(fd, lock):  # ours: fetch, leave the result for our waiters, remove the file
                try:
                    os.ftruncate(fd, 0)  # a holder killed before removing it may have left a name
                    stored = fetch()
                    os.pwrite(fd, stored[0].name.encode(), 0)
                    return stored
                finally:
                    lock.unlink(missing_ok=True)  # still locked: nobody can take this file over
            name = os.pread(fd, 4096, 0).decode()  # the holder we waited for has finished
        finally:
            os.close(fd)  # releases the lock
        if name and (raw_dir / name).is_file():
            return raw_dir / name, name.split(".")[0]


def _download(url: str, part: Path, raw_dir: Path, cfg: DownloadConfig) -> tuple[Path, str]:
    delay = cfg.backoff_s
    session = requests.Session()
    for attempt in range(cfg.retries + 1):
        try:
            _fetch_once(session, url, part, cfg, earlier_run=attempt == 0)
            break
        except DownloadError as err:
            if not err.transient or attempt == cfg.retries:
                if not err.transient:
                    _restart(part)
                if attempt:
                    err.reason += f" (after {attempt + 1} tries)"
                    err.args = (err.reason,)
                raise
            time.sleep(delay)
            delay *= 2
    _validator_file(part).unlink(missing_ok=True)
    if part.stat().st_size == 0:
        part.unlink()
        raise DownloadError("empty response (0 bytes)")
    return _store(part, raw_dir, _suffix(url))


def _store(temp: Path, raw_dir: Path, suffix: str) -> tuple[Path, str]:
    """Rename a complete download to raw/<sha256><suffix>, unless those bytes are already stored."""
    digest = sha256_file(temp)
    existing = next(iter(sorted(raw_dir.glob(f"{digest}.*"))), None)
    if existing is not None:
        temp.unlink()
        return existing, digest
    final = raw_dir / f"{digest}{suffix}"
    durable_replace(temp, final)  # a name that claims these bytes never holds fewer after a crash
    return final, digest


def download_page(url: str, raw_dir: Path) -> tuple[Path, str]:
    """Page URLs (YouTube and the like) through yt-dlp, keeping yt-dlp's own error message."""
    try:
        import yt_dlp
    except ImportError:
        raise DownloadError("the URL is a web page; install the 'pages' extra (yt-dlp) to fetch page URLs") from None
    work = raw_dir / ".partial" / _url_key(url)

    def fetch() -> tuple[Path, str]:
        work.mkdir(parents=True, exist_ok=True)
        options = {"outtmpl": str(work / "video.%(ext)s"), "format": "mp4/bestvideo", "quiet": True,
                   "noprogress": True}
        try:
            with yt_dlp.YoutubeDL(options) as ydl:
                ydl.download([url])
        except Exception as err:  # yt-dlp raises its own DownloadError types
            raise DownloadError(f"yt-dlp: {err}") from None
        files = [p for p in work.iterdir() if p.is_file() and not p.name.endswith(".part")]
        if not files:
            raise DownloadError("yt-dlp finished but wrote no file")
        stored = _store(files[0], raw_dir, files[0].suffix.lower() or ".video")
        shutil.rmtree(work, ignore_errors=True)
        return stored

    return fetch_once(raw_dir, url, fetch)
