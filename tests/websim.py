"""A simulated web on 127.0.0.1: many hosts, heavy-tailed latency, slow drips, hangs, errors,
rate limits, per-host connection limits, redirects, robots.txt and TDM headers.

    with WebSim(hosts, images) as sim:             # in a thread of this process (tests)
        urls = sim.urls(plan)                       # [(url, expected), ...]
        ...
        sim.stats()                                 # what the server saw, per host

    proc = SimProcess(hosts, corpus_dir)            # in its own process (bench/download_web.py)

Every host is its own listening port on 127.0.0.1 (so any client can reach it; a client with a
resolver hook may call it ``h7.websim.test``). Nothing is ever sent off 127.0.0.1, and every wait
is bounded (``max_hang``, ``max_drip``), so a stuck client cannot keep the simulator busy forever.

Paths (``ID`` is any integer; the body of ``/img/ID.jpg`` is image ``ID % len(images)``):

==========================  ======================================================================
/img/ID.jpg                 the image, after the host's latency
/redirect/ID.jpg            302 to /img/ID.jpg
/hang/ID                    accepts the request and never answers (until max_hang, then closes)
/drip/ID.jpg                200 with the full Content-Length, then 64 bytes per drip_interval,
                            until max_drip (then closes: the body is never complete)
/status/CODE/ID             that HTTP status
/private/ID.jpg             the image; robots.txt of ``robots`` hosts disallows /private/
/close/ID.jpg               the image, then the server closes the connection
/robots.txt                 the host's ``robots`` text, else 404
/.well-known/tdmrep.json    the host's ``tdmrep`` text (TDMRep's well-known file), else 404
/goto/NAME/PATH             302 to PATH on host NAME (by its .websim.test name)
==========================  ======================================================================

Per host (``HostSpec``): ``limit`` concurrent requests (counted by the server from request to the
end of the response; over it: 503 with ``Retry-After: 1``), ``rate`` requests/s (over it: 429 with
``Retry-After``), ``kind`` = ``dead`` (accepts connections, never answers anything) or
``refused`` (nothing listens), ``tdm`` (``tdm-reservation: 1`` on images), lognormal latency
(``latency`` median seconds, ``sigma``; drawn per URL and attempt from a fixed seed, so two
clients see the same web).

The server records per host: requests, peak concurrent requests, over-limit 503s, 429s, and
per path each request's [start, outcome (``done``, ``aborted`` by the client, ``429``, ``503``), end]
(monotonic clock of the server's process).
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing as mp
import random
import socket
import threading
import time
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class HostSpec:
    name: str
    kind: str = "normal"  # normal | dead | refused
    limit: int = 16  # concurrent requests served; more get 503 + Retry-After: 1
    rate: float | None = None  # requests per second served; more get 429 + Retry-After
    retry_after: int = 1
    latency: float = 0.08  # median seconds before the response starts
    sigma: float = 1.4  # lognormal sigma (1.4: p99 about 26x the median)
    robots: str | None = None  # robots.txt body
    tdm: bool = False  # tdm-reservation: 1 on every image response
    tdmrep: str | None = None  # /.well-known/tdmrep.json body
    first_429: bool = False  # the first request of every path gets 429 + Retry-After
    drip_interval: float = 0.5
    port: int = 0


@dataclass
class _HostState:
    active: int = 0
    peak: int = 0
    requests: int = 0
    over_limit: int = 0
    rate_limited: int = 0
    window: list = field(default_factory=list)  # request times in the last second (rate limit)


class WebSim:
    def __init__(
        self, hosts: list[HostSpec], images: list[bytes], max_hang: float = 30, max_drip: float = 30, seed=0
    ):
        self.hosts = hosts
        self.images = images
        self.max_hang = max_hang
        self.max_drip = max_drip
        self.seed = seed
        self.state: dict[str, _HostState] = {h.name: _HostState() for h in hosts}
        self.paths: dict[str, list] = defaultdict(list)  # "host path" -> [(t, outcome)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._refused: list[socket.socket] = []

    # ---- URLs -------------------------------------------------------------------------------
    def base(self, h: HostSpec | str, names: bool = False) -> str:
        h = self.host(h) if isinstance(h, str) else h
        return f"http://{h.name + '.websim.test' if names else '127.0.0.1'}:{h.port}"

    def host(self, name: str) -> HostSpec:
        return next(h for h in self.hosts if h.name == name)

    def url(self, host: str, path: str, names: bool = False) -> str:
        return self.base(host, names) + path

    def by_port(self) -> dict[int, str]:
        return {h.port: h.name for h in self.hosts}

    # ---- server -------------------------------------------------------------------------------
    def __enter__(self) -> WebSim:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="websim", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("websim did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
        for s in self._refused:
            s.close()

    def _run(self, ready: threading.Event) -> None:
        asyncio.run(self._main(ready))

    async def _main(self, ready: threading.Event, on_ports=None) -> None:
        from aiohttp import web

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        self._ports: dict[int, HostSpec] = {}
        for h in self.hosts:
            if h.kind == "refused":  # a port that is bound but never listens: connections are refused
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                h.port = s.getsockname()[1]
                self._refused.append(s)
                continue
            if h.kind == "dead":
                server = await asyncio.start_server(self._dead, "127.0.0.1", 0)
                h.port = server.sockets[0].getsockname()[1]
                continue
            site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
            await site.start()
            h.port = site._server.sockets[0].getsockname()[1]
            self._ports[h.port] = h
        if on_ports is not None:
            on_ports([h.port for h in self.hosts])
        ready.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _dead(self, reader, writer) -> None:
        port = writer.get_extra_info("sockname")[1]
        name = next(h.name for h in self.hosts if h.port == port)
        self.state[name].requests += 1  # connections accepted (a dead host never reads a request)
        try:
            await asyncio.wait_for(reader.read(), self.max_hang)
        except (TimeoutError, OSError):
            pass
        writer.close()

    def _latency(self, h: HostSpec, path: str, n: int) -> float:
        rng = random.Random(zlib.crc32(f"{self.seed} {h.name} {path} {n}".encode()))
        return min(h.latency * math.exp(h.sigma * rng.gauss(0, 1)), 20.0)

    async def _handle(self, request):
        from aiohttp import web

        h = self._ports[request.transport.get_extra_info("sockname")[1]]
        st = self.state[h.name]
        path = request.path
        rec = self.paths[f"{h.name} {path}"]
        entry = [time.monotonic(), "started"]
        rec.append(entry)
        n = len(rec)
        st.requests += 1
        st.active += 1
        st.peak = max(st.peak, st.active)
        try:
            if st.active > h.limit:
                st.over_limit += 1
                entry[1] = "503"
                return web.Response(status=503, headers={"Retry-After": "1"}, text="busy")
            if h.first_429 and n == 1:
                st.rate_limited += 1
                entry[1] = "429"
                return web.Response(status=429, headers={"Retry-After": str(h.retry_after)}, text="later")
            if h.rate is not None:
                now = time.monotonic()
                st.window = [t for t in st.window if t > now - 1.0]
                if len(st.window) >= h.rate:
                    st.rate_limited += 1
                    entry[1] = "429"
                    return web.Response(
                        status=429, headers={"Retry-After": str(h.retry_after)}, text="slow down"
                    )
                st.window.append(now)
            resp = await self._serve(request, h, path, n)
            entry[1] = "done"
            return resp
        except asyncio.CancelledError:
            entry[1] = "aborted"
            raise
        finally:
            st.active -= 1
            entry.append(time.monotonic())

    async def _serve(self, request, h: HostSpec, path: str, n: int):
        from aiohttp import web

        parts = path.strip("/").split("/")
        if path == "/robots.txt":
            if h.robots is None:
                return web.Response(status=404, text="no robots.txt")
            return web.Response(text=h.robots, content_type="text/plain")
        if path == "/.well-known/tdmrep.json":
            if h.tdmrep is None:
                return web.Response(status=404, text="no tdmrep.json")
            return web.Response(text=h.tdmrep, content_type="application/json")
        if parts[0] == "goto" and len(parts) >= 3:
            to = self.host(parts[1])
            raise web.HTTPFound(f"http://{to.name}.websim.test:{to.port}/{'/'.join(parts[2:])}")
        await asyncio.sleep(self._latency(h, path, n))
        headers = {"tdm-reservation": "1"} if h.tdm else {}
        if parts[0] in ("img", "private") and len(parts) == 2:
            body = self.images[_id(parts[1]) % len(self.images)]
            return web.Response(body=body, content_type="image/jpeg", headers=headers)
        if parts[0] == "close" and len(parts) == 2:  # the image, then the server closes the connection
            resp = web.Response(body=self.images[_id(parts[1]) % len(self.images)], content_type="image/jpeg")
            resp.force_close()
            return resp
        if parts[0] == "redirect":
            raise web.HTTPFound(f"/img/{parts[1]}")
        if parts[0] == "status":
            return web.Response(status=int(parts[1]), text="status")
        if parts[0] == "hang":
            await asyncio.sleep(self.max_hang)
            request.transport.close()
            return web.Response(status=500)
        if parts[0] == "drip":
            body = self.images[_id(parts[1]) % len(self.images)]
            resp = web.StreamResponse(headers={"Content-Type": "image/jpeg", **headers})
            resp.content_length = len(body)
            await resp.prepare(request)
            end = time.monotonic() + self.max_drip
            i = 0
            while time.monotonic() < end and i < len(body) - 64:
                await resp.write(body[i : i + 64])
                i += 64
                await asyncio.sleep(h.drip_interval)
            request.transport.close()  # never completes the body
            return resp
        return web.Response(status=404, text="not found")

    # ---- records -----------------------------------------------------------------------------
    def stats(self) -> dict:
        hosts = {
            name: {k: v for k, v in asdict(s).items() if k != "window"} for name, s in self.state.items()
        }
        return {"hosts": hosts, "paths": {k: list(map(list, v)) for k, v in self.paths.items()}}

    def reset(self) -> None:
        for s in self.state.values():
            s.peak = s.requests = s.over_limit = s.rate_limited = 0
        self.paths.clear()


def _id(part: str) -> int:
    digits = "".join(c for c in part if c.isdigit())
    return int(digits) if digits else 0


# ---- a URL list over a web ------------------------------------------------------------------------

# What a URL on a normal host is (share): image, redirect, hang, drip, 404, 403, 500.
MIX = (
    ("img", 0.84),
    ("redirect", 0.05),
    ("hang", 0.05),
    ("drip", 0.01),
    ("404", 0.03),
    ("403", 0.01),
    ("500", 0.01),
)


def plan_urls(
    sim: WebSim, n: int, seed: int = 0, names: bool = False, zipf: float = 0.8
) -> list[tuple[str, str]]:
    """``n`` (url, expected) pairs over the sim's hosts (Zipf-weighted: a few hosts hold many URLs).
    ``expected`` is ``image`` for URLs that serve an image to a polite client (reachable), else
    what they do: ``hang``, ``drip``, ``http_404`` ..., ``dead``, ``refused``."""
    rng = random.Random(seed)
    hosts = sim.hosts
    weights = [1 / (i + 1) ** zipf for i in range(len(hosts))]
    out = []
    for i in range(n):
        h = rng.choices(hosts, weights)[0]
        base = sim.base(h, names)
        if h.kind in ("dead", "refused"):
            out.append((f"{base}/img/{i}.jpg", h.kind))
            continue
        r, acc, what = rng.random(), 0.0, "img"
        for kind, share in MIX:
            acc += share
            if r < acc:
                what = kind
                break
        if what == "img":
            out.append((f"{base}/img/{i}.jpg", "image"))
        elif what == "redirect":
            out.append((f"{base}/redirect/{i}.jpg", "image"))
        elif what == "hang":
            out.append((f"{base}/hang/{i}", "hang"))
        elif what == "drip":
            out.append((f"{base}/drip/{i}.jpg", "drip"))
        else:
            out.append((f"{base}/status/{what}/{i}", f"http_{what}"))
    return out


# ---- in its own process (bench) ------------------------------------------------------------------


def _serve_process(hosts, corpus_dir, max_hang, max_drip, conn) -> None:
    images = [p.read_bytes() for p in sorted(Path(corpus_dir).glob("*.jpg"))]
    sim = WebSim(hosts, images, max_hang, max_drip)

    async def main():
        ready = threading.Event()
        task = asyncio.create_task(sim._main(ready, on_ports=lambda ports: conn.send(ports)))
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd == "stats":
                conn.send(json.dumps(sim.stats()))
            elif cmd == "reset":
                sim.reset()
                conn.send("ok")
            else:
                sim._stop.set()
                await task
                conn.send("bye")
                return

    asyncio.run(main())


class SimProcess:
    """``WebSim`` in a child process (its CPU stays out of the clients' figures)."""

    def __init__(self, hosts: list[HostSpec], corpus_dir: str, max_hang: float = 60, max_drip: float = 60):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve_process, args=(hosts, corpus_dir, max_hang, max_drip, child), daemon=True
        )
        self.proc.start()
        ports = self.conn.recv()
        self.hosts = [HostSpec(**{**asdict(h), "port": p}) for h, p in zip(hosts, ports)]
        self.sim = WebSim(self.hosts, [b""])  # for base()/plan_urls() in this process

    def stats(self) -> dict:
        self.conn.send("stats")
        return json.loads(self.conn.recv())

    def reset(self) -> None:
        self.conn.send("reset")
        self.conn.recv()

    def close(self) -> None:
        try:
            self.conn.send("stop")
            self.conn.recv()
        finally:
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.terminate()
