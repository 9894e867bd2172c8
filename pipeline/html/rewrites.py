"""Caption rewrites: how many rows got all their rewrites, some, or none (and kept the original
caption), and why generations were rejected. From two columns, ``schemas.row.REWRITES_COLUMN`` (the
list of rewrites; null on rows that never reached the rewriting stage) and ``REWRITE_REASON_COLUMN``
(null when all the rewrites asked for succeeded, else why not, e.g. ``2/4 rewrites; rejected: empty x3,
echo x1``, whose ``KIND xN`` items are counted here)."""

from __future__ import annotations

import re

import polars as pl

from pipeline.html.markup import anchor, note, section, share, table
from schemas.row import REWRITE_REASON_COLUMN, REWRITES_COLUMN

MAX_KINDS = 15
_ITEM = re.compile(r"^(\S+).* x(\d+)$")  # "too_long x3", "http_error 503 x2" -> kind, count


def outcomes(df: pl.DataFrame) -> list[list]:
    """(outcome, rows, share) over the rows that reached the rewriting stage."""
    got = df.filter(pl.col(REWRITES_COLUMN).is_not_null())
    n = pl.col(REWRITES_COLUMN).list.len()
    why = pl.col(REWRITE_REASON_COLUMN) if REWRITE_REASON_COLUMN in got.columns else pl.lit(None, pl.String)
    groups = [
        ("all rewrites asked for", (n > 0) & why.is_null()),
        ("some rewrites (partial)", (n > 0) & why.is_not_null()),
        ("none: original caption kept", n == 0),
    ]
    rows = []
    for label, expr in groups:
        k = got.filter(expr).height
        rows.append([label, k, share(k, got.height)])
    return rows


def rejected_kinds(df: pl.DataFrame) -> list[list]:
    """(kind, generations rejected, rows with it) from the reasons' ``KIND xN`` items; reasons without
    such items (e.g. ``no caption``) count as their own kind with one per row."""
    if REWRITE_REASON_COLUMN not in df.columns:
        return []
    gens: dict[str, int] = {}
    rows: dict[str, int] = {}
    for reason in df[REWRITE_REASON_COLUMN].drop_nulls().to_list():
        tail = reason.split(": ", 1)[1] if ": " in reason else reason
        found: dict[str, int] = {}
        for item in tail.split(", "):
            m = _ITEM.match(item.strip())
            if m:
                found[m.group(1)] = found.get(m.group(1), 0) + int(m.group(2))
        if not found:
            found = {reason: 1}
        for kind, count in found.items():
            gens[kind] = gens.get(kind, 0) + count
            rows[kind] = rows.get(kind, 0) + 1
    order = sorted(gens, key=lambda k: (-gens[k], k))
    return [[k, gens[k], rows[k]] for k in order]


def rewrites_section(df: pl.DataFrame) -> str | None:
    """The section (id: the rewrites column), or None when the rows have no rewrites column."""
    if REWRITES_COLUMN not in df.columns:
        return None
    sid, title = anchor(REWRITES_COLUMN), f"Caption rewrites ({REWRITES_COLUMN})"
    reached = df.filter(pl.col(REWRITES_COLUMN).is_not_null()).height
    if not reached:
        return section(sid, title, note("no row reached the rewriting stage"))
    total = int(df.select(pl.col(REWRITES_COLUMN).list.len().sum()).item() or 0)
    body = f"<p>{reached} rows reached the rewriting stage; {total} rewrites in all.</p>"
    body += table(["outcome", "rows", "share"], outcomes(df), {1, 2})
    kinds = rejected_kinds(df)
    if kinds:
        body += f"<h3>Why generations were rejected ({REWRITE_REASON_COLUMN})</h3>"
        body += table(["kind", "generations rejected", "rows"], kinds[:MAX_KINDS], {1, 2})
        if len(kinds) > MAX_KINDS:
            body += note(f"{len(kinds) - MAX_KINDS} more kinds not shown.")
    return section(sid, title, body)
