"""The address guard: which IP addresses a download may dial, a per-worker DNS cache, and the
guarded urllib3 connections that check every address they actually dial (first request and
every redirect, cached or fresh DNS answer alike: a name that once resolved to an allowed
address and later resolves to 169.254.169.254 is refused on that dial).

Test hooks (process-wide, plain functions, no config key; ``None`` restores the default):

* ``set_resolver(fn)``: ``fn(host) -> list of IP strings`` replaces ``socket.getaddrinfo`` for
  every download in this process (tests and ``bench/`` map virtual host names to 127.0.0.1 with
  it). Raise ``OSError`` for a name that does not resolve.
* ``set_dial_hook(fn)``: ``fn(ip, port)`` is called just before each ``connect()`` the guard
  allows, so a test can prove an address was never dialled.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

Resolver = Callable[[str], list[str]]

_resolver: Resolver | None = None
_dial_hook: Callable[[str, int], None] | None = None

# Refused even with allow_private_networks: true unless listed in allowed_networks.
_ALWAYS_REFUSED = ("link-local", "multicast", "unspecified", "reserved")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


def set_resolver(fn: Resolver | None) -> None:
    global _resolver
    _resolver = fn


def set_dial_hook(fn: Callable[[str, int], None] | None) -> None:
    global _dial_hook
    _dial_hook = fn


class BlockedAddress(Exception):
    """The host resolves to an address the guard refuses (status ``blocked_address``).

    Not an ``OSError`` on purpose: urllib3 lets it through unwrapped and never retries it."""


class AddressPolicy:
    """Which IP addresses a connection may dial.

    Public unicast addresses always; ``allowed_networks`` always (the only way to open
    link-local, multicast, reserved or unspecified addresses); ``allow_private`` opens private
    and loopback ranges, nothing else (cloud metadata at 169.254.169.254 stays refused)."""

    def __init__(self, allow_private: bool, allowed_networks: list[str]):
        self.allow_private = allow_private
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def refusal(self, ip: str) -> str | None:
        """``None`` if ``ip`` may be dialled, else the reason it may not."""
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
        if any(addr in net for net in self.allowed):
            return None
        inner = embedded_ipv4(addr)
        if inner is not None:
            if addr.ipv4_mapped is not None and any(inner in net for net in self.allowed):
                return None
            if addr.ipv4_mapped is not None or address_kind(inner) is not None:
                addr = inner  # judged by the IPv4 address it carries (mapped, 6to4, NAT64, Teredo)
        kind = address_kind(addr)
        if kind is None:
            return None
        if self.allow_private and kind in ("loopback", "private"):
            return None
        return f"{kind} address {addr} refused"


# Not public, though this Python's tables may call them global: IETF protocol assignments and the
# deprecated IPv6 site-local range (still routed on some old internal networks).
_NOT_PUBLIC = (ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("fec0::/10"))
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def embedded_ipv4(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (IPv4-mapped, 6to4, NAT64, Teredo server), else None."""
    if addr.version != 6:
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if any(addr in net for net in _NAT64):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.teredo is not None:
        return addr.teredo[1]
    return None


def address_kind(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``addr`` is not a public unicast address, or ``None`` if it is one. Python's
    ``is_private`` also covers link-local, reserved and 0.0.0.0/8; those are named first."""
    for kind, flag in (
        ("loopback", addr.is_loopback),
        ("link-local", addr.is_link_local),
        ("multicast", addr.is_multicast),
        ("unspecified", addr.is_unspecified or (addr.version == 4 and addr in _THIS_NETWORK)),
        ("reserved", addr.is_reserved),
        ("private", addr.is_private),
    ):
        if flag:
            return kind
    if any(addr.version == net.version and addr in net for net in _NOT_PUBLIC):
        return "non-public"
    return None if addr.is_global else "non-public"


class DnsCache:
    """Per-worker DNS cache (answers for ``ttl`` seconds, failures for at most 30 s). It only saves
    lookups: the policy is checked on every dial, whatever the cache returned."""

    def __init__(self, ttl: float, max_names: int = 100_000):
        self.ttl = ttl
        self.max_names = max_names  # least recently used names go first
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[float, list[str] | OSError]] = OrderedDict()
        self.lookups = 0

    def lookup(self, host: str, port: int) -> list[str]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(host)
            if hit is not None:
                self._cache.move_to_end(host)
        if hit is None or hit[0] <= now:
            try:
                got: list[str] | OSError = self._resolve(host, port)
            except OSError as e:
                got = e
            ttl = self.ttl if not isinstance(got, OSError) else min(self.ttl, 30.0)  # failures: 30 s at most
            with self._lock:
                self.lookups += 1
                if ttl > 0:
                    self._cache[host] = (now + ttl, got)
                    self._cache.move_to_end(host)
                    while len(self._cache) > self.max_names:
                        self._cache.popitem(last=False)
        else:
            got = hit[1]
        if isinstance(got, OSError):
            raise got
        return got

    @staticmethod
    def _resolve(host: str, port: int) -> list[str]:
        if _resolver is not None:
            return list(_resolver(host))
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        return list(dict.fromkeys(info[4][0] for info in infos))


def guarded_pool_manager(policy: AddressPolicy, dns: DnsCache, per_host: int):
    """A urllib3 PoolManager whose connections check every address before dialling it; one pool
    per host of at most ``per_host`` connections, kept alive and reused."""
    import urllib3
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

    def new_conn(self) -> socket.socket:
        host = self._dns_host
        try:
            ips = dns.lookup(host, self.port)
        except OSError as e:
            raise NameResolutionError(self.host, self, socket.gaierror(str(e))) from e
        for ip in ips:  # refuse if any address is refused: no mixed public/private answers
            why = policy.refusal(ip)
            if why:
                raise BlockedAddress(why)
        err: Exception | None = None
        for ip in ips:
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                for opt in self.socket_options or ():
                    sock.setsockopt(*opt)
                sock.settimeout(self.timeout)
                if _dial_hook is not None:
                    _dial_hook(ip, self.port)
                sock.connect((ip, self.port))
                return sock
            except TimeoutError as e:
                sock.close()
                err = ConnectTimeoutError(self, f"Connection to {self.host} timed out")
                err.__cause__ = e
            except OSError as e:
                sock.close()
                err = NewConnectionError(self, f"Failed to establish a new connection: {e}")
        raise err or NewConnectionError(self, "no address to connect to")

    http_conn = type("GuardedHTTPConnection", (HTTPConnection,), {"_new_conn": new_conn})
    https_conn = type("GuardedHTTPSConnection", (HTTPSConnection,), {"_new_conn": new_conn})
    pools = {
        "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }
    pm = urllib3.PoolManager(num_pools=4096, maxsize=per_host, block=True, retries=False)
    pm.pool_classes_by_scheme = pools
    return pm
