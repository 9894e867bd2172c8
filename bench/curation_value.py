"""What curation buys, DataComp-style: several recipes on the same pool, each output trained at the same
budget (samples seen) over several seeds with ``clipcurate eval``, scored on held-out sets.

    .venv/bin/python bench/curation_value.py [--n 1200] [--mismatch-rate 0.5] [--dup-share 0.15]
        [--seeds 0 1 2] [--samples-seen 8192] [--batch-size 64] [--threads 1] [--parallel 3]
        [--out /tmp/clipcurate_value]

1. The pool: a shapes world (``demo/world.py``, its own seed) with a larger mismatched-caption share than
   the demo's 15% (``--mismatch-rate``), plus a share of repeated rows (the same URL and caption listed
   again, as crawls do) so that exact dedup has something to remove. It is served on 127.0.0.1.
2. The evaluation sets: ``demo/evalset.py`` (80 colour x shape classes, 200 held-out captions), drawn
   from another key space: never part of the pool (``tests/demo/test_evalset.py``).
3. Recipes, each a pipeline run (Python API, one local Ray) on the same URL list: no filter; CLIP score
   threshold; CLIP top fraction (DataComp's rule); threshold + MetaCLIP balance; + exact dedup;
   + LaCLIP rewrite (the tars' caption is the rewrite).
4. Each output is trained by open_clip's trainer from random weights on the toy CLIP architecture for
   the same number of samples seen, once per seed; zero-shot mean per-class accuracy and retrieval
   recall are reported as mean and spread (sample standard deviation, min-max) over the seeds.

Writes ``OUT/results.md`` (the table for bench/RESULTS.md) and ``OUT/results.json``. Run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from demo.evalset import TEMPLATES, make_evalset  # noqa: E402
from demo.server import serve  # noqa: E402
from demo.world import make_world, url_list  # noqa: E402

TOY_CLIP = "local-dir:demo/assets/toy_clip"
THRESHOLD = json.loads((ROOT / "demo/assets/toy_clip/demo_threshold.json").read_text())["min_score"]
DOWNLOAD = {"image_size": 64, "resize_mode": "border", "encode_format": "jpg", "encode_quality": 90,
            "timeout": 5, "thread_count": 16, "allowed_networks": ["127.0.0.0/8"]}  # fmt: skip
SCORE = {"clip_score": {"model": TOY_CLIP, "batch_size": 512, "forward_batch_size": 64, "num_cpus": 0.5}}


def recipes(top_fraction: float, t: int) -> dict[str, list[dict]]:
    """Recipe name -> the stages between download and write (write's caption_member in the last)."""
    thr = {"clip_score": {**SCORE["clip_score"], "min_score": THRESHOLD}}
    bal = {"balance": {"metadata": "demo/assets/shapes_metadata.json", "t": t, "seed": 0}}
    rw = {"rewrite": {"engine": {"type": "transformers", "model": "demo/assets/toy_lm"}, "n_rewrites": 1,
                      "batch_size": 64, "num_cpus": 0.5}}  # fmt: skip
    return {
        "no filter": [],
        "CLIP threshold": [thr],
        f"CLIP top {top_fraction:.0%}": [SCORE, {"clip_filter": {"top_fraction": top_fraction}}],
        "threshold + balance": [thr, bal],
        "threshold + balance + dedup": [{"dedup": {}}, thr, bal],
        "threshold + balance + dedup + rewrite": [{"dedup": {}}, thr, bal, rw],
    }


def pool_list(world: Path, base_url: str, dup_share: float, seed: int) -> Path:
    """The URL list: the world's pairs plus ``dup_share`` repeated rows, shuffled (fixed seed)."""
    t = url_list(world, base_url)
    rng = random.Random(seed)
    dups = rng.sample(range(t.num_rows), round(dup_share * t.num_rows))
    t = pa.concat_tables([t, t.take(dups)])
    t = t.take(rng.sample(range(t.num_rows), t.num_rows))
    path = world / "pool.parquet"
    pq.write_table(t, path)
    return path


def curate(name: str, stages: list[dict], urls: Path, out: Path) -> dict:
    from pipeline import config, plan
    from pipeline import ray as executor

    write = {"caption_member": "rewrite"} if any("rewrite" in s for s in stages) else {}
    raw = {
        "name": name.replace(" ", "_").replace("+", "and"),
        "samples_per_shard": 250,
        "ray": {"num_cpus": 2, "show_progress": False},
        "stages": [
            {"read": {"path": str(urls), "url_col": "url", "caption_col": "caption",
                      "save_additional_columns": ["is_mismatched", "true_colour", "true_shape"]}},
            {"download": DOWNLOAD},
            *stages,
            {"write": write},
        ],
    }  # fmt: skip
    pipe = config.from_dict(raw, source=f"bench:{name}", output=str(out))
    plan.check(pipe)
    return executor.run(pipe, overwrite=True)


def composition(out: Path) -> dict:
    """Kept samples, their mismatched share and distinct concepts (the generator's truth)."""
    import polars as pl

    df = pl.read_parquet(str(out / "*.parquet")).filter(pl.col("status") == "ok")
    return {
        "samples": df.height,
        # kept as text by read's save_additional_columns
        "mismatched": round(float((df["is_mismatched"].cast(pl.String) == "true").mean()), 4)
        if df.height
        else None,
        "distinct_urls": df["url"].n_unique(),
        "concepts": df.select(["true_colour", "true_shape"]).unique().height,
    }


def spread(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "values": xs}  # fmt: skip


def table(results: dict) -> str:
    head = (
        "| recipe | samples kept | distinct images | mismatched kept | concepts | samples seen (trainer) "
        "| zero-shot mean acc. (sd; min-max) | retrieval R@1 (sd) | retrieval R@5 (sd) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for name, r in results.items():
        c, z, r1, r5 = r["composition"], r["zeroshot"], r["R@1"], r["R@5"]
        seen = sorted(set(r["trainer_samples_seen"]))
        rows.append(
            f"| {name} | {c['samples']} | {c['distinct_urls']} | {c['mismatched']:.1%} | {c['concepts']} "
            f"| {', '.join(map(str, seen))} | {z['mean']:.1%} ({z['sd']:.1%}; {z['min']:.1%}-{z['max']:.1%}) "
            f"| {r1['mean']:.1%} ({r1['sd']:.1%}) | {r5['mean']:.1%} ({r5['sd']:.1%}) |"
        )
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/curation_value.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/clipcurate_value"))
    ap.add_argument("--n", type=int, default=1200, help="pairs in the pool's world")
    ap.add_argument("--world-seed", type=int, default=7)
    ap.add_argument("--mismatch-rate", type=float, default=0.5)
    ap.add_argument("--dup-share", type=float, default=0.15)
    ap.add_argument("--top-fraction", type=float, default=0.3)
    ap.add_argument("--t", type=int, default=20, help="MetaCLIP balance's per-entry cap")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples-seen", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded machine)")
    ap.add_argument("--parallel", type=int, default=3, help="training jobs at a time")
    ap.add_argument("--only", nargs="*", help="run only these recipes (names as in the table)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the tables from saved runs")
    ap.add_argument("--recurate", action="store_true", help="rerun the pipelines even where an output exists")
    a = ap.parse_args(argv)
    os.chdir(ROOT)
    a.out.mkdir(parents=True, exist_ok=True)
    t_start, load_start = time.time(), os.getloadavg()
    world = a.out / "world"
    if not (world / "world.parquet").exists():
        make_world(world, n=a.n, seed=a.world_seed, mismatch_rate=a.mismatch_rate, n_broken=0)
    evalset = a.out / "evalset"
    if not (evalset / "classes.parquet").exists():
        make_evalset(evalset)
    chosen = {k: v for k, v in recipes(a.top_fraction, a.t).items() if not a.only or k in a.only}
    outputs: dict[str, Path] = {}
    with serve(world) as base_url:
        urls = pool_list(world, base_url, a.dup_share, a.world_seed)
        for i, (name, stages) in enumerate(chosen.items()):
            out = a.out / f"recipe{i}"
            outputs[name] = out
            if (out / "manifest.json").exists() and not a.recurate:  # same args, same output
                print(f"[{name}] curated before: {out}", flush=True)
                continue
            t0 = time.time()
            m = curate(name, stages, urls, out)
            print(
                f"[{name}] {m['total_samples']} samples of {m['total_rows']} rows ({time.time() - t0:.0f}s)",
                flush=True,
            )
    from pipeline import ray as executor

    executor.shutdown()  # the training runs get the CPUs
    from pipeline.evaluate.config import load
    from pipeline.evaluate.run import evaluate

    # Jobs run --parallel at a time (each a nice trainer process and one torch thread); one output is
    # trained by one job at a time (its eval.json and work folder are per output).
    locks = {name: threading.Lock() for name in outputs}
    idx = {name: i for i, name in enumerate(outputs)}

    def job(name: str, seed: int) -> dict:
        cfg = load(None, [f"seed={seed}", f"samples_seen={a.samples_seen}", f"batch_size={a.batch_size}",
                          f"threads={a.threads}", f"classification={evalset / 'classes.parquet'}",
                          f"retrieval={evalset / 'captions.parquet'}", f"templates={json.dumps(list(TEMPLATES))}"])  # fmt: skip
        t0 = time.time()
        with locks[name]:
            ev = evaluate(str(outputs[name]), cfg)
        (a.out / f"recipe{idx[name]}-seed{seed}.json").write_text(json.dumps(ev, indent=1))
        print(f"[{name}] seed {seed}: zero-shot {ev['classification']['mean_accuracy']:.1%}, "
              f"R@1 {ev['retrieval']['mean_recall']['R@1']:.1%} ({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
        return ev

    jobs = [(name, seed) for seed in a.seeds for name in outputs]  # neighbours are different outputs
    if a.report_only:  # the tables again from the runs' saved eval.json copies
        done = {(n, s): json.loads((a.out / f"recipe{idx[n]}-seed{s}.json").read_text()) for n, s in jobs}
    else:
        with ThreadPoolExecutor(max_workers=a.parallel) as pool:
            done = dict(zip(jobs, pool.map(lambda j: job(*j), jobs)))
    results: dict = {}
    for name, out in outputs.items():
        runs = [done[(name, seed)] for seed in a.seeds]
        results[name] = {
            "composition": composition(out),
            "budget": runs[0]["budget"]["samples_seen"],
            "zeroshot": spread([r["classification"]["mean_accuracy"] for r in runs]),
            "R@1": spread([r["retrieval"]["mean_recall"]["R@1"] for r in runs]),
            "R@5": spread([r["retrieval"]["mean_recall"]["R@5"] for r in runs]),
            "trainer_samples_seen": [r["trainer"]["samples_seen"] for r in runs],
            "train_seconds": [r["trainer"]["seconds"] for r in runs],
        }
    md = table(results)
    meta = {
        "args": {k: str(v) for k, v in vars(a).items()},
        "seconds": round(time.time() - t_start),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (a.out / "results.md").write_text(md + "\n")
    print(md)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
