"""The sample grid: kept rows (images read back from the shard tars) and rejected rows (round-robin
over the rejection statuses), each with its caption, rewrites, scores, reason, and the workflow's
label and extra columns (``report.label_column``, ``report.show_columns``)."""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.config import ReportConfig
from pipeline.html.data import label_name, read_images
from pipeline.html.markup import e, img, section, thumb
from pipeline.runs import RunDir
from schemas import OK
from schemas.row import REWRITES_COLUMN, SCORE_COLUMNS, SHARD_COL, TAR_COLUMN

SAMPLES_PER_GROUP = 12  # kept and rejected: at most 24 cards


def _spread(df: pl.DataFrame, n: int) -> pl.DataFrame:
    """``n`` rows spread evenly over ``df`` sorted by key (deterministic)."""
    if df.height <= n:
        return df.sort("key")
    idx = np.linspace(0, df.height - 1, n).round().astype(int)
    return df.sort("key")[idx.tolist()]


def pick_samples(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Up to ``SAMPLES_PER_GROUP`` kept rows (from as few shards as possible: their images are read
    from the tars) and as many rejected rows, round-robin over the rejection statuses."""
    ok = df.filter(pl.col("status") == OK)
    per_shard = ok.group_by(SHARD_COL).len().sort(SHARD_COL)
    shards, n = [], 0
    for shard, count in per_shard.iter_rows():
        if n >= SAMPLES_PER_GROUP:
            break
        shards.append(shard)
        n += count
    kept = _spread(ok.filter(pl.col(SHARD_COL).is_in(shards)), SAMPLES_PER_GROUP)
    rej = df.filter(pl.col("status") != OK)
    groups = sorted(rej.partition_by("status", as_dict=False), key=lambda g: -g.height) if rej.height else []
    # round-robin over statuses (most frequent first), so rare statuses are shown too
    per = [_spread(g, SAMPLES_PER_GROUP).to_dicts() for g in groups]
    picked = []
    while len(picked) < SAMPLES_PER_GROUP and any(per):
        for lst in per:
            if lst and len(picked) < SAMPLES_PER_GROUP:
                picked.append(lst.pop(0))
    rejected = pl.DataFrame(picked, schema=rej.schema) if picked else rej.head(0)
    return kept, rejected


def card(row: dict, image_uri: str | None, rc: ReportConfig) -> str:
    ok = row.get("status") == OK
    pic = (
        img(image_uri, f"sample {row.get('key')}", cls="thumb")
        if image_uri
        else '<div class="noimg">no image bytes (rejected rows keep none)</div>'
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
        parts.append(f'<p class="note">{e(row.get("rejected_by"))}: {e(row.get("reason"))}</p>')
    extra = " ".join(str(row[c]) for c in rc.show_columns if row.get(c) is not None)
    if rc.label_column and row.get(rc.label_column) is not None:
        label = label_name(rc, row[rc.label_column])
        parts.append(f'<p class="note">label: {e(label)}{" (" + e(extra) + ")" if extra else ""}</p>')
    elif extra:
        parts.append(f'<p class="note">{e(extra)}</p>')
    return f'<div class="card">{pic}<div>{"".join(parts)}</div></div>'


def samples(rd: RunDir, df: pl.DataFrame, rc: ReportConfig) -> str:
    kept, rejected = pick_samples(df)
    wanted: dict[str, list[str]] = {}
    tars = kept[TAR_COLUMN] if TAR_COLUMN in kept.columns else [None] * kept.height  # None: the shard's own
    for shard, tar, key in zip(kept[SHARD_COL], tars, kept["key"]):
        wanted.setdefault(tar or shard, []).append(key)
    images = read_images(rd, wanted)
    body = ""
    for title, part in (("Kept", kept), ("Rejected", rejected)):
        cards = []
        for row in part.to_dicts():
            data = images.get(row["key"])
            cards.append(card(row, thumb(data) if data else None, rc))
        body += f"<h3>{title} ({part.height} shown)</h3>"
        body += f'<div class="grid">{"".join(cards)}</div>' if cards else '<p class="note">none</p>'
    return section("samples", "Sample images, kept and rejected", body)
