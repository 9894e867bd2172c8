"""Opt-out signals: X-Robots-Tag (img2dataset's rule, on by default), robots.txt per host and
the TDM Reservation Protocol (the ``tdm-reservation`` header and the origin's
``/.well-known/tdmrep.json``; both off by default, as in img2dataset). robots.txt and
tdmrep.json are checked for the URL and for every redirect target.

Each has its own reason tag: ``X-Robots-Tag: ...``, ``robots.txt: ...``, ``tdm-reservation: ...``
(status ``opted_out``)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit
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


class OriginCache:
    """A file fetched once per origin (scheme://host:port) and kept ``ttl`` seconds, for at most
    ``max_origins`` origins (the least recently used go first), so a worker's memory stays bounded
    however many hosts a pool names. One fetch per origin at a time: the origin's other requests
    wait for it."""

    def __init__(self, ttl: float = 24 * 3600, max_origins: int = 20_000):
        self.ttl = ttl
        self.max_origins = max_origins
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, list] = OrderedDict()  # origin -> [expiry, value, lock]

    def get(self, origin: str, load: Callable[[], Any]) -> Any:
        with self._lock:
            entry = self._entries.get(origin)
            if entry is None:
                entry = self._entries[origin] = [0.0, None, threading.Lock()]
                while len(self._entries) > self.max_origins:
                    self._entries.popitem(last=False)
            self._entries.move_to_end(origin)
        with entry[2]:
            if entry[0] <= time.monotonic():
                entry[1] = load()
                entry[0] = time.monotonic() + self.ttl
            return entry[1]


class RobotsCache:
    """robots.txt of each host, fetched once per worker (through the same guard, limits and
    per-host slot as the images) and kept ``ttl`` seconds.

    RFC 9309: a 4xx (or a body that is not a robots.txt) allows everything; a 5xx disallows
    everything. A robots.txt that cannot be fetched at all (timeout, refused) fails the image
    with that network reason, so a dead host reads as dead, not as opted out."""

    def __init__(self, agent: str, ttl: float = 24 * 3600):
        self.agent = agent
        self.cache = OriginCache(ttl)

    def check(self, origin: str, url: str, fetch: Callable[[str], tuple[int, bytes]]) -> str | None:
        """``None`` if ``url`` may be fetched, else the opt-out reason. ``fetch(robots_url)``
        returns (HTTP status, body) or raises the fetch error."""
        rules = self.cache.get(origin, lambda: self._load(origin, fetch))
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


TDMREP_PATH = "/.well-known/tdmrep.json"


class TdmRepCache:
    """TDMRep's well-known file (``/.well-known/tdmrep.json``) of each origin, fetched once per
    worker like robots.txt: a JSON array of ``{"location": pattern, "tdm-reservation": 0|1,
    "tdm-policy": url}``; the first rule whose ``location`` matches the URL's path applies
    (``*`` matches any run of characters, a trailing ``$`` anchors the end, as in robots.txt).
    A missing, unreadable or malformed file, or one that cannot be fetched, reserves nothing
    (the per-response ``tdm-reservation`` header is still honoured)."""

    def __init__(self, ttl: float = 24 * 3600):
        self.cache = OriginCache(ttl)

    def check(self, origin: str, url: str, fetch: Callable[[str], tuple[int, bytes]]) -> str | None:
        rules = self.cache.get(origin, lambda: self._load(origin, fetch))
        path = urlsplit(url).path or "/"
        query = urlsplit(url).query
        target = path + ("?" + query if query else "")
        for pattern, reserved, location in rules:
            if pattern.match(target):
                if reserved:
                    return f"tdm-reservation: {origin}{TDMREP_PATH} reserves TDM rights for {location!r}"[:300]
                return None
        return None

    @staticmethod
    def _load(origin: str, fetch) -> list[tuple[re.Pattern, bool, str]]:
        try:
            code, body = fetch(origin + TDMREP_PATH)
        except Exception:  # noqa: BLE001 - no file we can read: no reservation from it
            return []
        if not 200 <= code < 300:
            return []
        try:
            doc = json.loads(body.decode("utf-8", "replace"))
        except ValueError:
            return []
        rules = []
        for rule in doc if isinstance(doc, list) else []:
            if not isinstance(rule, dict) or not isinstance(rule.get("location"), str):
                continue
            location = rule["location"]
            rules.append((_location_pattern(location), str(rule.get("tdm-reservation")) == "1", location))
        return rules


def _location_pattern(location: str) -> re.Pattern:
    end = location.endswith("$")
    body = re.escape(location[:-1] if end else location).replace(r"\*", ".*")
    if not body.startswith("/") and not body.startswith(".*"):
        body = "/" + body
    return re.compile(body + ("$" if end else ""), re.DOTALL)
