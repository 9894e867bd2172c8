"""What a person sees: live per-stage counters, the end-of-run summary, and ``report.html``.

The summary's numbers come from ``manifest.json``, which the executor builds from the shards'
``_stats.json``; so they are the numbers on disk, not a separate count.
"""

from __future__ import annotations

import sys
import time

from schemas import OK


class ProgressPrinter:
    """Prints one line of per-stage row counters every few seconds (stderr), beside Ray Data's bars."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.t0 = time.time()

    def __call__(self, snap: dict) -> None:
        parts = []
        for stage, rows in snap["rows"].items():
            rej = sum(snap["status"].get(stage, {}).values())
            parts.append(f"{stage} {rows}" + (f" (-{rej})" if rej else ""))
        if parts:
            print(f"[clipcurate {time.time() - self.t0:6.0f}s] " + " | ".join(parts), file=self.stream, flush=True)


def funnel_rows(manifest: dict) -> list[dict]:
    """One row per stage, in pipeline order: rows rejected by that stage per status."""
    order = [next(iter(s)) for s in manifest["config"]["stages"]]
    out = []
    remaining = manifest["total_rows"]
    for i, name in enumerate(order):
        rejected = manifest["stage_status"].get(name, {})
        n_rej = sum(rejected.values())
        if i == 0:  # the source
            out.append({"stage": name, "in": manifest["total_rows"], "rejected": {}, "out": remaining})
            continue
        out.append({"stage": name, "in": remaining, "rejected": rejected, "out": remaining - n_rej})
        remaining -= n_rej
    return out


def print_summary(manifest: dict, report_path: str | None = None, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=120)
    t = Table(title=f"clipcurate: {manifest['name']}", show_lines=False)
    t.add_column("stage")
    t.add_column("rows in", justify="right")
    t.add_column("rejected (status: rows)")
    t.add_column("ok out", justify="right")
    t.add_column("busy s", justify="right")
    t.add_column("rows/s", justify="right")
    secs = manifest.get("stage_seconds", {})
    rows = manifest.get("stage_rows", {})
    for r in funnel_rows(manifest):
        s = secs.get(r["stage"])
        n = rows.get(r["stage"])
        rej = ", ".join(f"{k}: {v}" for k, v in sorted(r["rejected"].items())) or "-"
        t.add_row(
            r["stage"],
            str(r["in"]),
            rej,
            str(r["out"]),
            f"{s:.1f}" if s else "-",
            f"{n / s:.0f}" if s and n else "-",
        )
    console.print(t)
    sc = manifest["status_counts"]
    console.print(
        f"rows: {manifest['total_rows']} in, {manifest['total_rows']} out "
        f"({sc.get(OK, 0)} ok samples in {len(manifest['shards'])} shards)"
        + ("  [resumed]" if manifest.get("resumed") else "")
    )
    console.print(f"wall time: {manifest['wall_seconds']:.1f}s")
    console.print(f"output:   {manifest['output']}")
    console.print(f"shards:   {manifest['shard_pattern']}  (--train-num-samples {manifest['total_samples']})")
    console.print(f"manifest: {manifest['output'].rstrip('/')}/manifest.json")
    if report_path:
        console.print(f"report:   {report_path}")


def build_html(output: str) -> str:
    from pipeline.html import build

    return build(output)
