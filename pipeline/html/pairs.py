"""The ``pairs`` section: rejected rows whose reason names the row they lost to (``... key K ...``, as the
exact, perceptual and semantic dedup stages write it, or any stage of that form), counted per (stage, rule)
and shown side by side with that row; and the histograms of the global state summaries (any summary value
named ``*_histogram``: a dict of bucket -> count, such as a clustering's cluster sizes).

The rejected picture is the ``thumbnail`` the run kept for a bounded sample of rejected rows; the kept one is
the row's image from the shard tars when it is ``ok``, else its thumbnail. Pairs with both pictures are shown
first."""

from __future__ import annotations

import base64

import polars as pl

from pipeline.config import ReportConfig
from pipeline.html.data import read_images
from pipeline.html.markup import e, note, section, table, thumb
from pipeline.html.samples import card, with_rule
from pipeline.runs import RunDir
from schemas import OK
from schemas.row import SHARD_COL, TAR_COLUMN, THUMBNAIL_COLUMN

PAIRS_PER_RULE = 4
KEY_IN_REASON = r"\bkey ([^\s,;()]+)"


def named_pairs(df: pl.DataFrame) -> pl.DataFrame:
    """Rejected rows whose reason names a key of this run: ``_kept`` (that key), ``_rule``, ``_has_thumb``."""
    if "reason" not in df.columns or not df.height:
        return pl.DataFrame()
    rej = with_rule(df.filter((pl.col("status") != OK) & pl.col("reason").is_not_null()))
    rej = rej.with_columns(pl.col("reason").str.extract(KEY_IN_REASON, 1).alias("_kept"))
    rej = rej.filter(pl.col("_kept").is_not_null() & pl.col("_kept").is_in(df["key"].implode()))
    thumb_col = pl.col(THUMBNAIL_COLUMN).is_not_null() if THUMBNAIL_COLUMN in rej.columns else pl.lit(False)
    return rej.with_columns(thumb_col.alias("_has_thumb"))


def _uri(data: bytes | None) -> str | None:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode() if data else None


def histograms(manifest: dict) -> str:
    out = ""
    for stage, summary in sorted((manifest.get("global_state") or {}).items()):
        for name, hist in sorted((summary or {}).items()):
            if name.endswith("histogram") and isinstance(hist, dict) and hist:
                rows = [[k, v] for k, v in hist.items()]
                out += f"<h3>{e(stage)} &middot; {e(name.replace('_', ' '))}</h3>" + table(
                    ["bucket", "count"], rows, {1}
                )
    return out


def pairs_section(rd: RunDir, manifest: dict, df: pl.DataFrame, rc: ReportConfig) -> str | None:
    pairs = named_pairs(df)
    hist = histograms(manifest)
    if not pairs.height and not hist:
        return None
    body = ""
    if pairs.height:
        groups = (
            pairs.group_by(["rejected_by", "status", "_rule"])
            .agg(pl.len().alias("rows"), pl.col("_has_thumb").sum().alias("thumbnails"))
            .sort(["rejected_by", "_rule"])
        )
        body += "<p>Rows rejected in favour of another row of the run (the reason names its key), per stage and rule.</p>"
        body += table(
            ["stage", "status", "rule", "rows", "thumbnails"], [list(r) for r in groups.iter_rows()], {3, 4}
        )
        by_key = {r["key"]: r for r in df.filter(pl.col("key").is_in(pairs["_kept"].implode())).to_dicts()}
        shown = []
        for stage, status, rule, _, _ in groups.iter_rows():
            g = pairs.filter(
                (pl.col("rejected_by") == stage) & (pl.col("status") == status) & (pl.col("_rule") == rule)
            )
            g = g.with_columns(
                pl.col("_kept")
                .is_in([k for k, r in by_key.items() if r.get("status") == OK])
                .alias("_kept_ok")
            )
            g = g.sort(["_has_thumb", "_kept_ok", "key"], descending=[True, True, False]).head(PAIRS_PER_RULE)
            shown.append((stage, rule, g.to_dicts()))
        wanted: dict[str, list[str]] = {}
        for _, _, rows in shown:
            for row in rows:
                kept = by_key.get(row["_kept"])
                if kept and kept.get("status") == OK:
                    wanted.setdefault(kept.get(TAR_COLUMN) or kept[SHARD_COL], []).append(kept["key"])
        images = read_images(rd, wanted)
        for stage, rule, rows in shown:
            body += f"<h3>{e(stage)} &middot; {e(rule)}</h3>"
            for row in rows:
                kept = by_key.get(row["_kept"], {"key": row["_kept"]})
                data = images.get(kept["key"])
                kept_uri = thumb(data) if data else _uri(kept.get(THUMBNAIL_COLUMN))
                left = card(row, _uri(row.get(THUMBNAIL_COLUMN)), rc)
                body += f'<div class="grid pair">{left}{card(kept, kept_uri, rc)}</div>'
    if hist:
        body += hist
    if not body:
        body = note("none")
    return section("pairs", "Duplicates side by side", body)
