"""The report's sections from issue #19 on a small run built without Ray: rule tags, thumbnails of
rejected rows (kept by the stage base class, trimmed by the writer), dataset statistics with a language
column, caption-rewrite outcomes and the time per stage.

The rows go through the real ``basic_filter`` (py3langid), ``clip_filter`` (fitted as the executor fits
it) and the real ``write`` sink; the report is the real ``pipeline.html.render``. Faked, to stay fast and
Ray-free: the images (small JPEGs drawn here), the CLIP scores (seeded numbers in place of the scoring
model), the rewrite columns (made by the rewrite stage's own ``RowRewrites`` from canned generations
instead of a language model), and ``manifest.json`` (written here, with ``stage_seconds``, as the
executor writes it)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_report import needs_chromium, probe, screenshot

from pipeline import html as report_html
from pipeline import registry
from schemas import OK
from schemas.row import SHARD_COL
from stages.reduce import fit_local
from stages.roles import SinkContext
from stages.thumbnails import PER_RULE, THUMBNAIL_PX

N_SHARDS, PER_SHARD = 2, 40
EN = "a red circle on a white background"
DE = "ein roter kreis auf einem weissen hintergrund"
STAGES = [{"read": {}}, {"basic_filter": {"english": False, "min_image_side": None}},
          {"clip_filter": {"top_fraction": 0.5}}, {"write": {"rejected_thumbnails": 3}}]  # fmt: skip
SECONDS = {"read": 1.5, "basic_filter": 2.25, "clip_filter": 0.75, "write": 3.0}


def _jpeg(w: int, h: int, i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), ((37 * i) % 256, (91 * i) % 256, 128)).save(buf, format="JPEG")
    return buf.getvalue()


def _rows(rng: np.random.Generator) -> pa.Table:
    n = N_SHARDS * PER_SHARD
    captions = [("cat" if i % 7 == 0 else DE if i % 5 == 0 else f"{EN} number {i}") for i in range(n)]
    sizes = [(int(rng.integers(80, 400)), int(rng.integers(80, 400))) for _ in range(n)]
    return pa.table(
        {
            "key": [f"{i:05d}" for i in range(n)],
            "caption": captions,
            "image": [_jpeg(w // 4, h // 4, i) for i, (w, h) in enumerate(sizes)],
            "original_width": pa.array([w for w, _ in sizes], pa.int32()),
            "original_height": pa.array([h for _, h in sizes], pa.int32()),
            "status": [OK] * n,
            "clip_score": pa.array(rng.uniform(0.1, 0.5, n), pa.float32()),
            SHARD_COL: pa.array([i // PER_SHARD for i in range(n)], pa.int32()),
        }
    )


def _rewrites(table: pa.Table) -> pa.Table:
    """``caption_rewrites``/``rewrite_reason`` on the ok rows, from the stage's RowRewrites: all four,
    two of four (empty, echo), none (too long)."""
    from stages.base import replace_column
    from stages.rewrite.validate import RowRewrites

    cfg = SimpleNamespace(n_rewrites=4, max_chars=60, instruction="write image captions differently,")
    out_rw, out_why = [], []
    for i, (cap, st) in enumerate(zip(table["caption"].to_pylist(), table["status"].to_pylist())):
        if st != OK:
            out_rw.append(None)
            out_why.append(None)
            continue
        row = RowRewrites(cap, cfg, [])
        gens = {0: [f"shape {i} {k}" for k in range(4)], 1: ["", cap, f"shape {i} a", f"shape {i} b"]}
        for slot, text in enumerate(gens.get(i % 3, ["x" * 99] * 4)):
            row.offer(slot, text, [])
        rw, why = row.result()
        out_rw.append(rw)
        out_why.append(why)
    table = replace_column(table, "caption_rewrites", pa.array(out_rw, pa.list_(pa.string())))
    return replace_column(table, "rewrite_reason", pa.array(out_why, pa.string()))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report_sections") / "output"
    out.mkdir()
    table = _rows(np.random.default_rng(0))
    bf = registry.get("basic_filter")(STAGES[1]["basic_filter"])
    cf = registry.get("clip_filter")(STAGES[2]["clip_filter"])
    shards = [table.slice(s * PER_SHARD, PER_SHARD) for s in range(N_SHARDS)]  # one call per shard
    shards = [bf(t) for t in shards]
    fit_local(cf, shards)
    shards = [_rewrites(cf(t)) for t in shards]
    sink = registry.get("write")(STAGES[3]["write"])
    stats = [sink.write(t, SinkContext(output=str(out)))[0] for t in shards]
    manifest = {
        "name": "sections", "output": str(out), "total_rows": table.num_rows,
        "total_samples": sum(s["successes"] for s in stats), "shard_pattern": f"{out}/{{00000..00001}}.tar",
        "config": {"stages": STAGES}, "stage_seconds": SECONDS, "fit_seconds": {"clip_filter": 0.5},
        "wall_seconds": 4.0, "global_state": {"clip_filter": cf.state_summary(cf._state)},
    }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, manifest


def _parquet(out: Path) -> pl.DataFrame:
    return pl.concat([pl.from_arrow(pq.read_table(p)) for p in sorted(out.glob("*.parquet"))])


def _section(page: str, sid: str) -> str:
    return re.search(rf'<section id="{re.escape(sid)}">(.*?)</section>', page, re.S).group(1)


def test_rules_and_stats_follow_the_rule_column(run):
    out, _ = run
    df = _parquet(out)
    rej = df.filter(pl.col("status") != OK)
    assert rej["rule"].null_count() == 0  # every rejected row has a rule, no kept row has one
    assert df.filter(pl.col("status") == OK)["rule"].is_null().all()
    rules = set(rej["rule"].unique())
    assert {"basic:min_words", "basic:max_aspect_ratio", "clip_score:top_fraction"} == rules
    for p in sorted(out.glob("*_stats.json")):
        st = json.loads(p.read_text())
        shard = pl.from_arrow(pq.read_table(out / f"{st['shard']}.parquet")).filter(pl.col("status") != OK)
        want = {f"{s}: {r}": n for s, r, n in shard.group_by(["status", "rule"]).len().iter_rows()}
        assert st["rule_dict"] == want
        # the score is in each reason, but reason_dict groups them: one entry per rule here
        assert len(st["reason_dict"]) == len(want) < shard.height
        assert sum(st["reason_dict"].values()) == shard.height
    assert rej.filter(pl.col("rule") == "clip_score:top_fraction")["reason"].n_unique() > 1


def test_thumbnails_are_bounded_small_jpegs_of_rejected_rows(run):
    from PIL import Image

    out, _ = run
    df = _parquet(out)
    thumbs = df.filter(pl.col("thumbnail").is_not_null())
    assert thumbs.height > 0 and (thumbs["status"] != OK).all()
    for p in sorted(out.glob("*.parquet")):
        shard = pl.from_arrow(pq.read_table(p)).filter(pl.col("thumbnail").is_not_null())
        for _, n in shard.group_by("status").len().iter_rows():
            assert n <= 3  # write.rejected_thumbnails
    assert PER_RULE >= 3
    for data in thumbs["thumbnail"].to_list():
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and max(im.size) <= THUMBNAIL_PX


def test_report_sections_equal_the_parquet(run):
    out, manifest = run
    page = report_html.render(str(out))
    ids = re.findall(r'<section id="([^"]+)">', page)
    assert ids == ["overview", "funnel", "stage-time", "clip-scores", "dataset", "caption-rewrites",
                   "samples", "rejected", "metadata"]  # fmt: skip
    df = _parquet(out)
    kept = df.filter(pl.col("status") == OK)

    rej = _section(page, "rejected")
    groups = df.filter(pl.col("status") != OK).group_by(["status", "rule"]).len()
    for status, rule, n in groups.iter_rows():
        n_thumbs = df.filter((pl.col("rule") == rule) & pl.col("thumbnail").is_not_null()).height
        assert f"<td>{status}</td><td>{rule}</td><td class=n>{n}</td><td class=n>{n_thumbs}</td>" in rej
        assert f"<h3>{status} &middot; {rule} ({n} rows)</h3>" in rej
    pics = re.findall(r'<img class="thumb" alt="sample (\d+)" src="data:image/jpeg;base64,([^"]+)"', rej)
    stored = dict(df.filter(pl.col("thumbnail").is_not_null()).select("key", "thumbnail").iter_rows())
    assert pics and {k: base64.b64decode(v) for k, v in pics} == {k: stored[k] for k, _ in pics}

    ds = _section(page, "dataset")
    for name, col in (("original width (px)", "original_width"), ("caption length (characters)", None)):

        def med(frame, col=col):
            v = frame[col] if col else frame["caption"].str.len_chars()
            return f"{float(np.quantile(v.drop_nulls().cast(pl.Float64).to_numpy(), 0.5)):.4g}"

        assert f"<td>{name}</td><td class=n>{df.height}</td><td class=n>{med(df)}</td>" in ds
        assert f"<td class=n>{kept.height}</td><td class=n>{med(kept)}</td>" in ds
    for lang, n in df.group_by("language").len().iter_rows():
        k = kept.filter(pl.col("language") == lang).height
        assert re.search(
            rf"<td>{lang}</td><td class=n>{n}</td><td class=n>[^<]*</td><td class=n>{k}</td>", ds
        )
    assert {"en", "de"} <= set(df["language"].to_list())

    rw = _section(page, "caption-rewrites")
    got = kept.filter(pl.col("caption_rewrites").is_not_null())
    n_rw = got["caption_rewrites"].list.len()
    partial = got.filter((n_rw > 0) & pl.col("rewrite_reason").is_not_null()).height
    none = got.filter(n_rw == 0).height
    assert f"<td>some rewrites (partial)</td><td class=n>{partial}</td>" in rw and partial > 0
    assert f"<td>none: original caption kept</td><td class=n>{none}</td>" in rw and none > 0
    assert f"<td>too_long</td><td class=n>{4 * none}</td><td class=n>{none}</td>" in rw
    for kind in ("echo", "empty"):
        assert f"<td>{kind}</td><td class=n>{partial}</td><td class=n>{partial}</td>" in rw

    st = _section(page, "stage-time")
    for stage, secs in SECONDS.items():
        assert f"<td>{stage}</td><td class=n>{secs:.1f}</td>" in st
    assert "<td>clip_filter</td><td class=n>0.8</td><td class=n>0.5</td>" in st  # 0.75 shown as 0.8
    assert st.count('class="plot"') == 1
    assert manifest["stage_seconds"] == SECONDS


def test_report_without_stage_time_or_rule_column(run, tmp_path):
    """A manifest without stage_seconds has no stage-time section; Parquet without the rule column
    (runs from before rule tags) groups rejected rows by status."""
    import shutil

    out, _ = run
    copy = tmp_path / "old"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m.pop("stage_seconds")
    (copy / "manifest.json").write_text(json.dumps(m))
    for p in copy.glob("*.parquet"):
        pq.write_table(pq.read_table(p).drop_columns(["rule", "thumbnail"]), p)
    page = report_html.render(str(copy))
    assert "stage-time" not in re.findall(r'<section id="([^"]+)">', page)
    rej = _section(page, "rejected")
    for status, n in _parquet(copy).filter(pl.col("status") != OK).group_by("status").len().iter_rows():
        assert f"<td>{status}</td><td>{status}</td><td class=n>{n}</td><td class=n>0</td>" in rej


@needs_chromium
def test_report_shows_rejected_images_statistics_and_stage_time_in_chromium(run, tmp_path):
    out, _ = run
    path = Path(report_html.build(str(out)))
    p = probe(path, tmp_path)
    images = [i for i in p["images"] if i["id"] != "probe-control"]
    assert all(i["complete"] and i["w"] > 0 for i in images), [i["alt"] for i in images if not i["w"]]
    rejected = [i for i in images if i["section"] == "rejected" and i["cls"] == "thumb"]
    assert rejected and all(max(i["w"], i["h"]) <= THUMBNAIL_PX for i in rejected)
    plots = {i["section"] for i in images if i["cls"] == "plot"}
    assert {"funnel", "stage-time", "dataset", "clip-scores"} <= plots
    text = {s["id"]: s["text"] for s in p["sections"]}
    assert "caption length (words)" in text["dataset"] and "Caption language" in text["dataset"]
    screenshot(path, tmp_path / "report_sections.png")


def test_named_scores_and_rule_thresholds_are_charted():
    """Named model scores and head outputs get a score section each; a clip_filter's rules draw their
    thresholds on their own column (from the manifest alone: the resolved config and the state summary)."""
    from pipeline.html.data import score_columns, thresholds

    clip = {"models": [{"column": "clip_l14", "model": "ViT-L-14", "pretrained": "openai", "min_score": 0.2,
                        "flipped": True}],
            "heads": [{"column": "quality", "path": "q.safetensors", "model": "clip_l14"}]}  # fmt: skip
    rules = [{"column": "clip_l14", "top_fraction": 0.3, "threshold": 0.25},
             {"column": "quality", "max_score": 0.7}]  # fmt: skip
    manifest = {
        "config": {"stages": [{"read": {"path": "x.parquet"}}, {"clip_score": clip}, {"clip_filter": {"rules": rules}}]},
        "global_state": {"clip_filter": {"n": 10, "rules": rules}},
    }  # fmt: skip
    assert {"clip_l14", "clip_l14_flipped", "quality"} <= set(score_columns(manifest))
    got = {(label, value, cols) for label, value, cols in thresholds(manifest)}
    assert ("clip_score min_score", 0.2, ("clip_l14",)) in got
    assert ("clip_filter top_fraction 0.3", 0.25, ("clip_l14",)) in got
    assert ("clip_filter max_score", 0.7, ("quality",)) in got
