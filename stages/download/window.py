"""The download window: a worker's persistent pool of fetch threads, fed per host.

One ``Window`` lives per worker (it outlives shards: its DNS cache, keep-alive connections,
host breakers and robots.txt cache carry over). A shard (``Session``) hands it all its URLs at
once; threads take the next URL whose host has room, so a slow URL holds up only its own thread
and never the rows behind it, and up to ``thread_count`` requests stay in flight across
micro-batch boundaries. Rules, all per host (``host:port``):

* at most ``max_per_host`` requests in flight from the whole machine (``hostslots``: the download
  workers of a machine share each host's slots; ``max_per_host_scope: worker`` caps each worker
  alone); the connection pool holds as many keep-alive connections per worker, so a redirect to
  another host is capped there too (per worker). A 429 or 503 lowers the
  host's cap below the number of requests it had in flight then (regrowing by one per
  ``REGROW`` quiet seconds, so a host that refused once early is not held to one request for
  the rest of the run);
* a 429/503 with ``Retry-After`` pauses the host; the URL is fetched again after the wait if the
  wait is at most ``max_retry_after`` and ends before the URL's ``total_timeout`` deadline (up to
  3 waits), else it ends ``rate_limited: ...``. No thread sleeps through a wait;
* a breaker: after ``breaker_threshold`` consecutive timeouts, refusals, resets or DNS failures,
  the host's waiting URLs fail at once (``breaker: ...``); after ``breaker_cooldown`` seconds one
  URL probes the host and a success closes the breaker.

Fetched bodies wait for the decoder in a bounded buffer (2 x ``thread_count``), so memory stays
bounded whatever the shard size.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from schemas import Status
from stages.download.hostslots import HostSlots
from stages.download.http import BREAKER_KINDS, Fetched, Fetcher
from stages.download.urls import InvalidURL, host_key, normalize_url

MAX_RATE_WAITS = 3
SLOT_POLL = 0.05  # seconds before a host whose machine-wide slots are all taken is looked at again
MAX_HOSTS = 50_000  # hosts kept in a window's table before idle ones are dropped
REGROW = 2.0  # quiet seconds (no 429/503) after which a lowered host ceiling grows back by one


@dataclass
class _Job:
    pos: int
    url: str
    host: str
    seq: int
    session: Session
    deadline: float | None = None
    rate_waits: int = 0
    probe: bool = False


@dataclass
class _Host:
    key: str
    inflight: int = 0
    pending: deque = field(default_factory=deque)
    queued: bool = False  # in the ready or delayed heap
    not_before: float = 0.0
    fails: int = 0  # consecutive breaker-kind failures
    last_failure: str = ""
    open_until: float | None = None  # breaker open (None: closed)
    probing: bool = False
    cap: float = 0.0  # current cap, at most ceiling; regrows by one per cap successes
    ceiling: float = 0.0  # max_per_host, lowered below the concurrency at which the host said 429/503
    lowered_at: float = 0.0  # when the ceiling last moved (it regrows by one per REGROW quiet seconds)


class Session:
    """One shard's URLs in the window. ``get()`` returns ``(position, Fetched)`` in completion order."""

    def __init__(self, window: Window, urls: list):
        self.window = window
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.lock = threading.Lock()
        self.outstanding = 0
        jobs = []
        for pos, url in enumerate(urls):
            try:
                norm = normalize_url(url)
            except InvalidURL as e:
                self.q.put((pos, Fetched(status=Status.INVALID_URL.value, reason=str(e)), False))
                self.outstanding += 1
                continue
            jobs.append((pos, norm))
        self.outstanding += len(jobs)
        window.submit(self, jobs)

    def get(self) -> tuple[int, Fetched]:
        pos, got, permit = self.q.get()
        self.outstanding -= 1
        if permit:
            self.window.room.release()
        return pos, got

    def deliver(self, pos: int, got: Fetched) -> None:
        """A worker's result (it holds one ``room`` permit, released by ``get`` or here)."""
        with self.lock:
            if not self.cancelled:
                self.q.put((pos, got, True))
                return
        self.window.room.release()

    def cancel(self) -> None:
        """Drop the URLs not started yet; results still arriving are discarded."""
        with self.lock:
            self.cancelled = True
        self.window.forget(self)
        while True:
            try:
                _, _, permit = self.q.get_nowait()
            except queue.Empty:
                break
            if permit:
                self.window.room.release()


class Window:
    def __init__(self, fetcher: Fetcher, cfg):
        self.fetcher = fetcher
        self.cfg = cfg
        self.cap = cfg.max_per_host
        self.slots = HostSlots.for_process() if cfg.max_per_host_scope == "machine" else None
        self.cv = threading.Condition()
        self.hosts: dict[str, _Host] = {}
        self.ready: list[tuple[int, str]] = []  # (seq of the host's first waiting URL, host)
        self.delayed: list[tuple[float, str]] = []  # (not before, host)
        self.room = threading.Semaphore(2 * cfg.thread_count)
        self.seq = itertools.count()
        self.prune_at = MAX_HOSTS
        self.stopped = False
        self.threads = [
            threading.Thread(target=self._work, name=f"download-{i}", daemon=True)
            for i in range(cfg.thread_count)
        ]
        for t in self.threads:
            t.start()

    # ---- feeding -------------------------------------------------------------------------
    def submit(self, session: Session, jobs: list[tuple[int, str]]) -> None:
        with self.cv:
            for pos, url in jobs:
                key = host_key(url)
                h = self.hosts.get(key)
                if h is None:
                    if len(self.hosts) >= self.prune_at:
                        self._prune()
                    h = self.hosts[key] = _Host(key, cap=float(self.cap), ceiling=float(self.cap))
                h.pending.append(_Job(pos, url, key, next(self.seq), session))
                self._queue(h)
            self.cv.notify(min(len(jobs), len(self.threads)))

    def _prune(self) -> None:
        """Drop hosts with nothing waiting, in flight, paused, open or lowered (caller holds the
        lock), so the table stays bounded over a pool of millions of hosts; a dropped host that
        comes back starts afresh, as a new one."""
        now = time.monotonic()
        idle = [
            k
            for k, h in self.hosts.items()
            if not (h.pending or h.inflight or h.queued or h.probing or h.fails)
            and h.not_before <= now
            and h.open_until is None
            and h.ceiling >= self.cap
        ]
        for k in idle:
            del self.hosts[k]
        self.prune_at = max(MAX_HOSTS, 2 * len(self.hosts))

    def forget(self, session: Session) -> None:
        with self.cv:
            for h in self.hosts.values():
                if h.pending:
                    h.pending = deque(j for j in h.pending if j.session is not session)

    def close(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
        for _ in self.threads:
            self.room.release()

    def _queue(self, h: _Host) -> None:
        """Put ``h`` in a heap if it has waiting URLs and room (caller holds the lock)."""
        if h.queued or not h.pending or h.inflight >= int(h.cap) or h.probing:
            return
        h.queued = True
        if h.not_before > time.monotonic():
            heapq.heappush(self.delayed, (h.not_before, h.key))
        else:
            heapq.heappush(self.ready, (h.pending[0].seq, h.key))

    def _next(self) -> tuple[_Job, bool] | None:
        """The next job and whether to fetch it (False: fail it now, its host's breaker is open)."""
        with self.cv:
            while not self.stopped:
                now = time.monotonic()
                while self.delayed and self.delayed[0][0] <= now:
                    _, key = heapq.heappop(self.delayed)
                    h = self.hosts[key]
                    h.queued = False
                    self._queue(h)
                while self.ready:
                    _, key = heapq.heappop(self.ready)
                    h = self.hosts[key]
                    h.queued = False
                    if not h.pending or h.inflight >= int(h.cap) or h.probing:
                        continue
                    if h.not_before > now:
                        self._queue(h)
                        continue
                    job = h.pending.popleft()
                    if h.open_until is not None and now < h.open_until:
                        self._queue(h)
                        if self.ready:
                            self.cv.notify()
                        return job, False
                    if self.slots is not None and not self.slots.try_take(h.key, self.cap):
                        h.pending.appendleft(job)  # the machine's slots for this host are in use
                        h.not_before = max(h.not_before, now + SLOT_POLL)
                        self._queue(h)
                        continue
                    if h.open_until is not None:
                        h.probing = job.probe = True  # half-open: this one URL probes the host
                    h.inflight += 1
                    if job.deadline is None:
                        job.deadline = now + self.fetcher.total_timeout
                    self._queue(h)
                    if self.ready:
                        self.cv.notify()  # wake one more thread for the next ready host
                    return job, True
                self.cv.wait(self.delayed[0][0] - now if self.delayed else None)
        return None

    # ---- the threads ---------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            self.room.acquire()
            nxt = self._next()
            if nxt is None:
                return
            job, fetch = nxt
            try:
                got = self._run(job, fetch)
            except Exception as e:  # noqa: BLE001 - never lose a row: a bug here is this row's failure
                from stages.download.http import short

                got = Fetched(status=Status.DOWNLOAD_FAILED.value, reason=short(e))
            if got is None:
                self.room.release()  # waiting for Retry-After
            else:
                job.session.deliver(job.pos, got)

    def _run(self, job: _Job, fetch: bool) -> Fetched | None:
        if job.session.cancelled:
            self._done(job, None, fetch)
            return Fetched(status=Status.DOWNLOAD_FAILED.value, reason="cancelled")
        if not fetch:
            h = self.hosts[job.host]
            return Fetched(
                status=Status.DOWNLOAD_FAILED.value,
                reason=f"breaker: host {job.host} not tried after {h.fails} consecutive failures "
                f"(last: {h.last_failure})"[:300],
            )
        try:
            got = self.fetcher.fetch(job.url, job.deadline)
        except Exception as e:  # noqa: BLE001 - a bug is this row's failure, not the worker's
            from stages.download.http import short

            got = Fetched(status=Status.DOWNLOAD_FAILED.value, reason=short(e))
        return self._done(job, got, fetch)

    def _done(self, job: _Job, got: Fetched | None, fetched: bool) -> Fetched | None:
        """Host bookkeeping after a job; returns the result, or None if the job was requeued."""
        cfg = self.cfg
        with self.cv:
            h = self.hosts[job.host]
            now = time.monotonic()
            if fetched:
                h.inflight -= 1
                if self.slots is not None:
                    self.slots.give(job.host)
            if job.probe:
                h.probing = job.probe = False
            if got is not None and fetched:
                if got.kind in BREAKER_KINDS:
                    h.fails += 1
                    h.last_failure = got.reason or ""
                    if h.fails >= cfg.breaker_threshold and cfg.breaker_threshold > 0:
                        h.open_until = now + cfg.breaker_cooldown
                elif got.status != Status.INVALID_URL.value:
                    h.fails, h.open_until = 0, None  # the host answered
                if got.http_status in (429, 503):  # overloaded at h.inflight + 1 requests: stay below
                    h.ceiling = max(1.0, min(h.ceiling, float(h.inflight)))
                    h.cap, h.lowered_at = min(h.cap, h.ceiling), now
                elif got.http_status is not None and got.http_status < 400:
                    if h.ceiling < self.cap and now - h.lowered_at > REGROW:
                        h.ceiling, h.lowered_at = h.ceiling + 1, now
                    h.cap = min(h.ceiling, h.cap + 1 / h.cap)
                if got.retry_after is not None:
                    wait = got.retry_after
                    h.not_before = max(h.not_before, now + min(wait, cfg.max_retry_after))
                    if (
                        wait <= cfg.max_retry_after
                        and job.rate_waits < MAX_RATE_WAITS
                        and now + wait < job.deadline
                        and not job.session.cancelled
                    ):
                        job.rate_waits += 1
                        h.pending.appendleft(job)
                        self._queue(h)
                        self.cv.notify()
                        return None
                    if got.reason and got.reason.startswith("rate_limited"):
                        why = (
                            f"over max_retry_after {cfg.max_retry_after:g}s"
                            if wait > cfg.max_retry_after
                            else f"after {job.rate_waits} waits"
                            if job.rate_waits >= MAX_RATE_WAITS
                            else "past total_timeout"
                        )
                        got.reason = f"{got.reason[:-1]}, {why})"
            self._queue(h)
            self.cv.notify()
        return got
