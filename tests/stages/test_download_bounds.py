"""The download worker's per-host tables stay bounded over a pool of many hosts: the DNS cache,
the robots.txt / tdmrep.json caches and the window's host table."""

from __future__ import annotations

from stages.download import DownloadConfig
from stages.download.guard import DnsCache
from stages.download.optout import OriginCache
from stages.download.window import Window


def test_dns_cache_keeps_at_most_max_names(monkeypatch):
    dns = DnsCache(ttl=300, max_names=3)
    monkeypatch.setattr(DnsCache, "_resolve", staticmethod(lambda host, port: ["127.0.0.1"]))
    for i in range(10):
        assert dns.lookup(f"h{i}.test", 80) == ["127.0.0.1"]
    assert list(dns._cache) == ["h7.test", "h8.test", "h9.test"]
    dns.lookup("h7.test", 80)  # a hit: h7 becomes the most recently used, no new lookup
    dns.lookup("h10.test", 80)
    assert list(dns._cache) == ["h9.test", "h7.test", "h10.test"] and dns.lookups == 11


def test_origin_cache_keeps_at_most_max_origins():
    cache = OriginCache(max_origins=2)
    loads = []
    for origin in ["a", "b", "a", "c", "a", "b"]:
        cache.get(origin, lambda o=origin: loads.append(o) or o)
    assert loads == ["a", "b", "c", "b"]  # b was dropped when c came (a was used more recently)


class _NoFetch:
    total_timeout = 1.0


def test_window_drops_idle_hosts(monkeypatch):
    import stages.download.window as window

    monkeypatch.setattr(window, "MAX_HOSTS", 5)
    w = Window(_NoFetch(), DownloadConfig(thread_count=1, max_per_host_scope="worker"))
    try:
        with w.cv:
            for i in range(12):
                h = w.hosts[f"h{i}:80"] = window._Host(f"h{i}:80", cap=6.0, ceiling=6.0)
                if i == 3:
                    h.inflight = 1  # busy hosts stay
                if i == 4:
                    h.ceiling = 2.0  # a host that said 429/503 keeps its lowered ceiling
            w.prune_at = 5
            w._prune()
        assert w.slots is None  # max_per_host_scope: worker: no machine-wide table
        assert sorted(w.hosts) == ["h3:80", "h4:80"]
        assert w.prune_at == 5
    finally:
        w.close()
