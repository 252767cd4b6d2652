"""Turn what the user names (files, folders, URLs, URL lists) into a flat list of sources."""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

LIST_SUFFIXES = {".txt", ".csv", ".tsv", ".parquet"}
URL_COLUMNS = ("url", "link", "source", "path")  # and any name ending in "url" (WebVid's contentUrl), any case


@dataclass(frozen=True)
class SourceRef:
    source: str  # as the user gave it (a path or a URL)
    kind: str  # "file", "url", "unsupported" (a scheme), "empty" (a folder or list naming nothing),
    # "unreadable" (a URL list that cannot be read, a malformed URL: `reason` says why)
    reason: str = ""

    @property
    def name(self) -> str:
        """The source as records, manifests, reports and logs name it: a URL's password hidden."""
        return without_password(self.source)


def without_password(text: str) -> str:
    """`text` with the password of each URL's user part in it replaced by ****, or the user alone where
    there is no password (a token given as the user, as GitHub's are), as pip shows URLs."""
    return _URL_USER.sub(lambda m: f"://{m['user']}:****@" if m["password"] is not None else "://****@", text)


# the user part of a URL: after "://", up to the "@" before the host (no "/" in it)
_URL_USER = re.compile(r"://(?P<user>[^/\s@:]*)(?::(?P<password>[^/\s@]*))?@")


class SourceError(ValueError):
    pass


def _is_url(text: str) -> bool:
    return urlparse(text).scheme in ("http", "https", "file")


def _ref_for(text: str, base: Path | None = None) -> SourceRef:
    try:
        parsed = urlparse(text)
    except ValueError as err:  # e.g. "http://[::1": the other sources go on
        return SourceRef(text, "unreadable", reason=f"not a valid URL ({err})")
    if parsed.scheme in ("http", "https"):
        try:
            parsed.port  # (a property: raises for a port out of range or not a number)
        except ValueError as err:
            return SourceRef(text, "unreadable", reason=f"not a valid URL ({err})")
        if not parsed.hostname:  # "http://", "http:///a.mp4": requests' InvalidURL, read as a bug of ours
            return SourceRef(text, "unreadable", reason="not a valid URL (no host)")
        return SourceRef(text, "url")
    if parsed.scheme == "file":  # file:///a/my%20clip.mp4 names "/a/my clip.mp4"
        return SourceRef(str(Path(unquote(parsed.path)).absolute()), "file")
    if parsed.scheme and "://" in text:  # ftp://, s3://...; "take:2.mp4" or "C:\\clip.mp4" is a path
        return SourceRef(text, "unsupported")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~nosuchuser/clip.mp4", or no home folder: the other sources go on
        return SourceRef(text, "unreadable", reason="cannot expand ~ (no such user, or no home folder)")
    if base is not None and not path.is_absolute():
        path = base / path
    return SourceRef(str(path.absolute()), "file")  # the same file is the same source from any cwd


def url_column(names: list[str]) -> int | None:
    """The index of the column of URLs among a header's names, if one is named so: by name, `url`
    first, then a name ending in url, then link, source, path (in a list headed `source,url` the
    source column names where each video came from), in header order among equals."""
    names = [name.strip().lower() for name in names]

    def rank(name: str) -> int | None:
        if "://" in name:  # a URL in a list without a header (one ending in "url" was taken for a name)
            return None
        if name.endswith("url"):
            return 0 if name == "url" else 1
        return 1 + URL_COLUMNS.index(name) if name in URL_COLUMNS else None

    ranked = [(r, i) for i, name in enumerate(names) if (r := rank(name)) is not None]
    return min(ranked)[1] if ranked else None


def read_url_list(path: Path) -> list[str]:
    """Entries of a .txt (one per line, # comments), .csv/.tsv or .parquet list."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = (line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines())  # -sig: a BOM
        return [line for line in lines if line and not line.startswith("#")]
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle, delimiter="\t" if suffix == ".tsv" else ","))
        # blank rows out, and Excel's "sep=," line: the header is the first row with something in it
        rows = [row for row in rows if any(cell.strip() for cell in row)]
        if rows and rows[0][0].strip().lower().startswith("sep=") and not "".join(rows[0][1:]).strip():
            rows = rows[1:]
        if not rows:
            return []
        column, body = url_column(rows[0]), rows[1:]
        if column is None:  # no header it knows: the column of URLs, else the first; row 0 a header if not a URL
            cells = [[cell.strip() for cell in row] for row in rows]
            width = max(len(row) for row in cells)
            column = next((i for i in range(width) if any("://" in row[i] for row in cells if len(row) > i)), 0)
            urls = any("://" in row[column] for row in cells[1:] if len(row) > column)
            first = cells[0][column] if len(cells[0]) > column else ""
            body = rows[1:] if urls and "://" not in first else rows
        return [row[column].strip() for row in body if len(row) > column and row[column].strip()]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        column = url_column(table.column_names)
        if column is None:  # as in a csv without a known name: the column of URLs
            column = _column_of_urls(table)
        if column is None:
            raise SourceError(f"no url column (looked for {', '.join(URL_COLUMNS)}, a name ending in url "
                              "or a column of URLs)")
        # a column of bytes (written without the UTF-8 annotation) holds the URLs as UTF-8 too
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in table.column(column).to_pylist() if v]
    raise SourceError("not a URL list (expected .txt, .csv, .tsv or .parquet)")


def _column_of_urls(table) -> int | None:
    """The first text column of a parquet table with a value holding '://'."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for i, column in enumerate(table.columns):
        if (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) \
                and pc.any(pc.match_substring(column, "://")).as_py():
            return i
    return None


def _named_in_utf8(ref: SourceRef) -> SourceRef:
    """The ref, or an unreadable one for a name that is not UTF-8 (a Latin-1 archive's "caf\\xe9.mp4":
    Python holds its bytes as surrogates, which no manifest, log or ffmpeg argument can carry)."""
    try:
        ref.source.encode("utf-8")
        return ref
    except UnicodeEncodeError:
        printable = ref.source.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return SourceRef(printable, "unreadable", reason="its name is not valid UTF-8 (rename it)")


def _videos_under(folder: Path, extensions: set[str], data_root: Path | None):
    """Files under `folder` by extension, not descending into `data_root` (nor symlinked folders)."""
    for where, folders, files in os.walk(folder):
        if data_root is not None:
            folders[:] = [f for f in folders if not (Path(where) / f).resolve().is_relative_to(data_root)]
        yield from (Path(where) / f for f in files
                    if Path(f).suffix.lower() in extensions and (Path(where) / f).is_file())


def holds_videos(folder: Path, video_extensions: list[str], data_root: Path | None = None) -> bool:
    """Whether a folder scan of `folder` finds a video (stops at the first)."""
    root = data_root.resolve() if data_root is not None else None
    return next(_videos_under(folder, {e.lower() for e in video_extensions}, root), None) is not None


def expand_sources(items: list[str], video_extensions: list[str], data_root: Path | None = None) -> list[SourceRef]:
    """Expand folders (recursive, by extension) and URL lists; keep order, drop repeats. A folder
    scan skips what lies under `data_root` (the ingest's own clips and downloads: `mav ingest .`
    in a folder that holds mav-data would otherwise take its clips as new sources every run)."""
    extensions = {e.lower() for e in video_extensions}
    root = data_root.resolve() if data_root is not None else None
    refs: list[SourceRef] = []
    for item in items:
        ref = _ref_for(item)
        path = Path(ref.source)
        try:
            is_dir = ref.kind == "file" and path.is_dir()
        except OSError as err:  # a name too long, a folder on the way we may not enter: the rest go on
            refs.append(SourceRef(ref.source, "unreadable", reason=f"cannot be read: {err.strerror or err}"))
            continue
        if is_dir:
            if root is not None and path.resolve().is_relative_to(root):
                refs.append(SourceRef(ref.source, "unreadable", reason=f"folder is inside the data root {root}"))
                continue
            found = sorted(_videos_under(path, extensions, root))
            refs.extend([SourceRef(str(p), "file") for p in found] or [SourceRef(ref.source, "empty")])
        elif ref.kind == "file" and path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            try:
                entries = read_url_list(path)
            except (OSError, ValueError, csv.Error) as err:  # SourceError, bad UTF-8, a broken parquet: the rest go on
                refs.append(SourceRef(ref.source, "unreadable", reason=f"URL list cannot be read: {err}"))
                continue
            refs.extend([_ref_for(entry, base=path.parent) for entry in entries] or [SourceRef(ref.source, "empty")])
        else:
            refs.append(ref)
    seen: set[str] = set()
    unique = []
    for ref in map(_named_in_utf8, refs):
        if ref.source not in seen:
            seen.add(ref.source)
            unique.append(ref)
    return unique
