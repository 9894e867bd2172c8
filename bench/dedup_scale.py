"""Driver memory of the pool-wide stages at pool scale (issue #13, acceptance 1).

    .venv/bin/python bench/dedup_scale.py                      # 1M and 10M rows
    .venv/bin/python bench/dedup_scale.py --sizes 1000000 3000000

For each size a synthetic Parquet pool (url, sha256, clip_score; ~10% repeated URLs and ~5% repeated
images under other URLs; no download) is made once under ``--work``, then a fresh child process runs
read -> dedup (url, sha256) -> clip_filter (top_fraction 0.3) -> write through ``executor.run`` on a
local Ray of ``--cpus`` CPUs. The parent samples the RSS of the child process only (the driver: not
the Ray workers or daemons) every 0.1 s and keeps the peak. Goal: peak at 10M <= 1.3x the peak at 1M.

On the smallest pool the kept set is checked against the driver-merge implementation that the
shuffle replaced (``tests/dedup_reference.py``, run here in the parent, outside the measurement)
followed by DataComp's rule (``datacomp_threshold``) over the rows it keeps: same duplicate reasons,
same kept rows. Never run in CI. Prints a Markdown block for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def make_pool(path: Path, n: int, seed: int = 13) -> None:
    """url: ~10% of rows repeat an earlier URL; sha256: ~5% repeat an image under another URL."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, pa.schema([("url", pa.string()), ("text", pa.string()),
                                          ("sha256", pa.string()), ("clip_score", pa.float64())])) as w:  # fmt: skip
        step = 1_000_000
        for a in range(0, n, step):
            m = min(step, n - a)
            idx = np.arange(a, a + m)
            url_id = np.where(rng.random(m) < 0.1, rng.integers(0, max(a + m, 1), m), idx)
            img_id = np.where(rng.random(m) < 0.05, rng.integers(0, max(a + m, 1), m), idx)
            clip = np.round(rng.normal(0.3, 0.05, m), 4)
            w.write_table(
                pa.table(
                    {
                        "url": [f"http://img.example/{u}.jpg" for u in url_id.tolist()],
                        "text": [f"a photo {i}" for i in idx.tolist()],
                        "sha256": [f"{j * 2654435761 % (1 << 64):064x}" for j in img_id.tolist()],
                        "clip_score": clip,
                    }
                )
            )
    tmp.rename(path)


def workflow(pool: Path, out: Path, cpus: int, spp: int) -> dict:
    read = {"path": str(pool), "caption_col": "text", "save_additional_columns": ["sha256", "clip_score"]}
    return {
        "name": "dedup_scale",
        "output": str(out),
        "samples_per_shard": spp,
        "ray": {"num_cpus": cpus, "show_progress": False},
        "stages": [
            {"read": read},
            {"dedup": {"by": ["url", "sha256"]}},
            {"clip_filter": {"top_fraction": 0.3}},
            {"write": {"rejected_thumbnails": 0}},
        ],
    }


def child(spec_path: str) -> None:
    import logging

    if os.environ.get("DEDUP_SCALE_TIMELINE"):  # where the driver's memory goes: RSS next to the log
        import psutil

        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(message)s")

        def tick():
            me = psutil.Process()
            t0 = time.perf_counter()
            while True:
                print(f"{(time.perf_counter() - t0) * 1000:8.0f} ms RSS {me.memory_info().rss >> 20} MiB",
                      file=sys.stderr, flush=True)  # fmt: skip
                time.sleep(0.5)

        threading.Thread(target=tick, daemon=True).start()
    else:
        logging.basicConfig(level=logging.WARNING)
    from pipeline import config, plan
    from pipeline import ray as executor

    spec = json.loads(Path(spec_path).read_text())
    pipe = config.from_dict(spec["workflow"], source=spec_path)
    plan.check(pipe)
    t0 = time.perf_counter()
    manifest = executor.run(pipe, quiet=True)
    print(json.dumps({"wall": time.perf_counter() - t0, "status_counts": manifest["status_counts"],
                      "global_state": manifest["global_state"], "fit_seconds": manifest["fit_seconds"]}))  # fmt: skip


class Sampler(threading.Thread):
    """Peak RSS of one process (the driver), sampled every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.period, self.peak = pid, period, 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        p = psutil.Process(self.pid)
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, p.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(self.period)


def run_child(work: Path, n: int, cpus: int, spp: int) -> dict:
    import shutil

    pool = work / f"pool_{n}.parquet"
    if not pool.exists():
        t0 = time.perf_counter()
        make_pool(pool, n)
        print(f"made {pool} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    out = work / f"out_{n}"
    shutil.rmtree(out, ignore_errors=True)
    spec = work / f"spec_{n}.json"
    spec.write_text(json.dumps({"workflow": workflow(pool, out, cpus, spp)}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.stop.set()
    sampler.join()
    (work / f"child_{n}.log").write_text(stderr)
    if proc.returncode != 0:
        raise SystemExit(f"run of {n} rows failed:\n{stderr[-4000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(n=n, peak_mib=sampler.peak / 2**20, out=str(out), pool=str(pool))
    return result


def check_kept(result: dict) -> str:
    """The run's output against the driver-merge dedup + DataComp's rule over the same rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.clip_filter import datacomp_threshold
    from tests import dedup_reference as reference

    out = Path(result["out"])
    cols = ["key", "url", "sha256", "clip_score", "status", "reason"]
    t = pa.concat_tables([pq.read_table(p, columns=cols) for p in sorted(out.glob("*.parquet"))]).sort_by(
        "key"
    )
    pool = t.set_column(t.column_names.index("status"), "status", pa.array(["ok"] * t.num_rows))
    dups = reference.dedup([pool.select(["key", "url", "sha256", "status"])], by=("url", "sha256"))
    keys = t.column("key").to_pylist()
    scores = np.asarray(t.column("clip_score").to_numpy(zero_copy_only=False), np.float64)
    in_pool = np.array([k not in dups for k in keys])
    thr = datacomp_threshold(scores[in_pool], 0.3)
    want_kept = {k for k, p, s in zip(keys, in_pool, scores) if p and s >= thr}
    got_kept = {k for k, st in zip(keys, t.column("status").to_pylist()) if st == "ok"}
    got_dups = {k: r for k, st, r in zip(keys, t.column("status").to_pylist(), t.column("reason").to_pylist())
                if st == "duplicate"}  # fmt: skip
    same = got_kept == want_kept and got_dups == dups
    return (f"{'same' if same else 'DIFFERENT'}: {len(got_kept)} kept (driver-merge + DataComp: {len(want_kept)}), "
            f"{len(got_dups)} duplicates (driver-merge: {len(dups)})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--samples-per-shard", type=int, default=50_000)
    ap.add_argument("--work", default="/tmp/clipcurate_dedup_scale")
    ap.add_argument("--no-check", action="store_true", help="skip the driver-merge check")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    import platform

    import psutil

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        load = os.getloadavg()
        r = run_child(work, n, args.cpus, args.samples_per_shard)
        r["load_before"] = load
        r["load_after"] = os.getloadavg()
        print(json.dumps(r), file=sys.stderr, flush=True)
        rows.append(r)
    check = "skipped" if args.no_check else check_kept(rows[0])
    base = rows[0]["peak_mib"]
    print(f"\n#### Driver peak RSS, dedup + clip_filter ({platform.node()}, {psutil.cpu_count()} cores, "
          f"local Ray of {args.cpus} CPUs, {args.samples_per_shard} rows per shard)\n")  # fmt: skip
    print("| rows | shards | driver peak RSS (MiB) | vs smallest | wall (s) | duplicate | filtered_clip | ok | "
          "load avg before/after |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sc = r["status_counts"]
        print(f"| {r['n']:,} | {-(-r['n'] // args.samples_per_shard)} | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] / base:.2f}x | {r['wall']:.0f} | {sc.get('duplicate', 0):,} | "
              f"{sc.get('filtered_clip', 0):,} | {sc.get('ok', 0):,} | "
              f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |")  # fmt: skip
    print(f"\nKept set on {rows[0]['n']:,} rows vs the driver-merge implementation: {check}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
