"""Opt-out signals: X-Robots-Tag (img2dataset's rule, on by default), robots.txt per host and
the TDM Reservation Protocol's ``tdm-reservation`` header (both off by default, as in img2dataset).

Each has its own reason tag: ``X-Robots-Tag: ...``, ``robots.txt: ...``, ``tdm-reservation: ...``
(status ``opted_out``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from urllib.robotparser import RobotFileParser

ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309: crawlers must parse at least 500 KiB


def is_disallowed(values: list[str], user_agent_token: str | None, directives: set[str]) -> bool:
    """img2dataset's X-Robots-Tag rule: a value ``"d1, d2"`` applies to every agent, ``"agent: d1"``
    only to ``user_agent_token``; any listed directive opts the image out."""
    for value in values:
        parts = value.split(":", 1)
        found = {x.strip().lower() for x in parts[-1].split(",")}
        agent = parts[0].strip().lower() if len(parts) == 2 else None
        if (agent is None or agent == user_agent_token) and found & directives:
            return True
    return False


def robots_tag_reason(values: list[str]) -> str:
    return "X-Robots-Tag: " + "; ".join(values)[:120]


def tdm_reserved(values: list[str]) -> bool:
    """TDMRep (W3C community group): ``tdm-reservation: 1`` reserves text and data mining rights."""
    return any(v.strip() == "1" for v in values)


class RobotsCache:
    """robots.txt of each host, fetched once per worker (through the same guard, limits and
    per-host slot as the images) and kept ``ttl`` seconds.

    RFC 9309: a 4xx (or a body that is not a robots.txt) allows everything; a 5xx disallows
    everything. A robots.txt that cannot be fetched at all (timeout, refused) fails the image
    with that network reason, so a dead host reads as dead, not as opted out."""

    def __init__(self, agent: str, ttl: float = 24 * 3600):
        self.agent = agent
        self.ttl = ttl
        self._lock = threading.Lock()
        self._host_locks: dict[str, threading.Lock] = {}
        self._rules: dict[str, tuple[float, RobotFileParser | str]] = {}

    def check(self, origin: str, url: str, fetch: Callable[[str], tuple[int, bytes]]) -> str | None:
        """``None`` if ``url`` may be fetched, else the opt-out reason. ``fetch(robots_url)``
        returns (HTTP status, body) or raises the fetch error."""
        with self._lock:
            lock = self._host_locks.setdefault(origin, threading.Lock())
        with lock:  # one fetch per host; the host's other requests wait for it
            hit = self._rules.get(origin)
            if hit is None or hit[0] <= time.monotonic():
                hit = (time.monotonic() + self.ttl, self._load(origin, fetch))
                self._rules[origin] = hit
        rules = hit[1]
        if isinstance(rules, str):
            return rules
        if rules.can_fetch(self.agent, url):
            return None
        return f"robots.txt: {origin}/robots.txt disallows this path for {self.agent!r}"

    @staticmethod
    def _load(origin: str, fetch) -> RobotFileParser | str:
        code, body = fetch(origin + "/robots.txt")
        rp = RobotFileParser()
        if code >= 500:
            return f"robots.txt: {origin}/robots.txt answered HTTP {code} (RFC 9309: assume disallowed)"
        if 200 <= code < 300:
            rp.parse(body.decode("utf-8", "replace").splitlines())
        else:
            rp.parse([])  # 4xx: no robots.txt, everything allowed
        return rp
