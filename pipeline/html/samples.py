"""The sample grids: kept rows (their images from the shard tars), and rejected rows by status and
rule (pictures from the ``thumbnail`` column: the run keeps one for a bounded sample of rejected rows
whose image bytes existed), each with its caption, rewrites, scores, reason, and the workflow's label
and extra columns (``report.label_column``, ``report.show_columns``)."""

from __future__ import annotations

import base64

import numpy as np
import polars as pl

from pipeline.config import ReportConfig
from pipeline.html.data import label_name, read_images
from pipeline.html.markup import e, img, note, section, table, thumb
from pipeline.runs import RunDir
from schemas import OK
from schemas.row import REWRITES_COLUMN, SCORE_COLUMNS, SHARD_COL, TAR_COLUMN, THUMBNAIL_COLUMN

SAMPLES_PER_GROUP = 12  # kept samples shown
REJECTED_PER_RULE = 4  # rejected samples shown per (status, rule)
MAX_RULE_GROUPS = 24  # (status, rule) pairs shown with samples (all are in the table)


def _spread(df: pl.DataFrame, n: int) -> pl.DataFrame:
    """``n`` rows spread evenly over ``df`` sorted by key (deterministic)."""
    if df.height <= n:
        return df.sort("key")
    idx = np.linspace(0, df.height - 1, n).round().astype(int)
    return df.sort("key")[idx.tolist()]


def pick_kept(df: pl.DataFrame) -> pl.DataFrame:
    """Up to ``SAMPLES_PER_GROUP`` kept rows, from as few shards as possible (their images are read
    from the tars)."""
    ok = df.filter(pl.col("status") == OK)
    per_shard = ok.group_by(SHARD_COL).len().sort(SHARD_COL)
    shards, n = [], 0
    for shard, count in per_shard.iter_rows():
        if n >= SAMPLES_PER_GROUP:
            break
        shards.append(shard)
        n += count
    return _spread(ok.filter(pl.col(SHARD_COL).is_in(shards)), SAMPLES_PER_GROUP)


def rule_groups(df: pl.DataFrame) -> pl.DataFrame:
    """Rejected rows per (status, rule): ``status``, ``rule`` (the status where a row has none),
    ``rows``, ``thumbnails``; most rows first."""
    rej = with_rule(df.filter(pl.col("status") != OK))
    has = pl.col(THUMBNAIL_COLUMN).is_not_null() if THUMBNAIL_COLUMN in rej.columns else pl.lit(False)
    return (
        rej.group_by(["status", "_rule"])
        .agg(pl.len().alias("rows"), has.sum().alias("thumbnails"))
        .rename({"_rule": "rule"})
        .sort(["rows", "status", "rule"], descending=[True, False, False])
    )


def with_rule(df: pl.DataFrame) -> pl.DataFrame:
    """``df`` with ``_rule``: the ``rule`` column, else the status (runs from before rule tags)."""
    rule = pl.col("rule") if "rule" in df.columns else pl.lit(None, pl.String)
    return df.with_columns(pl.coalesce(rule, pl.col("status")).alias("_rule"))


def pick_rejected(df: pl.DataFrame, status: str, rule: str) -> pl.DataFrame:
    """Up to ``REJECTED_PER_RULE`` rows of one (status, rule): rows with a thumbnail first."""
    g = with_rule(df.filter(pl.col("status") == status)).filter(pl.col("_rule") == rule)
    if THUMBNAIL_COLUMN in g.columns:
        with_thumb = g.filter(pl.col(THUMBNAIL_COLUMN).is_not_null())
        without = g.filter(pl.col(THUMBNAIL_COLUMN).is_null()).sort("key")
        g = pl.concat([_spread(with_thumb, REJECTED_PER_RULE), without])
    else:
        g = g.sort("key")
    return g.head(REJECTED_PER_RULE)


def card(row: dict, image_uri: str | None, rc: ReportConfig) -> str:
    ok = row.get("status") == OK
    pic = (
        img(image_uri, f"sample {row.get('key')}", cls="thumb")
        if image_uri
        else '<div class="noimg">no image (none downloaded, or not in the thumbnail sample)</div>'
    )
    badge = f'<span class="badge {"ok" if ok else "bad"}">{e(row.get("status"))}</span>'
    parts = [f"<p><b>{e(row.get('key'))}</b> {badge}</p>", f"<p>{e(row.get('caption'))}</p>"]
    for col in SCORE_COLUMNS:
        if isinstance(row.get(col), float):
            parts.append(f"<p>{e(col)} {row[col]:.4f}</p>")
    rw = row.get(REWRITES_COLUMN)
    if rw:
        parts.append('<p>rewrites:</p><ul class="rw">' + "".join(f"<li>{e(r)}</li>" for r in rw) + "</ul>")
    if not ok:
        rule = f" [{row['rule']}]" if row.get("rule") else ""
        parts.append(f'<p class="note">{e(row.get("rejected_by"))}{e(rule)}: {e(row.get("reason"))}</p>')
    extra = " ".join(str(row[c]) for c in rc.show_columns if row.get(c) is not None)
    if rc.label_column and row.get(rc.label_column) is not None:
        label = label_name(rc, row[rc.label_column])
        parts.append(f'<p class="note">label: {e(label)}{" (" + e(extra) + ")" if extra else ""}</p>')
    elif extra:
        parts.append(f'<p class="note">{e(extra)}</p>')
    return f'<div class="card">{pic}<div>{"".join(parts)}</div></div>'


def samples(rd: RunDir, df: pl.DataFrame, rc: ReportConfig) -> str:
    kept = pick_kept(df)
    wanted: dict[str, list[str]] = {}
    tars = kept[TAR_COLUMN] if TAR_COLUMN in kept.columns else [None] * kept.height  # None: the shard's own
    for shard, tar, key in zip(kept[SHARD_COL], tars, kept["key"]):
        wanted.setdefault(tar or shard, []).append(key)
    images = read_images(rd, wanted)
    cards = []
    for row in kept.to_dicts():
        data = images.get(row["key"])
        cards.append(card(row, thumb(data) if data else None, rc))
    body = f"<p>{kept.height} of the kept rows, with their images from the shard tars.</p>"
    body += f'<div class="grid">{"".join(cards)}</div>' if cards else '<p class="note">none</p>'
    return section("samples", "Sample images, kept", body)


def rejected(df: pl.DataFrame, rc: ReportConfig) -> str:
    """Rejected rows by status and rule, each group with a few samples; the picture is the small
    thumbnail the run kept for a bounded sample of rejected rows (``thumbnail`` column)."""
    groups = rule_groups(df)
    n_rej = int(groups["rows"].sum()) if groups.height else 0
    if not n_rej:
        return section("rejected", "Rejected samples by status and rule", note("no row was rejected"))
    body = f"<p>{n_rej} of {df.height} rows rejected, under {groups.height} (status, rule) pairs.</p>"
    body += table(["status", "rule", "rows", "thumbnails"], [list(r) for r in groups.iter_rows()], {2, 3})
    for status, rule, rows, _ in groups.head(MAX_RULE_GROUPS).iter_rows():
        cards = []
        for row in pick_rejected(df, status, rule).to_dicts():
            data = row.get(THUMBNAIL_COLUMN)
            uri = "data:image/jpeg;base64," + base64.b64encode(data).decode() if data else None
            cards.append(card(row, uri, rc))
        body += f"<h3>{e(status)} &middot; {e(rule)} ({rows} rows)</h3>"
        body += f'<div class="grid">{"".join(cards)}</div>'
    if groups.height > MAX_RULE_GROUPS:
        body += note(f"{groups.height - MAX_RULE_GROUPS} more (status, rule) pairs not shown.")
    return section("rejected", "Rejected samples by status and rule", body)
