"""The download stage on a small simulated web (``tests/websim.py``, 127.0.0.1 only): per-host caps,
Retry-After, dead and dripping hosts, the breaker, failure classes, robots.txt and TDM opt-outs, and
the address guard with the DNS cache on. Every assertion is on statuses, reasons and what the
server or the guard recorded, never on a duration.

Host names ``*.websim.test`` reach the simulator through the stage's resolver hook
(``stages.download.set_resolver``); dials are recorded by its dial hook (``set_dial_hook``)."""

from __future__ import annotations

import ipaddress
import re
import time

import pyarrow as pa
import pytest

from schemas import Status
from stages.download import set_dial_hook, set_resolver
from tests.badserver import make_jpeg, serve_bad
from tests.conftest import run_download
from tests.websim import HostSpec, WebSim, plan_urls

LOOPBACK = ["127.0.0.0/8"]
IMAGES = [make_jpeg(320, 240, seed=i) for i in range(3)]
FAST = dict(latency=0.005, sigma=0.5)
# first word of the reason of every non-ok row the download stage sets
TAGS = {
    "HTTP", "ReadTimeout:", "ConnectTimeout:", "Timeout:", "dns:", "connect:", "reset:", "tls:",
    "rate_limited:", "breaker:", "redirect", "too", "body", "Content-Length", "X-Robots-Tag:",
    "robots.txt:", "tdm-reservation:",
}  # fmt: skip


@pytest.fixture()
def dials():
    """Names under .websim.test resolve to 127.0.0.1; every dial the guard allows is recorded."""
    seen: list[tuple[str, int]] = []

    def resolve(host: str) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        if host.endswith(".websim.test"):
            return ["127.0.0.1"]
        raise OSError(f"no such host {host}")  # tests never resolve real names

    set_resolver(resolve)
    set_dial_hook(lambda ip, port: seen.append((ip, port)))
    yield seen
    set_resolver(None)
    set_dial_hook(None)


def run(urls, **cfg) -> pa.Table:
    cfg.setdefault("timeout", 2)
    cfg.setdefault("thread_count", 16)
    cfg.setdefault("allowed_networks", LOOPBACK)
    return run_download(urls, **cfg)


def test_per_host_cap_holds_across_micro_batches(dials):
    hosts = [HostSpec("tight", limit=3, **FAST), HostSpec("wide", limit=50, **FAST)]
    with WebSim(hosts, IMAGES) as sim:
        urls = [sim.url("tight", f"/img/{i}.jpg", names=True) for i in range(40)]
        urls += [sim.url("wide", f"/img/{i}.jpg", names=True) for i in range(40)]
        out = run(urls, max_per_host=3, thread_count=32, batch_size=7)
        st = sim.stats()["hosts"]
    assert out.column("status").to_pylist() == ["ok"] * 80, set(out.column("reason").to_pylist())
    assert st["tight"]["peak"] <= 3 and st["tight"]["over_limit"] == 0
    assert st["wide"]["peak"] <= 3
    assert st["tight"]["requests"] == 40  # nothing was refused and fetched twice


def test_retry_after_is_honoured(dials):
    with WebSim([HostSpec("rl", first_429=True, retry_after=1, **FAST)], IMAGES) as sim:
        urls = [sim.url("rl", f"/img/{i}.jpg", names=True) for i in range(4)]
        out = run(urls)
        paths = sim.stats()["paths"]
    assert out.column("status").to_pylist() == ["ok"] * 4
    assert out.column("http_status").to_pylist() == [200] * 4
    for i in range(4):
        (t429, first, _), (t_ok, second, _) = paths[f"rl /img/{i}.jpg"]
        assert (first, second) == ("429", "done")
        assert t_ok - t429 >= 1.0  # the server saw the wait it asked for


def test_retry_after_over_the_bound_ends_rate_limited(dials):
    with WebSim([HostSpec("rl", first_429=True, retry_after=60, **FAST)], IMAGES) as sim:
        out = run([sim.url("rl", "/img/1.jpg", names=True)], max_retry_after=5)
        assert sim.stats()["hosts"]["rl"]["requests"] == 1
    assert out.column("status").to_pylist() == ["download_failed"]
    reason = out.column("reason")[0].as_py()
    assert (
        reason.startswith("rate_limited: HTTP 429 from rl.websim.test:")
        and "over max_retry_after 5s" in reason
    )
    assert out.column("http_status").to_pylist() == [429]


def test_a_host_that_drips_forever_costs_at_most_total_timeout(dials):
    hosts = [HostSpec("drip", drip_interval=0.2, **FAST), HostSpec("ok", **FAST)]
    with WebSim(hosts, IMAGES, max_drip=120) as sim:
        urls = [sim.url("drip", "/drip/1.jpg", names=True)] + [
            sim.url("ok", f"/img/{i}.jpg") for i in range(10)
        ]
        out = run(urls, timeout=2, total_timeout=3, batch_size=2)
        for _ in range(50):  # the server notices the client's hang-up
            if sim.stats()["paths"]["drip /drip/1.jpg"][0][1] != "started":
                break
            time.sleep(0.1)
        drip = sim.stats()["paths"]["drip /drip/1.jpg"]
    assert out.column("status").to_pylist() == ["download_failed"] + ["ok"] * 10
    assert out.column("reason")[0].as_py() == "Timeout: body not complete within total_timeout 3s"
    assert [d[1] for d in drip] == ["aborted"]  # one request, dropped by us long before its 120 s drip ended


def test_min_body_rate_cuts_a_drip_short(dials):
    with WebSim([HostSpec("drip", drip_interval=0.2, **FAST)], IMAGES, max_drip=120) as sim:
        out = run(
            [sim.url("drip", "/drip/1.jpg", names=True)], timeout=1, total_timeout=60, min_body_rate=1000
        )
    assert out.column("reason")[0].as_py().startswith("Timeout: body slower than min_body_rate 1000 B/s (")


def test_no_head_of_line_blocking_across_micro_batches(dials):
    """A URL that hangs in the first micro-batch does not hold back the rows behind it: the server
    received every other request while the hanging one was still open."""
    with WebSim([HostSpec("a", limit=50, **FAST)], IMAGES, max_hang=60) as sim:
        urls = [sim.url("a", "/hang/1", names=True)] + [
            sim.url("a", f"/img/{i}.jpg", names=True) for i in range(12)
        ]
        out = run(urls, timeout=8, batch_size=2, thread_count=4, max_per_host=4)
        paths = sim.stats()["paths"]
    assert out.column("status").to_pylist() == ["download_failed"] + ["ok"] * 12
    assert out.column("reason")[0].as_py().startswith("ReadTimeout:")
    assert paths["a /hang/1"][0][1] == "aborted"
    hang_end = paths["a /hang/1"][0][2]
    # all 12 images were requested (and served) through the other slots while the hang was open
    assert all(paths[f"a /img/{i}.jpg"][0][2] < hang_end for i in range(12))


def test_dead_host_trips_the_breaker(dials):
    hosts = [HostSpec("dead", kind="dead"), HostSpec("ok", **FAST)]
    with WebSim(hosts, IMAGES, max_hang=30) as sim:
        urls = [sim.url("dead", f"/img/{i}.jpg", names=True) for i in range(20)]
        urls += [sim.url("ok", f"/img/{i}.jpg", names=True) for i in range(5)]
        out = run(urls, timeout=1, max_per_host=2, breaker_threshold=3, breaker_cooldown=600)
        connections = sim.stats()["hosts"]["dead"]["requests"]
    reasons = out.column("reason").to_pylist()
    assert out.column("status").to_pylist()[20:] == ["ok"] * 5
    timeouts = [r for r in reasons[:20] if r.startswith("ReadTimeout:")]
    tripped = [r for r in reasons[:20] if r.startswith("breaker: host dead.websim.test:")]
    assert len(timeouts) + len(tripped) == 20
    assert 3 <= len(timeouts) <= 4 and connections == len(timeouts)  # threshold + what was in flight
    assert re.search(r"not tried after [34] consecutive failures \(last: ReadTimeout", tripped[0])


def test_every_row_ends_with_a_status_and_a_failure_class(dials):
    hosts = [HostSpec(f"h{i}", **FAST) for i in range(4)]
    hosts += [HostSpec("dead", kind="dead"), HostSpec("refused", kind="refused")]
    with WebSim(hosts, IMAGES, max_hang=20, max_drip=20) as sim:
        plan = plan_urls(sim, 120, seed=3, names=True, zipf=0.3)
        plan += [
            (sim.url("h0", "/hang/900", names=True), "hang"),
            (sim.url("h1", "/drip/901.jpg", names=True), "drip"),
        ]
        plan += [
            (sim.url("h2", "/status/404/902", names=True), "http_404"),
            ("http://nowhere.invalid/x.jpg", "dns"),
        ]
        out = run([u for u, _ in plan], timeout=1, total_timeout=2, batch_size=16)
    statuses = {s.value for s in Status}
    for (url, expected), row in zip(plan, out.to_pylist()):
        assert row["status"] in statuses
        if expected == "image":
            assert row["status"] == "ok", (url, row["reason"])
            continue
        assert row["status"] == "download_failed", (url, expected, row["status"], row["reason"])
        tag = row["reason"].split(" ", 1)[0]
        assert tag in TAGS, row["reason"]
        want = {
            "hang": ("ReadTimeout:",),
            "drip": ("Timeout:",),
            "dead": ("ReadTimeout:", "breaker:"),
            "refused": ("connect:", "breaker:"),
            "dns": ("dns:",),
        }.get(expected, ("HTTP",))
        assert tag in want, (expected, row["reason"])
        rules = {
            "hang": ("read_timeout",),
            "drip": ("total_timeout",),
            "dead": ("read_timeout", "breaker"),
            "refused": ("connect", "breaker"),
            "dns": ("dns",),
        }.get(expected, (expected,))  # http_404, http_503, ...
        assert row["rule"] in rules, (expected, row["rule"], row["reason"])
        if expected.startswith("http_"):
            assert row["reason"] == f"HTTP {expected[5:]}" and row["http_status"] == int(expected[5:])


def test_robots_txt_opt_out(dials):
    robots = "User-agent: *\nDisallow: /private/\n"
    with WebSim([HostSpec("r", robots=robots, **FAST), HostSpec("plain", **FAST)], IMAGES) as sim:
        urls = [sim.url("r", f"/private/{i}.jpg", names=True) for i in range(3)]
        urls += [sim.url("r", "/img/1.jpg", names=True), sim.url("plain", "/private/2.jpg", names=True)]
        on = run(urls, check_robots_txt=True)
        robots_fetches = len(sim.stats()["paths"]["r /robots.txt"])
        off = run(urls)
    assert on.column("status").to_pylist() == ["opted_out"] * 3 + ["ok", "ok"]
    reason = on.column("reason")[0].as_py()
    assert reason.startswith("robots.txt: http://r.websim.test:") and "disallows this path for '*'" in reason
    assert robots_fetches == 1  # once per host and worker
    assert off.column("status").to_pylist() == ["ok"] * 5


def test_tdm_reservation_opt_out(dials):
    with WebSim([HostSpec("t", tdm=True, **FAST)], IMAGES) as sim:
        url = sim.url("t", "/img/1.jpg", names=True)
        on = run([url], respect_tdm_reservation=True)
        off = run([url])
    assert on.select(["status", "reason"]).to_pylist() == [
        {"status": "opted_out", "reason": "tdm-reservation: 1 (TDMRep: text and data mining rights reserved)"}
    ]
    assert off.column("status").to_pylist() == ["ok"]


def test_robots_txt_of_a_redirect_target_is_checked(dials):
    """A URL on an allowing host that redirects to a path the target host's robots.txt disallows."""
    robots = "User-agent: *\nDisallow: /private/\n"
    with WebSim([HostSpec("r", robots=robots, **FAST), HostSpec("plain", **FAST)], IMAGES) as sim:
        urls = [sim.url("plain", "/goto/r/private/1.jpg", names=True), sim.url("plain", "/goto/r/img/2.jpg", names=True)]
        out = run(urls, check_robots_txt=True)
        paths = sim.stats()["paths"]
    assert out.column("status").to_pylist() == ["opted_out", "ok"]
    assert out.column("reason")[0].as_py().startswith("robots.txt: http://r.websim.test:")
    assert "r /private/1.jpg" not in paths  # the disallowed target was never requested


def test_tdmrep_well_known_file_opt_out(dials):
    """TDMRep's /.well-known/tdmrep.json: the first matching location rule applies; checked for the
    URL and for a redirect target; hosts without the file reserve nothing."""
    tdmrep = '[{"location": "/img/1.jpg$", "tdm-reservation": 0}, {"location": "/img/*", "tdm-reservation": 1, "tdm-policy": "https://t.example/policy"}]'
    with WebSim([HostSpec("t", tdmrep=tdmrep, **FAST), HostSpec("plain", **FAST)], IMAGES) as sim:
        urls = [
            sim.url("t", "/img/2.jpg", names=True),  # reserved by the /img/* rule
            sim.url("t", "/img/1.jpg", names=True),  # the earlier rule says 0
            sim.url("t", "/private/3.jpg", names=True),  # no rule matches
            sim.url("plain", "/goto/t/img/4.jpg", names=True),  # a redirect into a reserved path
            sim.url("plain", "/img/5.jpg", names=True),  # no tdmrep.json (404)
        ]
        on = run(urls, respect_tdm_reservation=True)
        fetches = len(sim.stats()["paths"]["t /.well-known/tdmrep.json"])
        off = run(urls)
    assert on.column("status").to_pylist() == ["opted_out", "ok", "ok", "opted_out", "ok"]
    reason = on.column("reason")[0].as_py()
    assert reason.startswith("tdm-reservation: http://t.websim.test:") and "'/img/*'" in reason
    assert fetches == 1  # once per origin and worker
    assert off.column("status").to_pylist() == ["ok"] * 5


@pytest.mark.parametrize("later", ["169.254.169.254", "10.0.0.1"])
def test_dns_cache_does_not_bypass_the_guard(dials, later):
    """The name answers 127.0.0.1 first, then ``later``: the second dial is refused, not made."""
    lookups = []

    def rebinding(host: str) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"] if len(lookups) == 1 else [later]

    with WebSim([HostSpec("evil", **FAST)], IMAGES) as sim:
        set_resolver(rebinding)
        port = sim.host("evil").port
        # /close/ makes the server drop the kept-alive connection, so the second URL must dial again
        urls = [f"http://evil.websim.test:{port}/close/1.jpg", f"http://evil.websim.test:{port}/img/2.jpg"]
        out = run(urls, max_per_host=1, dns_cache_seconds=0)
        assert len(lookups) == 2
        lookups.clear()
        cached = run(urls, max_per_host=1, dns_cache_seconds=300)  # one lookup; each dial still checked
        assert len(lookups) == 1
    kind = "link-local" if later.startswith("169") else "private"
    assert out.column("status").to_pylist() == ["ok", "blocked_address"]
    assert out.column("reason").to_pylist()[1] == f"{kind} address {later} refused"
    assert {ip for ip, _ in dials} == {"127.0.0.1"}  # nothing else was ever dialled
    assert len(dials) == 3  # ok, then (cached run) ok and ok again on a new connection
    assert cached.column("status").to_pylist() == ["ok", "ok"]


def test_allow_private_networks_keeps_link_local_closed(dials):
    """Issue 18: with allow_private_networks, 169.254.169.254 given directly and reached through a
    redirect from a 127.0.0.1 server both end blocked_address, and it is never dialled."""
    with serve_bad() as srv:
        out = run(
            ["http://169.254.169.254/latest/meta-data/", srv.url("/redirect-linklocal"), srv.url("/ok.jpg")],
            allow_private_networks=True,
            allowed_networks=[],
        )
    assert out.column("status").to_pylist() == ["blocked_address", "blocked_address", "ok"]
    assert out.column("reason").to_pylist()[:2] == ["link-local address 169.254.169.254 refused"] * 2
    assert dials and {ip for ip, _ in dials} == {"127.0.0.1"}
