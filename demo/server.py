"""A quiet, threaded loopback HTTP server for a shapes-world directory.

    with serve("demo_world") as base_url:      # "http://127.0.0.1:PORT"
        ...                                     # GET base_url + "/files/000001.jpg"

Files are served as bytes with a Content-Type guessed from the extension (so an HTML page saved as
``.jpg`` is announced as ``image/jpeg``, like a lying web server); missing paths get 404.
CLI: ``python -m demo.server DIR --port 8000``.
"""

from __future__ import annotations

import argparse
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class QuietHandler(SimpleHTTPRequestHandler):
    """Static files from ``directory``; no per-request log lines."""

    def log_message(self, format, *args):
        pass


def make_server(directory, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


@contextmanager
def serve(directory, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``directory`` in a background thread; yield the base URL; shut down on exit."""
    server = make_server(directory, host, port)
    thread = threading.Thread(target=server.serve_forever, name="demo-server", daemon=True)
    thread.start()
    try:
        h, p = server.server_address[:2]
        yield f"http://{h}:{p}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m demo.server", description="Serve a shapes-world directory.")
    ap.add_argument("directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    a = ap.parse_args(argv)
    server = make_server(a.directory, a.host, a.port)
    h, p = server.server_address[:2]
    print(f"serving {a.directory} at http://{h}:{p} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
