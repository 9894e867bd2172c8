"""HTTP transport: one GET through the address guard, with manual redirects, a size cap, a
deadline, the opt-out checks and failure reasons that start with a stable class tag.

Reason tags (first word) of ``download_failed`` rows: ``HTTP`` (``HTTP 404``), ``dns:``,
``connect:``, ``tls:``, ``reset:``, ``ConnectTimeout:``, ``ReadTimeout:``, ``Timeout:`` (the
``total_timeout`` deadline), ``rate_limited:``, ``breaker:``, ``redirect``/``too`` (loops and
chains), ``body``/``Content-Length`` (size cap)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

from schemas import Status
from stages.download.guard import AddressPolicy, BlockedAddress, DnsCache, guarded_pool_manager
from stages.download.optout import RobotsCache, TdmRepCache, is_disallowed, robots_tag_reason, tdm_reserved
from stages.download.urls import InvalidURL, host_key, normalize_url

USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
REDIRECT_CODES = (301, 302, 303, 307, 308)
RETRYABLE_HTTP = (408, 425, 429, 500, 502, 503, 504)
_CHUNK = 256 * 1024
# Failure kinds that count towards a host's breaker (the host does not answer properly).
BREAKER_KINDS = ("timeout", "connect", "dns", "reset")


class DownloadError(Exception):
    """A failed download with a ready-made reason (status ``download_failed``)."""

    def __init__(
        self,
        reason: str,
        retryable: bool = False,
        http_status: int | None = None,
        kind: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.http_status = http_status
        self.kind = kind  # timeout | connect | dns | reset | rate_limit | None
        self.retry_after = retry_after


@dataclass
class Fetched:
    data: bytes | None = None
    http_status: int | None = None
    status: str = Status.OK.value
    reason: str | None = None
    kind: str | None = None  # failure kind (see DownloadError.kind)
    retry_after: float | None = None  # seconds the server asked us to wait (429/503)


def short(e: BaseException) -> str:
    """``ExceptionClass: message`` without urllib3's pool/connection prefixes, on one line."""
    msg = str(e)
    msg = re.sub(r"^\w*\(host=[^)]*\):\s*", "", msg)
    msg = msg.replace("Failed to establish a new connection: ", "")
    msg = re.sub(r"<[\w.]+ object at 0x[0-9a-f]+>:?\s*", "", msg)
    msg = msg.replace("\n", " ").strip()
    name = (
        type(e).__name__.replace("Error", "")
        if type(e).__name__.endswith("TimeoutError")
        else type(e).__name__
    )
    return f"{name}: {msg}"[:200] if msg else name


def network_error(e: BaseException, http_status: int | None = None) -> DownloadError:
    """A urllib3/socket error as a retryable ``DownloadError`` with its class tag."""
    from urllib3.exceptions import NameResolutionError, NewConnectionError, ProtocolError, SSLError
    from urllib3.exceptions import TimeoutError as U3Timeout

    # urllib3's NewConnectionError (and so NameResolutionError) subclasses ConnectTimeoutError
    if isinstance(e, NameResolutionError):
        reason, kind = "dns: " + short(e), "dns"
    elif isinstance(e, NewConnectionError | ConnectionRefusedError):
        reason, kind = "connect: " + short(e), "connect"
    elif isinstance(e, U3Timeout | TimeoutError):
        reason, kind = short(e), "timeout"  # ConnectTimeout: ... / ReadTimeout: ...
    elif isinstance(e, SSLError):
        reason, kind = "tls: " + short(e), None
    elif isinstance(e, ProtocolError | ConnectionError):
        reason, kind = "reset: " + short(e), "reset"
    else:
        reason, kind = short(e), None
    return DownloadError(reason[:200], retryable=True, http_status=http_status, kind=kind)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Fetcher:
    """GET with the address guard, manual redirects, a size cap and a deadline. Thread-safe."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.policy = AddressPolicy(cfg.allow_private_networks, cfg.allowed_networks)
        self.dns = DnsCache(cfg.dns_cache_seconds)
        self.pm = guarded_pool_manager(self.policy, self.dns, cfg.max_per_host)
        ua = USER_AGENT
        token = cfg.user_agent_token.strip().lower() if cfg.user_agent_token else None
        if cfg.user_agent_token:
            ua += f" (compatible; {cfg.user_agent_token}; +https://github.com/rom1504/img2dataset)"
        self.token = token
        self.headers = {"User-Agent": ua, "Accept-Encoding": "identity"}
        self.directives = set(cfg.disallowed_header_directives)
        self.total_timeout = cfg.total_timeout if cfg.total_timeout is not None else 3 * cfg.timeout
        self.robots = RobotsCache(cfg.user_agent_token or "*") if cfg.check_robots_txt else None
        self.tdmrep = TdmRepCache() if cfg.respect_tdm_reservation else None

    def close(self) -> None:
        self.pm.clear()

    def fetch(self, url: Any, deadline: float | None = None) -> Fetched:
        """Fetch one URL; ``deadline`` (monotonic) bounds every attempt together (default: now +
        ``total_timeout``). Retries transient failures up to ``retries`` times, at once; waits for
        ``Retry-After`` are the caller's (``Fetched.retry_after``), so no thread sleeps."""
        try:
            url = normalize_url(url)
        except InvalidURL as e:
            return Fetched(status=Status.INVALID_URL.value, reason=str(e))
        if deadline is None:
            deadline = time.monotonic() + self.total_timeout
        attempt = 0
        while True:
            try:
                why = self._file_optout(url, deadline)
                if why:
                    return Fetched(status=Status.OPTED_OUT.value, reason=why)
                return self._fetch_once(url, deadline)
            except DownloadError as e:
                if e.retryable and e.retry_after is None and attempt < self.cfg.retries:
                    attempt += 1
                    continue
                return Fetched(
                    http_status=e.http_status,
                    status=Status.DOWNLOAD_FAILED.value,
                    reason=e.reason,
                    kind=e.kind,
                    retry_after=e.retry_after,
                )
            except BlockedAddress as e:
                return Fetched(status=Status.BLOCKED_ADDRESS.value, reason=str(e))
            except InvalidURL as e:
                return Fetched(status=Status.INVALID_URL.value, reason=str(e))

    def _file_optout(self, url: str, deadline: float) -> str | None:
        """The opt-out reason from the origin's robots.txt or tdmrep.json, if either is checked."""
        for files in (self.robots, self.tdmrep):
            if files is not None:
                why = files.check(_origin(url), url, lambda u: self._robots_fetch(u, deadline))
                if why:
                    return why
        return None

    def _robots_fetch(self, url: str, deadline: float) -> tuple[int, bytes]:
        got = self._fetch_once(url, deadline, cap=_ROBOTS_CAP, check_optout=False, any_status=True)
        return got.http_status or 0, got.data or b""

    def _fetch_once(
        self, url: str, deadline: float, cap: int | None = None, check_optout: bool = True, any_status=False
    ) -> Fetched:
        from urllib3.exceptions import HTTPError as U3Error
        from urllib3.util import Timeout

        cfg = self.cfg
        seen = {url}
        for hop in range(cfg.max_redirects + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise DownloadError(
                    f"Timeout: not done within total_timeout {self.total_timeout:g}s", True, kind="timeout"
                )
            to = Timeout(connect=min(cfg.timeout, left), read=min(cfg.timeout, left))
            try:
                resp = self._urlopen(url, to, left)
            except (U3Error, OSError) as e:
                raise network_error(e) from None
            code = resp.status
            if code in REDIRECT_CODES:
                location = resp.headers.get("Location")
                _discard(resp)
                if not location:
                    raise DownloadError(f"HTTP {code} without Location", http_status=code)
                if hop == cfg.max_redirects:
                    raise DownloadError(f"too many redirects (>{cfg.max_redirects})", http_status=code)
                try:
                    nxt = normalize_url(urljoin(url, location.encode("latin-1").decode("utf-8", "replace")))
                except InvalidURL as e:
                    raise InvalidURL(f"redirect to bad URL: {e}") from None
                if nxt in seen:
                    raise DownloadError("redirect loop", http_status=code)
                seen.add(nxt)
                url = nxt
                if check_optout:  # robots.txt / tdmrep.json of where the redirect leads
                    why = self._file_optout(url, deadline)
                    if why:
                        return Fetched(http_status=code, status=Status.OPTED_OUT.value, reason=why)
                continue
            reading = False
            try:
                if any_status:
                    reading = True
                    data = self._read_body(resp, deadline, cap)
                    resp.release_conn()
                    return Fetched(data=data, http_status=code)
                if not 200 <= code < 300:  # urllib's rule, as img2dataset sees it
                    raise self._http_error(url, resp)
                if check_optout:
                    why = self._optout(resp)
                    if why:
                        _discard(resp)
                        return Fetched(http_status=code, status=Status.OPTED_OUT.value, reason=why)
                reading = True
                data = self._read_body(resp, deadline, cap)
            except BaseException:
                _discard(resp, drain=not reading)
                raise
            resp.release_conn()
            return Fetched(data=data, http_status=code)
        raise AssertionError("unreachable")  # pragma: no cover

    def _http_error(self, url: str, resp) -> DownloadError:
        code = resp.status
        wait = parse_retry_after(resp.headers.get("Retry-After")) if code in (429, 503) else None
        if code == 429:  # never a plain failure: the reason names the rate limit
            why = f"Retry-After {wait:g}s" if wait is not None else "no Retry-After"
            return DownloadError(
                f"rate_limited: HTTP 429 from {host_key(url)} ({why})",
                retryable=True,
                http_status=code,
                kind="rate_limit",
                retry_after=wait,
            )
        return DownloadError(
            f"HTTP {code}",
            retryable=code in RETRYABLE_HTTP,
            http_status=code,
            kind="rate_limit" if wait is not None else None,
            retry_after=wait,
        )

    def _optout(self, resp) -> str | None:
        if self.directives:
            values = resp.headers.getlist("X-Robots-Tag")
            if values and is_disallowed(values, self.token, self.directives):
                return robots_tag_reason(values)
        if self.cfg.respect_tdm_reservation:
            values = resp.headers.getlist("tdm-reservation")
            if values and tdm_reserved(values):
                return "tdm-reservation: 1 (TDMRep: text and data mining rights reserved)"
        return None

    def _urlopen(self, url: str, timeout, pool_timeout: float):
        from urllib3.exceptions import ProtocolError

        kw = dict(
            headers=self.headers,
            redirect=False,
            retries=False,
            preload_content=False,
            decode_content=False,
            pool_timeout=pool_timeout,
        )
        try:
            return self.pm.urlopen("GET", url, timeout=timeout, **kw)
        except ProtocolError:
            # A kept-alive connection the server closed (or left garbage on) fails before any
            # response; browsers retry that once on a fresh connection, and so do we.
            return self.pm.urlopen("GET", url, timeout=timeout, **kw)

    def _read_body(self, resp, deadline: float, cap: int | None = None) -> bytes:
        from urllib3.exceptions import HTTPError as U3Error

        cap = cap or self.cfg.max_response_bytes
        length = resp.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > cap:
            raise DownloadError(
                f"Content-Length {int(length)} over max_response_bytes {cap}", http_status=resp.status
            )
        buf = bytearray()
        sock = getattr(getattr(resp, "connection", None), "sock", None)
        floor, began = self.cfg.min_body_rate, time.monotonic()
        try:
            while True:
                spent = time.monotonic() - began
                if floor and spent > self.cfg.timeout and len(buf) < floor * spent:
                    raise DownloadError(
                        f"Timeout: body slower than min_body_rate {floor:g} B/s ({len(buf)} bytes in {spent:.0f}s)",
                        retryable=True,
                        http_status=resp.status,
                        kind="timeout",
                    )
                left = deadline - time.monotonic()
                if sock is not None and left > 0:  # a read never outlives the deadline
                    sock.settimeout(min(self.cfg.timeout, left + 0.05))
                chunk = resp.read1(_CHUNK)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > cap:
                    raise DownloadError(f"body over max_response_bytes {cap}", http_status=resp.status)
                if time.monotonic() > deadline:
                    raise DownloadError(
                        f"Timeout: body not complete within total_timeout {self.total_timeout:g}s",
                        retryable=True,
                        http_status=resp.status,
                        kind="timeout",
                    )
        except (U3Error, OSError) as e:
            if time.monotonic() >= deadline:
                raise DownloadError(
                    f"Timeout: body not complete within total_timeout {self.total_timeout:g}s",
                    retryable=True,
                    http_status=resp.status,
                    kind="timeout",
                ) from None
            raise network_error(e, resp.status) from None
        return bytes(buf)


_ROBOTS_CAP = 512 * 1024


def _origin(url: str) -> str:
    scheme = url.split(":", 1)[0]
    key = host_key(url)
    default = ":443" if scheme == "https" else ":80"
    return f"{scheme}://{key[: -len(default)] if key.endswith(default) else key}"


def _discard(resp, drain: bool = True) -> None:
    """Free a response we do not read: drain a small body (at most 1 s) to keep the connection,
    else drop the connection (always after a failed body read: never wait on a slow body)."""
    try:
        length = resp.headers.get("Content-Length")
        small = length is not None and length.strip().isdigit() and int(length) <= 65536
        if drain and small:
            sock = getattr(getattr(resp, "connection", None), "sock", None)
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                if sock is not None:
                    sock.settimeout(max(0.01, end - time.monotonic()))
                if not resp.read1(65536):
                    resp.release_conn()
                    return
        resp.close()
        resp.release_conn()
    except Exception:  # noqa: BLE001 - best effort; the connection is dropped anyway
        try:
            resp.close()
            resp.release_conn()
        except Exception:  # noqa: BLE001
            pass
