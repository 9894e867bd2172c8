"""Dataset statistics before and after curation: every row that has the value ("all") against the
kept rows ("kept"), for the original image size, aspect ratio, caption length and, when the rows have
a language column (``schemas.row.LANGUAGE_COLUMN``) with values, the caption language. Works from
columns only; a statistic whose columns the run lacks is left out."""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.html import charts
from pipeline.html.markup import e, img, note, section, share, table
from schemas import OK
from schemas.row import LANGUAGE_COLUMN

MAX_LANGUAGES = 12  # rows of the language table (the rest summed)


def statistics(df: pl.DataFrame) -> list[tuple[str, pl.Expr, bool]]:
    """(name, expression, log scale) of each numeric statistic the rows can give."""
    out = []
    if {"original_width", "original_height"} <= set(df.columns):
        w, h = pl.col("original_width").cast(pl.Float64), pl.col("original_height").cast(pl.Float64)
        ok = (w > 0) & (h > 0)
        out += [
            ("original width (px)", pl.when(ok).then(w), True),
            ("original height (px)", pl.when(ok).then(h), True),
            ("original megapixels", pl.when(ok).then(w * h / 1e6), True),
            ("aspect ratio (width / height)", pl.when(ok).then(w / h), True),
        ]
    if "caption" in df.columns:
        cap = pl.col("caption")
        out += [
            ("caption length (characters)", cap.str.len_chars().cast(pl.Float64), False),
            ("caption length (words)", cap.str.count_matches(r"\S+").cast(pl.Float64), False),
        ]
    return out


def values(df: pl.DataFrame, expr: pl.Expr) -> np.ndarray:
    """The statistic's non-null values over ``df``'s rows."""
    return df.select(expr.alias("v")).drop_nulls()["v"].to_numpy()


def summary_row(name: str, all_v: np.ndarray, kept_v: np.ndarray) -> list:
    def cells(v):
        if not len(v):
            return [0, "-", "-"]
        p10, p50, p90 = np.quantile(v, [0.1, 0.5, 0.9])
        return [len(v), f"{p50:.4g}", f"{p10:.4g} – {p90:.4g}"]

    return [name, *cells(all_v), *cells(kept_v)]


def language_rows(df: pl.DataFrame, kept: pl.DataFrame) -> list[list]:
    """language, rows (all), share, rows (kept), share; most frequent first, the rest summed."""
    col = pl.col(LANGUAGE_COLUMN)
    all_n = df.filter(col.is_not_null()).group_by(LANGUAGE_COLUMN).len()
    kept_n = dict(kept.filter(col.is_not_null()).group_by(LANGUAGE_COLUMN).len().iter_rows())
    all_n = all_n.sort(["len", LANGUAGE_COLUMN], descending=[True, False])
    total, total_kept = int(all_n["len"].sum()), sum(kept_n.values())
    rows = []
    for i, (lang, n) in enumerate(all_n.iter_rows()):
        if i == MAX_LANGUAGES:
            rest = total - sum(r[1] for r in rows)
            rest_kept = total_kept - sum(r[3] for r in rows)
            rows.append(["(other)", rest, share(rest, total), rest_kept, share(rest_kept, total_kept)])
            break
        k = kept_n.get(lang, 0)
        rows.append([lang, n, share(n, total), k, share(k, total_kept)])
    return rows


def dataset_section(df: pl.DataFrame) -> str | None:
    """The ``dataset`` section, or None when the rows hold none of the statistics' columns."""
    stats = statistics(df)
    has_lang = LANGUAGE_COLUMN in df.columns and df[LANGUAGE_COLUMN].drop_nulls().len() > 0
    if not stats and not has_lang:
        return None
    kept = df.filter(pl.col("status") == OK)
    body = (
        f"<p>All rows ({df.height}) against the kept rows ({kept.height}); each statistic counts the "
        "rows that have its value (a row whose image was never fetched has no image size).</p>"
    )
    rows, panels = [], []
    for name, expr, log in stats:
        all_v, kept_v = values(df, expr), values(kept, expr)
        rows.append(summary_row(name, all_v, kept_v))
        if len(all_v) and not name.startswith("original height") and "characters" not in name:
            panels.append((name, all_v, kept_v, log))
    if rows:
        headers = ["statistic", "rows (all)", "median (all)", "p10 – p90 (all)",
                   "rows (kept)", "median (kept)", "p10 – p90 (kept)"]  # fmt: skip
        body += table(headers, rows, {1, 2, 4, 5})
    if panels:
        body += img(charts.distributions(panels), "distributions of all rows and kept rows")
    if has_lang:
        lang = language_rows(df, kept)
        body += f"<h3>Caption language ({e(LANGUAGE_COLUMN)})</h3>"
        headers = ["language", "rows (all)", "share (all)", "rows (kept)", "share (kept)"]
        body += table(headers, lang, {1, 2, 3, 4})
        body += img(charts.categories([r[0] for r in lang], [r[1] for r in lang], [r[3] for r in lang]),
                    "caption languages of all rows and kept rows")  # fmt: skip
    elif LANGUAGE_COLUMN in df.columns:
        body += note(f"the {LANGUAGE_COLUMN} column has no value (language identification was off)")
    return section("dataset", "Dataset statistics, before and after curation", body)
