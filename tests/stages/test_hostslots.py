"""The machine-wide per-host slots (``stages.download.hostslots``): shared by worker processes,
freed when a process dies, and binding on a real server that counts concurrent requests."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest

from stages.download.hostslots import HostSlots
from tests.badserver import make_jpeg
from tests.websim import HostSpec, WebSim

IMAGES = [make_jpeg(320, 240, seed=i) for i in range(3)]


@pytest.fixture()
def table(tmp_path, monkeypatch):
    path = str(tmp_path / "slots")
    monkeypatch.setenv("CLIPCURATE_HOST_SLOTS", path)
    return path


def _take(path, host, n, conn):
    slots = HostSlots.for_process(path)
    conn.send([slots.try_take(host, 4) for _ in range(n)])
    conn.recv()  # hold the slots until told to go (or killed)
    conn.close()


def test_processes_share_a_hosts_slots_and_a_dead_process_frees_its_own(table):
    ctx = mp.get_context("spawn")
    a_end, a = ctx.Pipe()
    p = ctx.Process(target=_take, args=(table, "h:80", 3, a))
    p.start()
    assert a_end.recv() == [True, True, True]
    mine = HostSlots.for_process(table)
    assert mine.in_flight("h:80") == 3
    assert mine.try_take("h:80", 4) is True  # the 4th slot
    assert mine.try_take("h:80", 4) is False  # the cap binds across processes
    assert mine.try_take("other:80", 4) is True  # another host has its own slots
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    mine._last_sweep = 0.0  # look for dead rows now rather than within 2 s
    assert mine.try_take("h:80", 4) is True  # the dead process's 3 slots came back
    assert mine.in_flight("h:80") == 2
    mine.give("h:80")
    mine.give("h:80")
    mine.give("other:80")
    assert mine.in_flight("h:80") == 0 and mine.in_flight("other:80") == 0


def _download(urls, cap, scope, q, start):
    from tests.conftest import run_download

    start.wait()  # both processes imported: they download at the same time
    out = run_download(urls, max_per_host=cap, max_per_host_scope=scope, thread_count=16, timeout=5,
                       allowed_networks=["127.0.0.0/8"])  # fmt: skip
    q.put(out.column("status").to_pylist())


def test_two_worker_processes_keep_the_machine_cap(table):
    """Two download processes on one host with max_per_host 3: together at most 3 in flight (the
    server counts)."""
    spec = HostSpec("tight", limit=8, latency=0.03, sigma=0.3)
    with WebSim([spec], IMAGES) as sim:
        ctx = mp.get_context("spawn")
        q, start = ctx.Queue(), ctx.Barrier(2)
        procs = [
            ctx.Process(target=_download, args=([sim.url("tight", f"/img/{w}-{i}.jpg") for i in range(40)], 3, "machine", q, start))
            for w in range(2)
        ]  # fmt: skip
        for p in procs:
            p.start()
        statuses = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join()
        st = sim.stats()["hosts"]["tight"]
    assert statuses == [["ok"] * 40] * 2
    assert st["requests"] == 80
    assert st["peak"] <= 3 and st["over_limit"] == 0
