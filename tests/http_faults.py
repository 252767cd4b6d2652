"""A real HTTP server on 127.0.0.1 whose routes misbehave on purpose."""
from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultServer:
    """routes: path -> (kind, payload). Kinds: ok, ok_no_range, slow, 404, stall, cut, cut_once, wrong_range,
    cut_once_then_wrong_range, cut_once_then_416, gzip_cut_once, redirect, html, big."""

    def __init__(self, routes: dict[str, tuple[str, object]]):
        self.routes = routes
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.hits: dict[str, int] = {}
        self.authorizations: list[str | None] = []  # each request's Authorization header
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                server.authorizations.append(self.headers.get("Authorization"))
                kind, payload = server.routes.get(self.path, ("404", b""))
                getattr(server, f"_{kind}")(self, payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- behaviours -----------------------------------------------------------------------
    @staticmethod
    def _send(handler, data: bytes, status=200, headers=None):
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def _etag(data: bytes) -> str:
        return f'"{hashlib.sha256(data).hexdigest()[:16]}"'

    def _ok(self, h, data: bytes, wrong_start: bool = False):
        """Range and If-Range as a real server does them (a changed file is sent whole);
        wrong_start: a 206 that starts at byte 0 whatever was asked."""
        rng, if_range = h.headers.get("Range"), h.headers.get("If-Range")
        tag = self._etag(data)
        if rng and rng.startswith("bytes=") and if_range in (None, tag):
            start = 0 if wrong_start else int(rng[6:].split("-")[0])
            self._send(h, data[start:], 206, {"Content-Length": str(len(data) - start), "ETag": tag,
                                               "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}",
                                               "Content-Type": "video/mp4"})
            return
        self._send(h, data, 200, {"Content-Length": str(len(data)), "Content-Type": "video/mp4", "ETag": tag})

    def _wrong_range(self, h, data: bytes):
        self._ok(h, data, wrong_start=True)

    def _ok_no_range(self, h, data: bytes):
        self._send(h, data, 200, {"Content-Length": str(len(data)), "Content-Type": "video/mp4"})

    def _slow(self, h, data: bytes):
        """The whole file, in 20 pieces 20 ms apart (downloads that overlap in time)."""
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Content-Type", "video/mp4")
        h.end_headers()
        step = len(data) // 20 + 1
        for start in range(0, len(data), step):
            h.wfile.write(data[start:start + step])
            h.wfile.flush()
            time.sleep(0.02)

    def _404(self, h, _):
        self._send(h, b"not here", 404, {"Content-Length": "8"})

    def _stall(self, h, data: bytes):
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[:1000])
        h.wfile.flush()
        time.sleep(3)  # longer than the tests' read timeout

    def _cut(self, h, data: bytes):
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("ETag", self._etag(data))
        h.end_headers()
        h.wfile.write(data[: len(data) // 3])
        h.wfile.flush()
        h.close_connection = True

    def _cut_once(self, h, data: bytes):
        """First request is cut short; later ones honour Range (resume)."""
        if self.hits[h.path] == 1:
            self._cut(h, data)
        else:
            self._ok(h, data)

    def _cut_once_then_wrong_range(self, h, data: bytes):
        if self.hits[h.path] == 1:
            self._cut(h, data)
        else:
            self._wrong_range(h, data)

    def _cut_once_then_416(self, h, data: bytes):
        """First request cut short; a resume is refused (416: the file shrank), a whole GET served."""
        if self.hits[h.path] == 1:
            self._cut(h, data)
        elif h.headers.get("Range"):
            self._send(h, b"", 416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"})
        else:
            self._ok(h, data)

    def _gzip_cut_once(self, h, data: bytes):
        """Gzip-encoded wherever the client accepts it (a server with gzip on for every type), Content-Length
        and Range counting the encoded bytes; the first response is cut short. Else as _cut_once."""
        import gzip

        if "gzip" not in h.headers.get("Accept-Encoding", ""):
            self._cut_once(h, data)
            return
        encoded = gzip.compress(data, mtime=0)
        if self.hits[h.path] == 1:
            self._send(h, encoded[: len(encoded) // 3], 200, {"Content-Length": str(len(encoded)),
                                                               "Content-Encoding": "gzip", "ETag": self._etag(data)})
            h.close_connection = True
            return
        start = int(h.headers.get("Range", "bytes=0-")[6:].split("-")[0])
        self._send(h, encoded[start:], 206 if start else 200, {
            "Content-Length": str(len(encoded) - start), "Content-Encoding": "gzip", "ETag": self._etag(data),
            "Content-Range": f"bytes {start}-{len(encoded) - 1}/{len(encoded)}"})

    def _redirect(self, h, target: str):
        self._send(h, b"", 302, {"Location": target, "Content-Length": "0"})

    def _html(self, h, _):
        body = b"<html><body>a page</body></html>"
        self._send(h, body, 200, {"Content-Type": "text/html; charset=utf-8", "Content-Length": str(len(body))})

    def _big(self, h, size: int):
        h.send_response(200)
        h.end_headers()  # no Content-Length: the cap must trip while streaming
        chunk = b"\0" * 65536
        for _ in range(size // len(chunk) + 1):
            h.wfile.write(chunk)
