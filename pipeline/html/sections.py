"""The report's sections. Each keys off declarations and data, never a stage's name: score columns
from ``schemas/``, thresholds from stage configs and state summaries, entry counts from the shape of a
global stage's summary, failures from the stages that declare they fill the image column, labels and
extra sample columns from the workflow's ``report`` keys."""

from __future__ import annotations

import json

import numpy as np
import polars as pl

from pipeline.config import ReportConfig
from pipeline.html import charts
from pipeline.html.data import StageEntry, entry_columns, label_name, score_columns, stage_status, thresholds
from pipeline.html.markup import anchor, e, fmt_num, img, note, section, share, table
from pipeline.report import funnel_rows, input_rows
from pipeline.runs import RunDir
from schemas import OK
from schemas.row import SHARD_COL

MAX_REASON_ROWS = 30
MAX_HOST_ROWS = 15
MAX_ENTRY_ROWS = 15
HOST_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(\[[^\]]*\]|[^/:?#]*)"


def overview(manifest: dict, df: pl.DataFrame) -> str:
    ok = df.filter(pl.col("status") == OK).height
    kpis = [
        ("rows", df.height),
        ("kept (ok)", ok),
        ("rejected", df.height - ok),
        ("kept share", share(ok, df.height)),
        ("shards", df[SHARD_COL].n_unique() if df.height else 0),
        ("wall time", f"{manifest.get('wall_seconds', 0):.1f}s"),
    ]
    body = (
        '<div class="kpis">'
        + "".join(f'<div class="kpi"><b>{e(v)}</b>{e(k)}</div>' for k, v in kpis)
        + "</div>"
    )
    body += f'<p class="note">shards: {e(manifest.get("shard_pattern"))} &middot; '
    body += f"--train-num-samples {e(manifest.get('total_samples'))}</p>"
    if manifest.get("total_rows") is not None and manifest["total_rows"] != df.height:
        body += note(
            f"manifest.json counts {manifest['total_rows']} rows, the Parquet files {df.height}.", "warn"
        )
    n_in = input_rows(manifest)
    if n_in is not None and n_in != df.height:
        body += note(f"rows in != rows out: the input had {n_in} rows, the output has {df.height}.", "warn")
    return section("overview", "Overview", body)


def funnel(manifest: dict, df: pl.DataFrame, order: list[str]) -> str:
    ss = stage_status(df)
    rows = funnel_rows({
        "config": manifest.get("config", {}), "total_rows": df.height, "stage_status": ss,
        "stage_seconds": manifest.get("stage_seconds"), "stage_rows": manifest.get("stage_rows"),
    })  # fmt: skip
    remaining = rows[-1]["out"] if rows else df.height
    for stage in ss:  # rows rejected by a stage the config does not name (should not happen)
        if stage not in order:
            n = sum(ss[stage].values())
            rows.append({"stage": stage, "in": remaining, "rejected": ss[stage], "out": remaining - n,
                         "seconds": None, "rows_per_s": None})
            remaining -= n
    table_rows = []
    for r in rows:
        s, rate = r["seconds"], r["rows_per_s"]
        rej = ", ".join(f"{k}: {v}" for k, v in sorted(r["rejected"].items())) or "-"
        table_rows.append([r["stage"], r["in"], rej, r["out"], f"{s:.1f}" if s else "-", f"{rate:.0f}" if rate else "-"])
    headers = ["stage", "rows in", "rejected (status: rows)", "ok out", "busy s", "rows/s"]
    body = table(headers, table_rows, {1, 3, 4, 5})
    if manifest.get("stage_status") is not None and manifest["stage_status"] != ss:
        body += note("manifest.json per-stage counts differ from the Parquet files (shown here).", "warn")
    if rows:
        body += img(charts.funnel(rows), "funnel: rows per status per stage")
    return section("funnel", "Funnel: rows per status per stage", body)


def score_sections(manifest: dict, df: pl.DataFrame, rc: ReportConfig) -> list[str]:
    """One section per score column in the run's rows (``data.score_columns``: ``clip_score`` and
    the floating-point columns the stages write)."""
    return [_score_section(manifest, df, rc, col) for col in score_columns(manifest) if col in df.columns]


def _score_section(manifest: dict, df: pl.DataFrame, rc: ReportConfig, col: str) -> str:
    sid, title = f"{anchor(col)}s", f"Score distribution: {col}"
    scored = df.filter(pl.col(col).is_not_null() & pl.col(col).is_not_nan())
    if not scored.height:
        return section(sid, title, note(f"no {col} value in this run (all null or NaN)"))
    lines = [(label, v) for label, v, cols in thresholds(manifest) if col in cols]
    lc = rc.label_column
    if lc and lc in scored.columns and scored[lc].drop_nulls().len():
        values = sorted(scored[lc].cast(pl.String).unique().to_list(), key=lambda v: (v is None, v))
        groups = [(label_name(rc, v), pl.col(lc).cast(pl.String).eq_missing(v)) for v in values]
    else:
        groups = [("kept (ok)", pl.col("status") == OK), ("rejected", pl.col("status") != OK)]
    hist, rows = [], []
    for label, expr in groups:
        g = scored.filter(expr)
        hist.append((label, g[col].to_numpy()))
        kept = g.filter(pl.col("status") == OK).height
        rows.append([label, g.height, kept, share(kept, g.height)])
    scores = scored[col].to_numpy()
    q = np.quantile(scores, [0.0, 0.1, 0.5, 0.9, 1.0])
    body = img(charts.histogram(col, hist, lines), f"histogram of {col} with thresholds")
    body += f'<p class="note">{len(scores)} scored rows; min {q[0]:.4f}, p10 {q[1]:.4f}, median {q[2]:.4f}, '
    body += f"p90 {q[3]:.4f}, max {q[4]:.4f}. Thresholds: "
    body += (", ".join(f"{e(k)} = {v:.4f}" for k, v in lines) or "none") + "</p>"
    body += table(["rows", "scored", "kept at the end", "kept share"], rows, {1, 2, 3})
    return section(sid, title, body)


def entry_section(rd: RunDir, manifest: dict, df: pl.DataFrame, stage: StageEntry) -> str:
    """Entry counts before (the fitted state's ``counts``) and after (entries of the kept rows) a
    global stage whose state summary ranks entries (``top_entries``), e.g. MetaCLIP balancing."""
    sid, title = anchor(stage.name), f"Entry counts before and after {stage.name}"
    summary = manifest["global_state"][stage.name]
    path = rd.state_path(stage.index, stage.name)
    state = rd.read_json(path) if rd.exists(path) else {}
    if not isinstance(state.get("counts"), list):
        return section(sid, title, note(f"{stage.name} ran, but its fitted entry counts are missing", "warn"))
    before = np.asarray(state["counts"], dtype=np.int64)
    t = summary.get("t", state.get("t"))
    t = int(t) if t is not None else None
    after = np.zeros_like(before)
    for c in (c for c in entry_columns(stage) if c in df.columns):
        ids = (
            df.filter(pl.col("status") == OK)
            .select(pl.col(c).explode().drop_nulls().alias("e"))
            .group_by("e")
            .len()
        )
        for i, n in ids.iter_rows():
            if 0 <= i < len(after):
                after[i] += n
    body = img(charts.rank_plot(before, after, t), "log-log rank plot of entry counts before and after")
    cut = t if t is not None else 0

    def tail(c):
        return c[c < cut].sum() / c.sum() if c.sum() else 0.0

    body += (
        f'<p class="note">t = {t}; entries matched {int((before > 0).sum())} before, {int((after > 0).sum())} after; '
        f"head entries (count &gt; t) {int((before > cut).sum())} before, {int((after > cut).sum())} after; "
        f"tail share of matches {tail(before):.1%} before, {tail(after):.1%} after; "
        f"pool rows {e(state.get('pool_rows'))}, matched {e(state.get('matched_rows'))}.</p>"
    )
    names = {x.get("id"): x.get("entry") for x in summary.get("top_entries", []) if isinstance(x, dict)}
    rows = [
        [int(i), names.get(int(i)) or f"#{int(i)}", int(before[i]), int(after[i]),
         f"{min(1.0, t / before[i]):.3g}" if t is not None else "-"]
        for i in np.argsort(-before, kind="stable")[:MAX_ENTRY_ROWS]
        if before[i] > 0
    ]  # fmt: skip
    body += "<h3>Most frequent entries</h3>"
    body += table(["id", "entry", "before", "after", "p = t / count"], rows, {0, 2, 3, 4})
    return section(sid, title, body)


def label_section(df: pl.DataFrame, rc: ReportConfig, order: list[str]) -> str:
    """Rows per value of the workflow's label column: kept, and rejected per stage."""
    col = rc.label_column
    title = f"Rows by label ({col})"
    if col not in df.columns:
        return section(
            "labels", title, note(f"the label column {col} is not in the shard Parquet files", "warn")
        )
    lab = df.with_columns(pl.col(col).cast(pl.String).alias("_label"))
    rejecting = [s for s in order if lab.filter(pl.col("rejected_by") == s).height]
    rows = []
    for value in sorted(lab["_label"].unique().to_list(), key=lambda v: (v is None, v)):
        g = lab.filter(pl.col("_label").eq_missing(value))
        kept = g.filter(pl.col("status") == OK).height
        rej = [g.filter((pl.col("status") != OK) & (pl.col("rejected_by") == s)).height for s in rejecting]
        rows.append([label_name(rc, value), value, g.height, kept, share(kept, g.height), *rej])
    headers = ["label", "value", "rows", "kept", "kept share", *(f"rejected by {s}" for s in rejecting)]
    body = table(headers, rows, set(range(2, len(headers))) - {4})
    return section("labels", title, body)


def failure_section(df: pl.DataFrame, stage: StageEntry) -> str:
    """Rows rejected by a stage that fills the image column: by status, rule (the ``rule`` column;
    the reason's first word in runs from before rule tags), host, and full reason."""
    name = stage.name
    sid, title = f"{anchor(name)}-failures", f"Failures of {name} (fills the image column)"
    failed = df.filter((pl.col("rejected_by") == name) & (pl.col("status") != OK))
    if not failed.height:
        return section(sid, title, note(f"no row failed in {name}"))
    failed = failed.with_columns(pl.col("reason").fill_null("").str.slice(0, 300))
    body = (
        f"<p>{failed.height} of {df.height} rows failed to {e(name)} ({share(failed.height, df.height)}).</p>"
    )
    by_status = failed.group_by("status").len().sort(["len", "status"], descending=[True, False])
    body += table(["status", "rows"], [list(r) for r in by_status.iter_rows()], {1})
    tagged = "rule" in failed.columns and failed["rule"].null_count() < failed.height
    what = pl.col("rule") if tagged else pl.col("reason").str.split(" ").list.first()
    cls = failed.with_columns(what.alias("_class"))
    by_class = (
        cls.group_by(["status", "_class"])
        .len()
        .sort(["len", "status", "_class"], descending=[True, False, False])
    )
    body += "<h3>By rule</h3>" if tagged else "<h3>By class (first word of the reason)</h3>"
    headers = ["status", "rule" if tagged else "class", "rows"]
    body += table(headers, [list(r) for r in by_class.iter_rows()], {2})
    host = pl.col("host") if "host" in df.columns else None
    if host is None and "url" in df.columns:
        host = pl.col("url").str.extract(HOST_PATTERN, 1)
    if host is not None:
        hosts = failed.select(host.fill_null("?").alias("_host")).group_by("_host").len()
        hosts = hosts.sort(["len", "_host"], descending=[True, False])
        body += f"<h3>Top hosts ({hosts.height} distinct)</h3>"
        body += table(["host", "rows"], [list(r) for r in hosts.head(MAX_HOST_ROWS).iter_rows()], {1})
    by_reason = (
        failed.group_by(["status", "reason"])
        .len()
        .sort(["len", "status", "reason"], descending=[True, False, False])
    )
    body += "<h3>Reasons</h3>"
    body += table(
        ["status", "reason", "rows"], [list(r) for r in by_reason.head(MAX_REASON_ROWS).iter_rows()], {2}
    )
    if by_reason.height > MAX_REASON_ROWS:
        body += note(f"{by_reason.height - MAX_REASON_ROWS} more distinct reasons not shown.")
    return section(sid, title, body)


def metadata(manifest: dict) -> str:
    import yaml

    keys = ["name", "output", "started_at", "finished_at", "wall_seconds", "resumed", "input_rows", "total_rows",
            "total_samples", "shard_pattern", "config_hash", "version"]  # fmt: skip
    body = table(["field", "value"], [[k, fmt_num(manifest.get(k))] for k in keys if k in manifest])
    body += "<h3>Models</h3>"
    body += f"<pre>{e(json.dumps(manifest.get('models', {}), indent=1))}</pre>"
    body += "<h3>Versions</h3>" + table(["package", "version"], sorted(manifest.get("versions", {}).items()))
    if manifest.get("global_state"):
        body += "<h3>Fitted global state (summary)</h3>"
        body += f"<pre>{e(json.dumps(manifest['global_state'], indent=1))}</pre>"
    body += "<h3>Resolved config</h3>"
    body += f"<pre>{e(yaml.safe_dump(manifest.get('config', {}), sort_keys=False))}</pre>"
    return section("metadata", "Run metadata", body)
