"""Download on a simulated web: img2dataset 1.47 vs our Download stage, side by side.

    .venv/bin/python bench/download_web.py                    # 4000 URLs, 200 hosts, 4 shards, 2 processes
    .venv/bin/python bench/download_web.py --urls 2000 --shards 4

1. Starts ``tests/websim.py`` in its own process: 200 hosts on 127.0.0.1 (one port each), lognormal
   latency (median 80 ms, sigma 1.4: p99 about 2 s), per URL 5% hangs, 1% slow drips (64 bytes per
   0.5 s, never complete), 3% 404, 1% 403, 1% 500, 5% redirects; per host a connection limit counted
   by the server (503 + Retry-After: 1 over it; 20% of hosts allow 4, the rest 8..32), 6 hosts rate
   limited (5 requests/s, then 429 + Retry-After: 1), 6 dead hosts (accept, never answer), 4 refusing
   hosts. Bodies are the JPEG corpus of ``bench/download.py`` (256..1024 px sides, mean ~69 KiB).
2. The same URL list (Zipf over hosts: a few hosts hold many URLs) is cut into ``--shards`` shards and
   run by each tool in the same harness: a spawn pool of ``--processes`` warm workers (both tools
   imported beforehand) taking shards as they free up, as img2dataset's distributor does. img2dataset
   runs its own ``Downloader`` + ``Resizer`` + ``WebDatasetSampleWriter`` (as ``download()`` builds
   them); ours runs the ``Download`` stage on the shard and writes a tar + parquet the same way.
   Same resize settings (256, border, jpg q95, exif + sha256), same ``timeout``.
3. Reports per tool: images/s (ok images / span from the first shard start to the last shard end),
   success over reachable URLs (URLs that serve an image to a polite client), split into hosts with
   and without a rate limit, how rate-limited URLs ended, worker CPU seconds, the peak concurrent
   requests per host and the over-limit 503s the server counted, and the median and max shard time.

Never run in CI. Prints a Markdown block for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.websim import HostSpec, SimProcess, plan_urls  # noqa: E402


def _bench_download():
    """``bench/download.py`` as a module (corpus, img2dataset set-up, writer, RESIZE), loaded once."""
    global _BENCH_DOWNLOAD
    if _BENCH_DOWNLOAD is None:
        spec = importlib.util.spec_from_file_location("bench_download", ROOT / "bench" / "download.py")
        _BENCH_DOWNLOAD = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_BENCH_DOWNLOAD)
    return _BENCH_DOWNLOAD


_BENCH_DOWNLOAD = None


def make_hosts(n: int, seed: int = 0) -> list[HostSpec]:
    rng = random.Random(seed)
    hosts = []
    special = ["rate"] * 6 + ["dead"] * 6 + ["refused"] * 4
    ranks = rng.sample(range(10, n), len(special))  # the 10 biggest hosts are ordinary
    kind_at = dict(zip(ranks, special))
    for i in range(n):
        kind = kind_at.get(i, "normal")
        limit = 4 if rng.random() < 0.2 else rng.choice([8, 16, 32])
        if kind == "rate":
            hosts.append(HostSpec(f"h{i}", limit=limit, rate=5, retry_after=1))
        elif kind in ("dead", "refused"):
            hosts.append(HostSpec(f"h{i}", kind=kind))
        else:
            hosts.append(HostSpec(f"h{i}", limit=limit))
    return hosts


# ---- the two contestants, one shard each call ------------------------------------------------------


def _ours(shard: int, urls: list[str], out: str, cfg: dict) -> dict:
    import pyarrow as pa

    from stages.download import Download

    bd = _bench_download()
    stage = Download(dict(allowed_networks=["127.0.0.0/8"], **cfg, **bd.RESIZE))
    stage.setup()
    table = pa.table(
        {"key": [f"{shard:05d}{i:05d}" for i in range(len(urls))], "url": urls, "status": ["ok"] * len(urls)}
    )
    start, c0 = time.time(), time.process_time()
    res = stage(table)
    bd._write_like_img2dataset(res, out, shard)
    end, cpu = time.time(), time.process_time() - c0
    stage.teardown()
    rows = res.select(["url", "status", "reason"]).to_pylist()
    return {"shard": shard, "start": start, "end": end, "cpu": cpu, "rows": rows}


def _img2dataset(shard: int, urls: list[str], out: str, cfg: dict) -> dict:
    import pyarrow.parquet as pq

    bd = _bench_download()
    downloader, path = bd.img2dataset_shard_downloader(shard, urls, out, cfg["thread_count"], cfg["timeout"])
    start, c0 = time.time(), time.process_time()
    downloader((shard, path))
    end, cpu = time.time(), time.process_time() - c0
    t = pq.read_table(Path(out) / f"{shard:05d}.parquet", columns=["url", "status", "error_message"])
    rows = [
        {
            "url": r["url"],
            "status": "ok" if r["status"] == "success" else "failed",
            "reason": r["error_message"],
        }
        for r in t.to_pylist()
    ]
    return {"shard": shard, "start": start, "end": end, "cpu": cpu, "rows": rows}


def _init_worker() -> None:
    import img2dataset.downloader  # noqa: F401
    import img2dataset.resizer  # noqa: F401
    import img2dataset.writer  # noqa: F401

    import stages.download  # noqa: F401


def _task(args) -> dict:
    who, shard, urls, out, cfg = args
    return (_ours if who == "ours" else _img2dataset)(shard, urls, out, cfg)


# ---- scoring ----------------------------------------------------------------------------------------


def score(
    who: str, shards: list[dict], plan: list[tuple[str, str]], rate_hosts: set[str], server: dict
) -> dict:
    expected = dict(plan)
    rows = [r for s in shards for r in s["rows"]]
    ok = sum(r["status"] == "ok" for r in rows)
    span = max(s["end"] for s in shards) - min(s["start"] for s in shards)
    times = [s["end"] - s["start"] for s in shards]

    def host_of(url: str) -> str:
        return url.split("/")[2]

    reach = [r for r in rows if expected.get(r["url"]) == "image"]
    plain = [r for r in reach if host_of(r["url"]) not in rate_hosts]
    limited = [r for r in reach if host_of(r["url"]) in rate_hosts]
    lim_end = Counter(
        "ok"
        if r["status"] == "ok"
        else "rate_limited reason"
        if (r["reason"] or "").startswith("rate_limited")
        else "other failure"
        for r in limited
    )
    failures = Counter((r["reason"] or "").split(" ", 1)[0] for r in reach if r["status"] != "ok")
    hosts = server["hosts"]
    return {
        "who": who,
        "ok": ok,
        "rows": len(rows),
        "img_s": ok / span,
        "span": span,
        "success_plain": sum(r["status"] == "ok" for r in plain) / max(1, len(plain)),
        "n_plain": len(plain),
        "limited": dict(lim_end),
        "n_limited": len(limited),
        "cpu": sum(s["cpu"] for s in shards),
        "peak_per_host": max(h["peak"] for h in hosts.values()),
        "over_limit_503": sum(h["over_limit"] for h in hosts.values()),
        "served_429": sum(h["rate_limited"] for h in hosts.values()),
        "requests": sum(h["requests"] for h in hosts.values()),
        "shard_median": statistics.median(times),
        "shard_max": max(times),
        "reachable_failures": dict(failures.most_common(6)),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--urls", type=int, default=4000)
    ap.add_argument("--hosts", type=int, default=200)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=5, help="img2dataset's timeout, ours too (total 3x)")
    ap.add_argument("--i2d-threads", type=int, default=256, help="img2dataset's thread_count (its default)")
    ap.add_argument("--ours-threads", type=int, default=128, help="our thread_count")
    ap.add_argument("--ours-per-host", type=int, default=12, help="our max_per_host (per machine, shared by the processes)")
    ap.add_argument("--ours-min-rate", type=float, default=1024, help="our min_body_rate, bytes/s (0: off)")
    ap.add_argument("--images", type=int, default=600, help="distinct corpus images")
    ap.add_argument("--corpus", default=str(Path(tempfile.gettempdir()) / "clipcurate_bench_corpus"))
    ap.add_argument("--only", choices=["ours", "img2dataset"], default=None)
    a = ap.parse_args(argv)

    bd = _bench_download()
    bd.make_corpus(Path(a.corpus), a.images)
    corpus_dir = tempfile.mkdtemp(prefix="websim_corpus_")
    for name in sorted(os.listdir(a.corpus))[: a.images]:  # the first --images files only
        os.symlink(Path(a.corpus) / name, Path(corpus_dir) / name)
    hosts = make_hosts(a.hosts)
    sim = SimProcess(hosts, corpus_dir, max_hang=60, max_drip=40)
    try:
        plan = plan_urls(sim.sim, a.urls, seed=1)
        rate_hosts = {f"127.0.0.1:{h.port}" for h in sim.hosts if h.rate is not None}
        urls = [u for u, _ in plan]
        per = -(-len(urls) // a.shards)
        load0 = os.getloadavg()
        results = {}
        ctx = mp.get_context("spawn")
        with ctx.Pool(a.processes, initializer=_init_worker) as pool:
            for who in ("img2dataset", "ours"):
                if a.only and who != a.only:
                    continue
                cfg = {"timeout": a.timeout}
                cfg["thread_count"] = a.i2d_threads if who == "img2dataset" else a.ours_threads
                if who == "ours":
                    cfg["max_per_host"] = a.ours_per_host
                    cfg["min_body_rate"] = a.ours_min_rate
                sim.reset()
                with tempfile.TemporaryDirectory() as d:
                    jobs = [(who, s, urls[s * per : (s + 1) * per], d, cfg) for s in range(a.shards)]
                    print(f"{who}: {len(urls)} URLs in {a.shards} shards ...", flush=True)
                    shards = list(pool.imap_unordered(_task, jobs, chunksize=1))
                results[who] = score(who, shards, plan, rate_hosts, sim.stats())
                print(json.dumps(results[who]), flush=True)
        load1 = os.getloadavg()
    finally:
        sim.close()

    kinds = Counter(e for _, e in plan)
    lines = [
        f"{len(urls)} URLs on {a.hosts} simulated hosts ({dict(kinds)}), {a.shards} shards, "
        f"{a.processes} processes, {os.cpu_count()} CPUs; timeout {a.timeout:g}s; img2dataset thread_count "
        f"{a.i2d_threads}, ours thread_count {a.ours_threads} and max_per_host {a.ours_per_host} and min_body_rate {a.ours_min_rate:g}; load average "
        f"{load0[0]:.1f} at start, {load1[0]:.1f} at end",
        "",
        "| | ok / rows | img/s | success, reachable (no rate limit) | rate-limited reachable URLs | "
        "worker CPU s | peak per host | over-limit 503s | shard median / max s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for who, name in (("img2dataset", "img2dataset 1.47"), ("ours", "clipcurate download")):
        if who not in results:
            continue
        r = results[who]
        lim = ", ".join(f"{k} {v}" for k, v in sorted(r["limited"].items()))
        lines.append(
            f"| {name} | {r['ok']}/{r['rows']} | {r['img_s']:.1f} | {r['success_plain']:.1%} of {r['n_plain']} | "
            f"{lim} (of {r['n_limited']}) | {r['cpu']:.1f} | {r['peak_per_host']} | {r['over_limit_503']} | "
            f"{r['shard_median']:.1f} / {r['shard_max']:.1f} |"
        )
    if len(results) == 2:
        lines.append(
            f"| **ratio** | | **{results['ours']['img_s'] / results['img2dataset']['img_s']:.2f}x** | | | "
            f"{results['img2dataset']['cpu'] / results['ours']['cpu']:.2f}x less | | | |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
