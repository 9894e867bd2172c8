"""A loopback HTTP/1.1 server that misbehaves on purpose, one path per bad-input case.

    with serve_bad() as srv:
        srv.url("/ok.jpg"), srv.url("/slow"), ...
        srv.hits["/ok.jpg"]      # how many requests reached a path

Paths (``?id=...`` query strings are ignored for routing; ``/flaky`` counts per id):

=====================  ==========================================================================
/ok.jpg, /ok.png       a real 640x480 JPEG / a 300x200 RGBA PNG
/exif.jpg              a JPEG with EXIF tags (Make, Model)
/404, /500             those statuses
/slow                  waits 6 s before answering (longer than the tests' 2 s timeout)
/drip                  sends headers at once, then one byte every 0.1 s for 10 s
/truncated.jpg         the first half of /ok.jpg, with a matching Content-Length
/html.jpg              an HTML page announced as image/jpeg
/empty.jpg             200 with an empty body
/bomb.png              a real 10000x10000 PNG of zeros (100 Mpx, ~100 kB compressed)
/loop, /loop2          redirect to each other
/redirect-private      302 to http://10.255.255.1/x.jpg
/redirect-linklocal    302 to http://169.254.169.254/latest/meta-data/
/redirect-ok           302 to /ok.jpg
/redirect-chain/N      N redirects, then /ok.jpg
/big-nolength          5 MB with no Content-Length, then the connection closes
/big-chunked           5 MB, chunked
/big-cl                announces Content-Length: 50000000 (sends nothing more)
/lying-cl              announces Content-Length: 2000 but writes the whole /ok.jpg
/noai.jpg              /ok.jpg with ``X-Robots-Tag: noai``
/otherbot.jpg          /ok.jpg with ``X-Robots-Tag: otherbot: noai`` (only for agent "otherbot")
/flaky                 503 on the first request of each ``id``, then /ok.jpg
/ünïcode.jpg           /ok.jpg at a non-ASCII path (requested percent-encoded)
=====================  ==========================================================================
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from PIL import Image


def make_jpeg(w: int = 640, h: int = 480, seed: int = 0, exif: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), (xx + yy) % 256], -1)
    arr = np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    buf = io.BytesIO()
    if exif:
        ex = Image.Exif()
        ex[0x010F] = "TestMake"  # Make
        ex[0x0110] = "TestModel"  # Model
        im.save(buf, "JPEG", quality=90, exif=ex.tobytes())
    else:
        im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_png_rgba(w: int = 300, h: int = 200) -> bytes:
    arr = np.zeros((h, w, 4), np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def make_bomb_png(side: int = 10000) -> bytes:
    """A valid 8-bit greyscale PNG of ``side`` x ``side`` zeros, compressed row by row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [comp.compress(row) for _ in range(side)]
    idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@dataclass
class BadServer:
    base: str
    hits: Counter = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return self.base + path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    files: dict[str, bytes] = {}
    hits: Counter
    flaky_seen: set

    def log_message(self, format, *args):
        pass

    def _send(
        self, code: int, body: bytes = b"", ctype: str = "image/jpeg", headers: dict | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._send(302, b"", "text/plain", {"Location": location})

    def do_GET(self):  # noqa: C901 - one branch per case is the point
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        self.hits[path] += 1
        ok = self.files["ok.jpg"]
        try:
            if path == "/ok.jpg" or path == "/ünïcode.jpg":
                self._send(200, ok)
            elif path == "/ok.png":
                self._send(200, self.files["ok.png"], "image/png")
            elif path == "/exif.jpg":
                self._send(200, self.files["exif.jpg"])
            elif path == "/404":
                self._send(404, b"not found", "text/plain")
            elif path == "/500":
                self._send(500, b"boom", "text/plain")
            elif path == "/slow":
                time.sleep(6)
                self._send(200, ok)
            elif path == "/drip":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(ok)))
                self.end_headers()
                for b in ok[:100]:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.1)
                self.close_connection = True
            elif path == "/truncated.jpg":
                self._send(200, ok[: len(ok) // 2])
            elif path == "/html.jpg":
                self._send(200, b"<!DOCTYPE html><html><body>Not here</body></html>", "image/jpeg")
            elif path == "/empty.jpg":
                self._send(200, b"")
            elif path == "/bomb.png":
                self._send(200, self.files["bomb.png"], "image/png")
            elif path == "/loop":
                self._redirect("/loop2")
            elif path == "/loop2":
                self._redirect("/loop")
            elif path == "/redirect-private":
                self._redirect("http://10.255.255.1/x.jpg")
            elif path == "/redirect-linklocal":
                self._redirect("http://169.254.169.254/latest/meta-data/")
            elif path == "/redirect-ok":
                self._redirect("/ok.jpg")
            elif path.startswith("/redirect-chain/"):
                n = int(path.rsplit("/", 1)[1])
                self._redirect(f"/redirect-chain/{n - 1}" if n > 1 else "/ok.jpg")
            elif path == "/big-nolength":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                for _ in range(80):
                    self.wfile.write(b"\xff" * 65536)
            elif path == "/big-chunked":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                piece = b"\xff" * 65536
                for _ in range(80):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            elif path == "/big-cl":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "50000000")
                self.end_headers()
                self.close_connection = True
            elif path == "/lying-cl":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "2000")
                self.end_headers()
                self.wfile.write(ok)
                self.close_connection = True
            elif path == "/noai.jpg":
                self._send(200, ok, headers={"X-Robots-Tag": "noai"})
            elif path == "/otherbot.jpg":
                self._send(200, ok, headers={"X-Robots-Tag": "otherbot: noai"})
            elif path == "/flaky":
                key = query.get("id", [""])[0]
                if key in self.flaky_seen:
                    self._send(200, ok)
                else:
                    self.flaky_seen.add(key)
                    self._send(503, b"try later", "text/plain")
            else:
                self._send(404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


@contextmanager
def serve_bad() -> Iterator[BadServer]:
    files = {
        "ok.jpg": make_jpeg(),
        "ok.png": make_png_rgba(),
        "exif.jpg": make_jpeg(exif=True),
        "bomb.png": make_bomb_png(),
    }
    hits: Counter = Counter()
    handler = type("BadHandler", (_Handler,), {"files": files, "hits": hits, "flaky_seen": set()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="badserver", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield BadServer(f"http://{host}:{port}", hits)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
