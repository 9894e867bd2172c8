"""Per-language thresholds of a global stage whose state summary lists ``languages`` (each with a
``language`` and its ``t``), e.g. worldwide MetaCLIP balancing: the fitted numbers from the manifest,
and per language the rows the stage dropped and the rows kept at the end, from the row column the
summary names (``language_column``)."""

from __future__ import annotations

import polars as pl

from pipeline.html.data import StageEntry
from pipeline.html.markup import anchor, e, section, share, table
from schemas import OK


def language_stages(manifest: dict, stages: list[StageEntry]) -> list[StageEntry]:
    gs = manifest.get("global_state") or {}
    return [s for s in stages if isinstance((gs.get(s.name) or {}).get("languages"), list)]


def language_columns(manifest: dict, stages: list[StageEntry]) -> list[str]:
    gs = manifest.get("global_state") or {}
    cols = [(gs.get(s.name) or {}).get("language_column") for s in language_stages(manifest, stages)]
    return [c for c in cols if isinstance(c, str)]


def language_section(manifest: dict, df: pl.DataFrame, stage: StageEntry) -> str:
    summary = manifest["global_state"][stage.name]
    sid, title = f"{anchor(stage.name)}-languages", f"Per-language thresholds of {stage.name}"
    col = summary.get("language_column")
    counts: dict[str, tuple[int, int]] = {}
    if isinstance(col, str) and col in df.columns:
        g = (
            df.filter(pl.col(col).is_not_null())
            .group_by(col)
            .agg(
                (pl.col("rejected_by") == stage.name).fill_null(False).sum().alias("dropped"),
                (pl.col("status") == OK).sum().alias("kept"),
            )
        )
        counts = {r[col]: (int(r["dropped"]), int(r["kept"])) for r in g.iter_rows(named=True)}
    rows = []
    for x in summary["languages"]:
        if not isinstance(x, dict):
            continue
        pool = int(x.get("pool_rows") or 0)
        dropped, kept = counts.get(x.get("language"), (None, None))
        kept_by = pool - dropped if dropped is not None else None
        rows.append([
            x.get("language"), x.get("t"), pool, x.get("matched_rows"), x.get("head_entries"),
            f"{float(x.get('tail_fraction') or 0):.1%}", f"{float(x.get('expected_match_share_kept') or 0):.1%}",
            kept_by if kept_by is not None else "-", share(kept_by, pool) if kept_by is not None else "-",
            kept if kept is not None else "-",
        ])  # fmt: skip
    p = summary.get("tail_p")
    body = (
        f'<p class="note">English t = {e(summary.get("t_en"))}; tail proportion p = {e(p)} '
        f"(from {e(summary.get('tail_p_from'))}); every other language's t keeps the same tail share of its "
        f"matches. Rows without a metadata language: {e(summary.get('no_language_rows'))}.</p>"
    )
    headers = ["language", "t", "pool rows", "matched", "head entries", "tail share", "matches kept (expected)",
               f"kept by {stage.name}", "kept share", "kept at the end"]  # fmt: skip
    body += table(headers, rows, {1, 2, 3, 4, 7, 9})
    return section(sid, title, body)
