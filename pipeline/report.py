"""What a person sees: live per-stage counters, the end-of-run summary, and ``report.html``.

The summary's numbers come from ``manifest.json``, which the executor builds from the shards'
``_stats.json``; so they are the numbers on disk, not a separate count.
"""

from __future__ import annotations

import sys
import time

from pipeline.manifest import entering
from schemas import OK


class ProgressPrinter:
    """Prints one line of per-stage counters each time it is called (the executor calls it every
    10 s; stderr): the rows each stage has processed so far (the ``ok`` rows it got; every row for the
    source and the sink), and after ``-`` the rows it rejected."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.t0 = time.time()

    def __call__(self, snap: dict) -> None:
        parts = []
        for stage, rows in snap.get("processed", snap["rows"]).items():
            rej = sum(snap["status"].get(stage, {}).values())
            parts.append(f"{stage} {rows}" + (f" (-{rej})" if rej else ""))
        if parts:
            print(f"[clipcurate {time.time() - self.t0:6.0f}s] " + " | ".join(parts), file=self.stream, flush=True)


def funnel_rows(manifest: dict) -> list[dict]:
    """The funnel, one row per stage in pipeline order (``config.stages``); the one computation behind
    the terminal summary and ``report.html``. Per stage:

    * ``in``: rows that entered it as ``ok`` (total rows minus the rows earlier stages rejected),
      ``rejected`` (status -> rows) and ``out`` (``ok`` rows after it);
    * ``processed``: rows it processed: ``in``, or every row for the source and the sink (first, last);
    * ``seconds``: its busy seconds in this run (``stage_seconds``), and ``rows_per_s``: processed rows
      per busy second. The executor's ``stage_rows`` count the rows a stage passed through in this run;
      on a resumed run that is a share of the total, and ``processed`` is scaled by that share.
    """
    order = [next(iter(s)) for s in manifest["config"]["stages"]]
    total = manifest["total_rows"]
    secs = manifest.get("stage_seconds") or {}
    passed = manifest.get("stage_rows") or {}
    status = {**manifest["stage_status"], order[0]: {}}  # the source rejects nothing it reads
    out = []
    for i, (name, remaining) in enumerate(zip(order, entering(order, status, total))):
        source, sink = i == 0, i == len(order) - 1
        rejected = status.get(name, {})
        n_rej = sum(rejected.values())
        processed = total if source or sink else remaining
        s, n = secs.get(name), passed.get(name)
        rate = processed * min(1.0, n / total) / s if s and n and total else None
        out.append(
            {
                "stage": name,
                "in": remaining,
                "rejected": rejected,
                "out": remaining - n_rej,
                "processed": processed,
                "seconds": s,
                "rows_per_s": rate,
            }
        )
    return out


def input_rows(manifest: dict) -> int | None:
    """Rows the input had (``input_rows``), or None when they were not counted before the run: a
    source that counts its rows only as it reads them (WebDataset tars) records 0, and a 0-row input
    cannot give rows out; manifests from before ``input_rows`` lack it."""
    n = manifest.get("input_rows")
    if n is None or n == 0 and manifest.get("total_rows", 0) > 0:
        return None
    return n


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
    for r in funnel_rows(manifest):
        rej = ", ".join(f"{k}: {v}" for k, v in sorted(r["rejected"].items())) or "-"
        t.add_row(
            r["stage"],
            str(r["in"]),
            rej,
            str(r["out"]),
            f"{r['seconds']:.1f}" if r["seconds"] else "-",
            f"{r['rows_per_s']:.0f}" if r["rows_per_s"] else "-",
        )
    console.print(t)
    sc = manifest["status_counts"]
    n_in, n_out = input_rows(manifest), manifest["total_rows"]
    console.print(
        f"rows: {'?' if n_in is None else n_in} in, {n_out} out "
        f"({sc.get(OK, 0)} ok samples in {len(manifest['shards'])} shards)"
        + ("  [resumed]" if manifest.get("resumed") else "")
        + ("  (WebDataset input: rows are counted as the tars are loaded)" if n_in is None else ""),
        markup=False,  # "[resumed]" is text, not a rich style tag
    )
    if n_in is not None and n_in != n_out:
        what = (
            f"{n_in - n_out} of the {n_in} input rows are missing from the output"
            if n_in > n_out
            else f"the output has {n_out - n_in} rows more than the {n_in} input rows"
        )
        console.print(f"[bold red]ROWS IN != ROWS OUT: {what}[/bold red]", highlight=False)
    console.print(f"wall time: {manifest['wall_seconds']:.1f}s")
    console.print(f"output:   {manifest['output']}")
    console.print(f"shards:   {manifest['shard_pattern']}  (--train-num-samples {manifest['total_samples']})")
    console.print(f"manifest: {manifest['output'].rstrip('/')}/manifest.json")
    if report_path:
        console.print(f"report:   {report_path}")


def build_html(output: str) -> str:
    from pipeline.html import build

    return build(output)
