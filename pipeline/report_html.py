"""``report.html``: one self-contained page per run (inline CSS, plots and thumbnails as ``data:``
URIs, no script, no network), written beside ``manifest.json``.

The numbers come from the shard Parquet files (every row, every status), aggregated with polars;
``manifest.json`` adds the config, the models, the versions, stage timings and the fitted global
state; ``_clipcurate/state/NN_balance.json`` holds the entry counts fitted by ``balance``; kept
images are read back from the shard tars. Everything is read through fsspec, so ``s3://`` outputs
work. Plots are drawn with matplotlib's Agg canvas (no pyplot, no global backend change).

Sections (their ``id`` is stable; tests and links rely on them): ``overview``, ``funnel``,
``clip-scores``, ``balance``, ``samples``, ``download-failures``, ``metadata``.

    build("demo_out/output")  -> "demo_out/output/report.html"
"""

from __future__ import annotations

import base64
import html
import io
import json
import posixpath
import tarfile
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline.report import funnel_rows
from pipeline.runs import RunDir
from schemas import OK
from schemas.manifest import MANIFEST_NAME, STATE_DIR
from stages.io import atomic_write_bytes

REPORT_NAME = "report.html"
SECTION_IDS = ("overview", "funnel", "clip-scores", "balance", "samples", "download-failures", "metadata")
SAMPLES_PER_GROUP = 12  # kept and rejected: at most 24 cards
THUMB_PX = 128  # longest side of a sample thumbnail
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_REASON_ROWS = 30
GROUND_TRUTH = "is_mismatched"  # the demo world's generator truth (string "true"/"false" after read)
# The only columns read from the shard Parquet (big runs have many more, e.g. embeddings).
REPORT_COLUMNS = ("key", "url", "caption", "status", "reason", "rejected_by", "clip_score", "caption_rewrites",
                  "metaclip_entries", "thumbnail", GROUND_TRUTH, "true_colour", "true_shape")  # fmt: skip
# rejected statuses in the funnel plot (matplotlib's tab10 without its green, which means "kept")
STATUS_COLOURS = ("#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c5cad6}main{padding:8px 28px 40px;max-width:1180px}
section{background:#fff;border:1px solid #dfe3ea;border-radius:8px;padding:14px 20px;margin:18px 0}
h2{font-size:18px;margin:4px 0 10px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0}td,th{border-bottom:1px solid #e6e9ef;padding:4px 10px;text-align:left;
vertical-align:top}th{background:#f0f2f6}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
img.plot{max-width:100%;display:block;margin:8px 0}.note{color:#5b6478}.warn{color:#a4330c}
.kpis{display:flex;gap:14px;flex-wrap:wrap}.kpi{background:#f0f2f6;border-radius:6px;padding:8px 14px}
.kpi b{display:block;font-size:20px}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
.card{border:1px solid #dfe3ea;border-radius:6px;padding:8px;display:flex;gap:10px;font-size:12.5px}
.card img,.noimg{width:96px;height:96px;object-fit:contain;flex:none;background:#eef0f4;border-radius:4px}
.noimg{display:flex;align-items:center;justify-content:center;text-align:center;color:#8a92a3;font-size:11px}
.badge{display:inline-block;border-radius:4px;padding:0 6px;font-size:11.5px;background:#e4e7ee}
.badge.ok{background:#d7f0dc;color:#17622a}.badge.bad{background:#fbe0d6;color:#8c2a0a}
.card p{margin:2px 0}pre{background:#f3f4f7;padding:8px;overflow:auto;font-size:12px;max-height:420px}
ul.rw{margin:2px 0;padding-left:16px}
"""


# ---- reading ------------------------------------------------------------------------------------


def _is_shard(base: str, suffix: str) -> bool:
    return base.endswith(suffix) and base[: -len(suffix)].isdigit()


def load_rows(rd: RunDir) -> pl.DataFrame:
    """Every row of every shard Parquet (``REPORT_COLUMNS`` that exist), plus ``_shard``."""
    frames = []
    for p in sorted(rd.fs.glob(rd.path("*.parquet"))):
        base = posixpath.basename(p)
        if not _is_shard(base, ".parquet"):
            continue
        with rd.fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in REPORT_COLUMNS if c in pf.schema_arrow.names]
            table = pf.read(columns=cols)
        frames.append(pl.from_arrow(table).with_columns(pl.lit(base[: -len(".parquet")]).alias("_shard")))
    if not frames:
        return pl.DataFrame(
            schema={
                "key": pl.String,
                "status": pl.String,
                "reason": pl.String,
                "rejected_by": pl.String,
                "_shard": pl.String,
            }
        )
    return pl.concat(frames, how="diagonal_relaxed")


def stage_names(manifest: dict) -> list[str]:
    return [next(iter(s)) for s in manifest.get("config", {}).get("stages", [])]


def stage_config(manifest: dict, name: str) -> dict | None:
    for s in manifest.get("config", {}).get("stages", []):
        if name in s:
            return s[name] or {}
    return None


def parquet_stage_status(df: pl.DataFrame) -> dict[str, dict[str, int]]:
    """stage -> status -> rows, over the rejected rows of the Parquet files."""
    out: dict[str, dict[str, int]] = {}
    rej = df.filter(pl.col("status") != OK).group_by(["rejected_by", "status"]).len()
    for stage, status, n in rej.sort(["rejected_by", "status"]).iter_rows():
        out.setdefault(stage or "unknown", {})[status] = n
    return out


def _read_images(rd: RunDir, wanted: dict[str, list[str]]) -> dict[str, bytes]:
    """Image bytes of ``wanted`` keys (shard name -> keys), read from the shard tars."""
    out: dict[str, bytes] = {}
    for shard, keys in wanted.items():
        path = rd.path(f"{shard}.tar")
        if not rd.exists(path):
            continue
        want = set(keys)
        with rd.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if m.isfile() and key in want and ext.lower() in IMAGE_EXTS:
                    data = tar.extractfile(m)
                    if data is not None:
                        out[key] = data.read()
                        want.discard(key)
                        if not want:  # do not read the rest of a (possibly remote, large) tar
                            break
    return out


# ---- rendering helpers ----------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(uri: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{_e(alt)}" src="{uri}">'


def _thumb(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a broken image gets a card without a picture
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    th = "".join(f"<th{' class=n' if i in numeric else ''}>{_e(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=n' if i in numeric else ''}>{_e(c)}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>'


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    return fig, fig.add_subplot()


def _fmt_num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


# ---- sections -------------------------------------------------------------------------------------


def section_overview(manifest: dict, df: pl.DataFrame) -> str:
    ok = df.filter(pl.col("status") == OK).height
    kpis = [
        ("rows", df.height),
        ("kept (ok)", ok),
        ("rejected", df.height - ok),
        ("kept share", f"{ok / df.height:.1%}" if df.height else "-"),
        ("shards", df["_shard"].n_unique() if df.height else 0),
        ("wall time", f"{manifest.get('wall_seconds', 0):.1f}s"),
    ]
    body = (
        '<div class="kpis">'
        + "".join(f'<div class="kpi"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in kpis)
        + "</div>"
    )
    body += f'<p class="note">shards: {_e(manifest.get("shard_pattern"))} &middot; '
    body += f"--train-num-samples {_e(manifest.get('total_samples'))}</p>"
    if manifest.get("total_rows") is not None and manifest["total_rows"] != df.height:
        body += f'<p class="warn">manifest.json counts {manifest["total_rows"]} rows, the Parquet files {df.height}.</p>'
    return _section("overview", "Overview", body)


def section_funnel(manifest: dict, df: pl.DataFrame) -> str:
    order = stage_names(manifest)
    ss = parquet_stage_status(df)
    rows = funnel_rows({"config": manifest.get("config", {}), "total_rows": df.height, "stage_status": ss})
    remaining = rows[-1]["out"] if rows else df.height
    for stage in ss:  # rows rejected by a stage the config does not name (should not happen)
        if stage not in order:
            n = sum(ss[stage].values())
            rows.append({"stage": stage, "in": remaining, "rejected": ss[stage], "out": remaining - n})
            remaining -= n
    secs = manifest.get("stage_seconds", {})
    nrows = manifest.get("stage_rows", {})
    table_rows = []
    for r in rows:
        s, n = secs.get(r["stage"]), nrows.get(r["stage"])
        rej = ", ".join(f"{k}: {v}" for k, v in sorted(r["rejected"].items())) or "-"
        table_rows.append(
            [r["stage"], r["in"], rej, r["out"], f"{s:.1f}" if s else "-", f"{n / s:.0f}" if s and n else "-"]
        )
    body = _table(
        ["stage", "rows in", "rejected (status: rows)", "ok out", "busy s", "rows/s"],
        table_rows,
        {1, 3, 4, 5},
    )
    if manifest.get("stage_status") is not None and manifest["stage_status"] != ss:
        body += (
            '<p class="warn">manifest.json per-stage counts differ from the Parquet files (shown here).</p>'
        )
    statuses = sorted({k for r in rows for k in r["rejected"]})
    if rows:
        fig, ax = _figure(8, 0.45 * len(rows) + 1.2)
        y = np.arange(len(rows))[::-1]
        ax.barh(y, [r["out"] for r in rows], color="#3a9d5d", label="ok after stage")
        left = np.array([r["out"] for r in rows], dtype=float)
        for i, st in enumerate(statuses):
            w = np.array([r["rejected"].get(st, 0) for r in rows], dtype=float)
            ax.barh(y, w, left=left, color=STATUS_COLOURS[i % len(STATUS_COLOURS)], label=st)
            left += w
        ax.set_yticks(y, [r["stage"] for r in rows])
        ax.set_xlabel("rows")
        ax.set_title("rows per stage: kept, and rejected by status")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        body += _img(_png(fig), "funnel: rows per status per stage")
    return _section("funnel", "Funnel: rows per status per stage", body)


def clip_thresholds(manifest: dict) -> list[tuple[str, float]]:
    out = []
    cs = stage_config(manifest, "clip_score") or {}
    if cs.get("min_score") is not None:
        out.append(("clip_score min_score", float(cs["min_score"])))
    cf = stage_config(manifest, "clip_filter") or {}
    if cf.get("min_score") is not None:
        out.append(("clip_filter min_score", float(cf["min_score"])))
    gs = manifest.get("global_state", {}).get("clip_filter") or {}
    if gs.get("threshold") is not None:
        out.append((f"clip_filter top_fraction {gs.get('top_fraction')}", float(gs["threshold"])))
    return out


def section_clip(manifest: dict, df: pl.DataFrame) -> str:
    title = "CLIP scores"
    if "clip_score" not in df.columns or df["clip_score"].drop_nulls().len() == 0:
        return _section("clip-scores", title, '<p class="note">no clip_score in this run</p>')
    scored = df.filter(pl.col("clip_score").is_not_null() & pl.col("clip_score").is_not_nan())
    if not scored.height:
        return _section("clip-scores", title, '<p class="note">every clip_score is NaN</p>')
    thresholds = clip_thresholds(manifest)
    if GROUND_TRUTH in scored.columns and scored[GROUND_TRUTH].drop_nulls().len():
        truth = scored[GROUND_TRUTH].cast(pl.String).str.to_lowercase()
        scored = scored.with_columns(truth.is_in(["true", "1"]).alias("_bad"))
        groups = [
            ("matched caption (ground truth)", ~pl.col("_bad"), "#3a7bd5"),
            ("mismatched caption", pl.col("_bad"), "#e0662b"),
        ]
    else:
        groups = [
            ("kept (ok)", pl.col("status") == OK, "#3a9d5d"),
            ("rejected", pl.col("status") != OK, "#c44e52"),
        ]
    scores = scored["clip_score"].to_numpy()
    bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-6, 41)
    fig, ax = _figure(8, 3.6)
    rows = []
    for label, expr, colour in groups:
        g = scored.filter(expr)
        if g.height:
            ax.hist(
                g["clip_score"].to_numpy(), bins=bins, alpha=0.6, color=colour, label=f"{label} ({g.height})"
            )
        kept = g.filter(pl.col("status") == OK).height
        rows.append([label, g.height, kept, f"{kept / g.height:.1%}" if g.height else "-"])
    for i, (label, v) in enumerate(thresholds):
        ax.axvline(
            v, color="black", linestyle=("--", ":", "-.")[i % 3], linewidth=1.4, label=f"{label} = {v:.4g}"
        )
    ax.set_xlabel("clip_score (cosine)")
    ax.set_ylabel("rows")
    ax.set_title("CLIP score histogram")
    ax.legend(fontsize=8, frameon=False)
    q = np.quantile(scores, [0.0, 0.1, 0.5, 0.9, 1.0])
    body = _img(_png(fig), "histogram of CLIP scores with thresholds")
    body += f'<p class="note">{len(scores)} scored rows; min {q[0]:.4f}, p10 {q[1]:.4f}, median {q[2]:.4f}, '
    body += f"p90 {q[3]:.4f}, max {q[4]:.4f}. Thresholds: "
    body += (", ".join(f"{_e(k)} = {v:.4f}" for k, v in thresholds) or "none") + "</p>"
    body += _table(["rows", "scored", "kept at the end", "kept share"], rows, {1, 2, 3})
    return _section("clip-scores", title, body)


def _entry_names(manifest: dict) -> dict[int, str]:
    names = {
        e["id"]: e["entry"]
        for e in (manifest.get("global_state", {}).get("balance") or {}).get("top_entries", [])
    }
    cfg = stage_config(manifest, "balance") or {}
    if cfg.get("metadata"):
        try:
            from stages import metadata as md

            names = dict(enumerate(md.load(cfg["metadata"])))
        except Exception:  # noqa: BLE001 - names are a nicety; ids are shown instead
            pass
    return names


def section_balance(rd: RunDir, manifest: dict, df: pl.DataFrame) -> str:
    title = "MetaCLIP entry counts before and after balancing"
    if "balance" not in stage_names(manifest):
        return _section("balance", title, '<p class="note">no balance stage in this run</p>')
    states = sorted(p for p in rd.fs.glob(rd.path(STATE_DIR, "state", "*_balance.json")))
    if not states:
        return _section(
            "balance", title, '<p class="warn">balance ran, but its fitted state file is missing</p>'
        )
    state = rd.read_json(states[-1])
    before = np.asarray(state["counts"], dtype=np.int64)
    gs = manifest.get("global_state", {}).get("balance") or {}
    t = int(gs.get("t") or (stage_config(manifest, "balance") or {}).get("t") or state["t"])
    after = np.zeros_like(before)
    if "metaclip_entries" in df.columns:
        ids = (
            df.filter(pl.col("status") == OK)
            .select(pl.col("metaclip_entries").explode().drop_nulls().alias("e"))
            .group_by("e")
            .len()
        )
        for e, n in ids.iter_rows():
            if 0 <= e < len(after):
                after[e] = n
    fig, ax = _figure(8, 4)
    for counts, label, colour in (
        (before, "before (fitted pool counts)", "#3a7bd5"),
        (after, "after (kept rows)", "#e0662b"),
    ):
        c = np.sort(counts[counts > 0])[::-1]
        if len(c):
            ax.loglog(
                np.arange(1, len(c) + 1), c, marker=".", color=colour, label=f"{label}: {len(c)} entries"
            )
    ax.axhline(t, color="black", linestyle="--", linewidth=1.2, label=f"t = {t}")
    ax.set_xlabel("entry rank")
    ax.set_ylabel("matches")
    ax.set_title("MetaCLIP entry counts (log-log rank plot)")
    ax.legend(fontsize=8, frameon=False)
    body = _img(_png(fig), "log-log rank plot of MetaCLIP entry counts before and after balancing")
    tail = lambda c: c[c < t].sum() / c.sum() if c.sum() else 0.0  # noqa: E731
    body += (
        f'<p class="note">t = {t}; entries matched {int((before > 0).sum())} before, {int((after > 0).sum())} after; '
        f"head entries (count &gt; t) {int((before > t).sum())} before, {int((after > t).sum())} after; "
        f"tail share of matches {tail(before):.1%} before, {tail(after):.1%} after; "
        f"pool rows {state.get('pool_rows')}, matched {state.get('matched_rows')}.</p>"
    )
    names = _entry_names(manifest)
    order = np.argsort(-before, kind="stable")[:15]
    rows = [
        [
            int(i),
            names.get(int(i), f"#{int(i)}"),
            int(before[i]),
            int(after[i]),
            f"{min(1.0, t / before[i]):.3g}",
        ]
        for i in order
        if before[i] > 0
    ]
    body += "<h3>Most frequent entries</h3>" + _table(
        ["id", "entry", "before", "after", "p = t / count"], rows, {0, 2, 3, 4}
    )
    return _section("balance", title, body)


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
    per_shard = ok.group_by("_shard").len().sort("_shard")
    shards, n = [], 0
    for shard, count in per_shard.iter_rows():
        if n >= SAMPLES_PER_GROUP:
            break
        shards.append(shard)
        n += count
    kept = _spread(ok.filter(pl.col("_shard").is_in(shards)), SAMPLES_PER_GROUP)
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


def _card(row: dict, image_uri: str | None) -> str:
    ok = row.get("status") == OK
    pic = (
        _img(image_uri, f"sample {row.get('key')}", cls="thumb")
        if image_uri
        else ('<div class="noimg">no image bytes (rejected rows keep none)</div>')
    )
    parts = [
        f'<p><b>{_e(row.get("key"))}</b> <span class="badge {"ok" if ok else "bad"}">{_e(row.get("status"))}</span></p>',
        f"<p>{_e(row.get('caption'))}</p>",
    ]
    if row.get("clip_score") is not None:
        parts.append(f"<p>score {row['clip_score']:.4f}</p>")
    rw = row.get("caption_rewrites")
    if rw:
        parts.append('<p>rewrites:</p><ul class="rw">' + "".join(f"<li>{_e(r)}</li>" for r in rw) + "</ul>")
    if not ok:
        parts.append(f'<p class="note">{_e(row.get("rejected_by"))}: {_e(row.get("reason"))}</p>')
    if row.get(GROUND_TRUTH) is not None:
        truth = "mismatched caption" if str(row[GROUND_TRUTH]).lower() in ("true", "1") else "matched caption"
        shown = " ".join(str(row[c]) for c in ("true_colour", "true_shape") if row.get(c))
        parts.append(
            f'<p class="note">ground truth: {_e(truth)}{" (" + _e(shown) + ")" if shown else ""}</p>'
        )
    return f'<div class="card">{pic}<div>{"".join(parts)}</div></div>'


def section_samples(rd: RunDir, df: pl.DataFrame) -> str:
    kept, rejected = pick_samples(df)
    wanted: dict[str, list[str]] = {}
    for shard, key in kept.select("_shard", "key").iter_rows():
        wanted.setdefault(shard, []).append(key)
    images = _read_images(rd, wanted)
    body = ""
    for title, part in (("Kept", kept), ("Rejected", rejected)):
        cards = []
        for row in part.to_dicts():
            data = images.get(row["key"]) or row.get("thumbnail")
            cards.append(_card(row, _thumb(data) if data else None))
        body += f"<h3>{title} ({part.height} shown)</h3>"
        body += f'<div class="grid">{"".join(cards)}</div>' if cards else '<p class="note">none</p>'
    return _section("samples", "Sample images, kept and rejected", body)


def section_download(manifest: dict, df: pl.DataFrame) -> str:
    title = "Download failure reasons"
    if "download" not in stage_names(manifest):
        return _section("download-failures", title, '<p class="note">no download stage in this run</p>')
    failed = df.filter((pl.col("rejected_by") == "download") & (pl.col("status") != OK))
    if not failed.height:
        return _section("download-failures", title, '<p class="note">no download failures</p>')
    by_reason = (
        failed.with_columns(pl.col("reason").fill_null("").str.slice(0, 300))
        .group_by(["status", "reason"])
        .len()
        .sort(["len", "status", "reason"], descending=[True, False, False])
    )
    by_status = failed.group_by("status").len().sort(["len", "status"], descending=[True, False])
    body = f"<p>{failed.height} of {df.height} rows failed to download ({failed.height / df.height:.1%}).</p>"
    body += _table(["status", "rows"], [list(r) for r in by_status.iter_rows()], {1})
    body += _failures_by_class_and_host(failed)
    body += "<h3>Reasons</h3>" + _table(
        ["status", "reason", "rows"], [list(r) for r in by_reason.head(MAX_REASON_ROWS).iter_rows()], {2}
    )
    if by_reason.height > MAX_REASON_ROWS:
        body += f'<p class="note">{by_reason.height - MAX_REASON_ROWS} more distinct reasons not shown.</p>'
    return _section("download-failures", title, body)


def _failures_by_class_and_host(failed: pl.DataFrame) -> str:
    """Failures per class (the reason's first word, ``HTTP NNN`` kept whole) and per host of ``url``,
    so a user sees whether a low success rate is theirs or the web's."""
    cls = pl.col("reason").fill_null("").str.extract(r"^(HTTP \d+|\S+)", 1).str.strip_chars_end(":")
    by_class = failed.group_by(["status", cls.alias("class")]).len()
    by_class = by_class.sort(["len", "status", "class"], descending=[True, False, False])
    body = "<h3>By class</h3>" + _table(
        ["status", "class", "rows"], [list(r) for r in by_class.head(MAX_REASON_ROWS).iter_rows()], {2}
    )
    if "url" in failed.columns:
        host = (
            pl.col("url").fill_null("").str.extract(r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^/?#]+)", 1)
        )
        by_host = failed.group_by(host.fill_null("(no host)").alias("host")).len()
        by_host = by_host.sort(["len", "host"], descending=[True, False]).head(MAX_REASON_ROWS)
        body += f"<h3>By host (top {MAX_REASON_ROWS})</h3>" + _table(
            ["host", "rows"], [list(r) for r in by_host.iter_rows()], {1}
        )
    return body


def section_metadata(manifest: dict) -> str:
    import yaml

    keys = ["name", "output", "started_at", "finished_at", "wall_seconds", "resumed", "input_rows", "total_rows",
            "total_samples", "shard_pattern", "config_hash", "version"]  # fmt: skip
    body = _table(["field", "value"], [[k, _fmt_num(manifest.get(k))] for k in keys if k in manifest])
    body += "<h3>Models</h3>"
    body += f"<pre>{_e(json.dumps(manifest.get('models', {}), indent=1))}</pre>"
    body += "<h3>Versions</h3>" + _table(["package", "version"], sorted(manifest.get("versions", {}).items()))
    if manifest.get("global_state"):
        body += "<h3>Fitted global state (summary)</h3>"
        body += f"<pre>{_e(json.dumps(manifest['global_state'], indent=1))}</pre>"
    body += "<h3>Resolved config</h3>"
    body += f"<pre>{_e(yaml.safe_dump(manifest.get('config', {}), sort_keys=False))}</pre>"
    return _section("metadata", "Run metadata", body)


# ---- the page ------------------------------------------------------------------------------------


def render(output: str) -> str:
    """The report's HTML for the run in ``output``."""
    rd = RunDir(output)
    manifest = rd.read_json(rd.path(MANIFEST_NAME))
    df = load_rows(rd)
    sections = [
        section_overview(manifest, df),
        section_funnel(manifest, df),
        section_clip(manifest, df),
        section_balance(rd, manifest, df),
        section_samples(rd, df),
        section_download(manifest, df),
        section_metadata(manifest),
    ]
    nav = " &middot; ".join(f'<a href="#{s}">{s}</a>' for s in SECTION_IDS)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>clipcurate report: {_e(manifest.get('name'))}</title><style>{CSS}</style></head><body>"
        f"<header><h1>clipcurate report: {_e(manifest.get('name'))}</h1>"
        f"<p>{_e(manifest.get('output'))} &middot; finished {_e(manifest.get('finished_at'))}</p></header>"
        f"<main><p>{nav}</p>{''.join(sections)}</main></body></html>"
    )


def build(output: str) -> str:
    """Write ``OUTPUT/report.html`` and return its path (a URL for remote filesystems)."""
    rd = RunDir(output)
    page = render(output)
    path = rd.path(REPORT_NAME)
    atomic_write_bytes(rd.fs, path, page.encode("utf-8"))
    return rd.url_of(path)
