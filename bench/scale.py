"""Scale: peak memory of the whole demo pipeline at 1x and 10x input, and stage overlap.

    .venv/bin/python bench/scale.py                               # 400 and 4000 pairs, ~8 min on 2 cores
    .venv/bin/python bench/scale.py --n 200 --scale 5 --rounds 1  # quicker

Every run is a fresh child process (``--child``) that starts a local Ray with ``--cpus`` CPUs (the
same for every run) and then times ``executor.run`` (Ray start-up excluded; worker start-up, imports
and model loading included). The demo world is served on 127.0.0.1 by this (parent) process.

1. **Memory.** The demo workflow (read -> download -> clip_score -> write) on N and on scale*N pairs.
   Every 0.2 s the parent sums the RSS of the child's whole process tree: the driver, the Ray
   workers (``ray::...`` processes: tasks and actors) and Ray's own daemons (raylet, GCS, agents).
   Peaks are reported for driver + workers and for the whole tree, with the processes present at
   the peak. Goal: peak at scale*N <= 1.3x the peak at N. (RSS counts a shared object-store page
   once per process that maps it, so it overstates; the same rule applies to both sizes.)
2. **Overlap.** Each stage alone, as the pipeline truncated around it, on the same CPUs:
   ``download alone`` = read -> download -> write; ``clip_score alone`` = read (the tars that run
   wrote, ``input_format: webdataset``) -> clip_score -> write, i.e. exactly the rows clip_score
   sees in the full pipeline. Throughput is in pipeline input rows over the wall time of
   ``executor.run`` (so "slowest stage alone" is the one that needs longest for its share of the
   pipeline's work). Goal, at scale*N: end to end >= 0.8x the slowest stage alone. The per-stage
   busy seconds (the executor's counters) over the wall time show which stage is the bottleneck
   (highest) and which starve.

Each configuration runs ``--rounds`` times, interleaved; the table keeps the best wall time and the
highest memory peak of its rounds (the machine is shared, so single timings are noisy). Never run
in CI. Prints a Markdown block for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RUNS = ("e2e", "download", "clip_score")


# ---- child: one timed pipeline run ----------------------------------------------------------------


def child(spec_path: str) -> None:
    """Run the pipeline described by the JSON spec; print one JSON line with the timings."""
    import logging

    from pipeline import config, plan
    from pipeline import ray as executor

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    pipe = config.from_dict(spec["workflow"], source=spec["name"])
    plan.check(pipe)
    executor.init_ray(pipe)  # not timed
    t0 = time.perf_counter()
    manifest = executor.run(pipe, overwrite=True)  # a fresh run, never a resume
    wall = time.perf_counter() - t0
    executor.shutdown()
    out = {k: manifest[k] for k in ("total_rows", "total_samples", "status_counts", "stage_seconds")}
    print("RESULT " + json.dumps({"wall": wall, "shards": len(manifest["shards"]), **out}), flush=True)


# ---- parent: worlds, runs, memory sampling --------------------------------------------------------


def workflow(name: str, read: dict, middle: list[dict], output: str, cpus: int, spp: int) -> dict:
    return {
        "name": name,
        "output": output,
        "samples_per_shard": spp,
        "ray": {"num_cpus": cpus, "show_progress": False},
        "stages": [{"read": read}, *middle, {"write": {}}],
    }


def demo_stages(model: str) -> tuple[dict, dict]:
    """The download and clip_score stages of workflows/demo.yaml (the model path may be overridden)."""
    import yaml

    demo = yaml.safe_load((REPO / "workflows" / "demo.yaml").read_text())
    stages = {next(iter(s)): next(iter(s.values())) for s in demo["stages"]}
    return {"download": stages["download"]}, {"clip_score": dict(stages["clip_score"], model=model)}


class Sampler(threading.Thread):
    """Sums the RSS of a process tree every ``period`` seconds and keeps the peaks."""

    def __init__(self, pid: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.stop = threading.Event()
        self.peak_total = self.peak_app = self.peak_procs = 0
        self.at_peak: dict[str, list[int]] = {}  # process name -> [count, MiB] at the whole-tree peak

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self.stop.is_set():
            total = app = n = 0
            by_name: dict[str, list[int]] = {}
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    rss, name = p.memory_info().rss, p.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                n += 1
                entry = by_name.setdefault(name, [0, 0])
                entry[0] += 1
                entry[1] += rss >> 20
                if p.pid == self.pid or name.startswith("ray::"):
                    app += rss
            if total > self.peak_total:
                self.peak_total, self.at_peak = total, by_name
            self.peak_app = max(self.peak_app, app)
            self.peak_procs = max(self.peak_procs, n)
            self.stop.wait(self.period)


def run_child(name: str, wf: dict, work: Path) -> dict:
    spec = work / f"{name}.json"
    spec.write_text(json.dumps({"name": name, "workflow": wf}))
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(spec)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = Sampler(proc.pid)
    sampler.start()
    out, err = proc.communicate(timeout=1800)
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{err[-5000:]}")
    res = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])
    res.update(
        peak_app_mb=sampler.peak_app / 2**20,
        peak_total_mb=sampler.peak_total / 2**20,
        peak_procs=sampler.peak_procs,
        at_peak=dict(sorted(sampler.at_peak.items(), key=lambda kv: -kv[1][1])),
    )
    busy = ", ".join(f"{k} {v:.0f}s" for k, v in res["stage_seconds"].items())
    print(
        f"  {name}: {res['total_rows']} rows in {res['wall']:.1f}s; peak RSS driver+workers "
        f"{res['peak_app_mb']:.0f} MiB, whole tree {res['peak_total_mb']:.0f} MiB ({res['peak_procs']} "
        f"processes); busy: {busy}\n    at the peak: "
        + ", ".join(f"{k} x{c} {m} MiB" for k, (c, m) in res["at_peak"].items()),
        flush=True,
    )
    return res


def best_of(rounds: list[dict]) -> dict:
    """The fastest round, with the highest memory peaks of all rounds."""
    best = dict(min(rounds, key=lambda r: r["wall"]))
    for k in ("peak_app_mb", "peak_total_mb", "peak_procs"):
        best[k] = max(r[k] for r in rounds)
    best["walls"] = [round(r["wall"], 1) for r in rounds]
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400, help="pairs at 1x")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPUs of every run")
    ap.add_argument("--samples-per-shard", type=int, default=100)
    ap.add_argument("--model", default="local-dir:demo/assets/toy_clip")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"subset of {','.join(RUNS)}; e2e is needed")
    ap.add_argument("--work", default=None, help="folder for worlds and outputs (default: a temp dir)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child)
        return 0

    import pyarrow.parquet as pq

    from demo.server import serve
    from demo.world import make_world, url_list

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="clipcurate_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    runs = [r for r in RUNS if r in a.runs.split(",")]
    download, clip = demo_stages(a.model)
    sizes = (a.n, a.n * a.scale)
    rounds: dict[tuple[str, int], list[dict]] = {}
    t_start, load = time.perf_counter(), os.getloadavg()
    for n in sizes:
        world = work / f"world{n}"
        if not (world / "world.parquet").exists():
            make_world(world, n=n, seed=0)
        with serve(world) as base:
            urls = world / "urls.parquet"
            pq.write_table(url_list(world, base), urls)
            read = {"path": str(urls), "url_col": "url", "caption_col": "caption"}
            tars = {"path": f"{work / f'download{n}'}/*.tar", "input_format": "webdataset"}
            plans = {
                "e2e": (read, [download, clip]),
                "download": (read, [download]),
                "clip_score": (tars, [clip]),  # the rows clip_score sees: those download kept
            }
            for i in range(a.rounds):
                for r in runs:
                    if r == "clip_score" and "download" not in runs:
                        continue
                    src, middle = plans[r]
                    wf = workflow(f"{r}{n}", src, middle, str(work / f"{r}{n}"), a.cpus, a.samples_per_shard)
                    rounds.setdefault((r, n), []).append(run_child(f"{r}{n}.{i}", wf, work))
    res = {k: best_of(v) for k, v in rounds.items()}
    report(res, runs, sizes, a, argv, load, time.perf_counter() - t_start)
    raw = work / "scale_results.json"
    raw.write_text(json.dumps({f"{r}{n}": v for (r, n), v in rounds.items()}, indent=1))
    print(f"- Raw figures (every round): {raw}")
    return 0


def report(res: dict, runs: list[str], sizes: tuple[int, int], a, argv, load, seconds: float) -> None:
    """Print the Markdown block for RESULTS.md."""
    n1, n10 = sizes
    cmd = " ".join(["bench/scale.py", *(argv if argv is not None else sys.argv[1:])])
    print()
    print(f"#### `{cmd}`")
    print()
    print(f"{platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min) "
          f"at start; every run a fresh local Ray with {a.cpus} CPUs, samples_per_shard "
          f"{a.samples_per_shard}, best of {a.rounds} rounds; bench {seconds:.0f}s.")  # fmt: skip
    print()
    print("| run | input rows | wall s (rounds) | input rows/s | peak RSS driver+workers MiB | whole tree MiB "
          "| processes | busy/wall per stage |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for (r, n), x in sorted(res.items(), key=lambda kv: (kv[0][1], RUNS.index(kv[0][0]))):
        busy = ", ".join(f"{k} {v / x['wall']:.2f}" for k, v in x["stage_seconds"].items())
        label = "end to end" if r == "e2e" else f"{r} alone"
        walls = "/".join(f"{w:.1f}" for w in x["walls"])
        print(f"| {label} | {n} | {x['wall']:.1f} ({walls}) | {n / x['wall']:.1f} | {x['peak_app_mb']:.0f} | "
              f"{x['peak_total_mb']:.0f} | {x['peak_procs']} | {busy} |")  # fmt: skip
    print()
    e1, e10 = res[("e2e", n1)], res[("e2e", n10)]
    m_app, m_tot = e10["peak_app_mb"] / e1["peak_app_mb"], e10["peak_total_mb"] / e1["peak_total_mb"]
    ok = "met" if max(m_app, m_tot) <= 1.3 else "NOT met"
    print(f"- **Memory**: end-to-end peak at {n10} / at {n1} = **{m_app:.2f}** (driver + workers), "
          f"{m_tot:.2f} (whole tree); goal <= 1.3: {ok}.")  # fmt: skip
    stages = [r for r in runs if r != "e2e" and (r, n10) in res]
    if stages:
        rate = {r: n10 / res[(r, n10)]["wall"] for r in ["e2e", *stages]}
        slowest = min(stages, key=rate.get)
        ratio = rate["e2e"] / rate[slowest]
        alone = ", ".join(f"{s} alone {rate[s]:.1f}" for s in stages)
        print(f"- **Overlap** at {n10}: end to end {rate['e2e']:.1f} input rows/s; {alone}; end to end / "
              f"slowest ({slowest}) = **{ratio:.2f}**; goal >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'}.")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
