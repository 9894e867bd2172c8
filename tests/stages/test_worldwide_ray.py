"""Worldwide balancing through the executor on real Ray (issue #16): a multilingual pool with a
``language`` column, ``sample: false`` (online curation), real output tars re-sampled per epoch with
webdataset, the per-language thresholds in the manifest and in report.html; and the shipped
workflow validates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import langmeta
from stages.resample import clipcurate_resample

REPO = Path(__file__).resolve().parents[2]


def test_metaclip2_workflow_validates():
    from pipeline import config, plan

    steps = plan.check(config.load(REPO / "workflows" / "metaclip2.yaml"))
    assert [s.name for s in steps] == ["read", "basic_filter", "download", "balance_worldwide", "write"]
    ww = steps[3]
    assert ww.is_global and "language" in ww.requires
    assert set(ww.produces) == {"metaclip_language", "metaclip_entries", "metaclip_p"}


def _pool(tmp_path: Path, urls: Path) -> Path:
    """The demo world's URLs (real images on a loopback server) with multilingual captions: a
    Zipf-distributed entry per caption in four languages (zh without spaces), and five rows of a
    language without metadata."""
    per_lang = {
        "en": [f"thing{i}" for i in range(30)],
        "de": [f"ding{i}" for i in range(20)],
        "zh": [chr(0x4E00 + i) for i in range(20)],
        "he": ["מ" * (i + 1) for i in range(10)],
    }
    langmeta.save(per_lang, tmp_path / "meta")
    table = pq.read_table(urls)
    rng = np.random.default_rng(16)
    langs = rng.choice(["en", "de", "zh", "he"], size=table.num_rows, p=[0.4, 0.2, 0.25, 0.15]).tolist()
    captions = []
    for lang in langs:
        entries = per_lang[lang]
        w = 1.0 / np.arange(1, len(entries) + 1)
        entry = entries[rng.choice(len(entries), p=w / w.sum())]
        captions.append(f"一只{entry}在睡觉" if lang == "zh" else f"a {entry}.")
    for i in range(5):
        captions[i], langs[i] = "ein unbekanntes Ding", "xx"
    pool = tmp_path / "pool.parquet"
    table = table.drop_columns([c for c in ("caption", "language") if c in table.column_names])
    pq.write_table(
        table.append_column("caption", pa.array(captions)).append_column("language", pa.array(langs)), pool
    )
    return pool


def test_worldwide_online_curation_on_ray(ray_session, demo_urls, tmp_path):
    wds = pytest.importorskip("webdataset")
    from pipeline import config, plan
    from pipeline import ray as executor
    from pipeline.html import build

    pool = _pool(tmp_path, demo_urls)
    out = tmp_path / "out"
    pipe = config.from_dict(
        {"name": "ww", "samples_per_shard": 400, "ray": {"show_progress": False}, "stages": [
            {"read": {"path": str(pool), "save_additional_columns": ["language"]}},
            {"download": {"image_size": 64, "retries": 0, "allowed_networks": ["127.0.0.0/8"]}},
            {"balance_worldwide": {"metadata": str(tmp_path / "meta"), "t": 20, "language_column": "language",
                                   "sample": False, "batch_size": 256, "num_cpus": 0.5}},
            {"write": {}},
        ]},
        output=str(out),
    )  # fmt: skip
    plan.check(pipe)
    manifest = executor.run(pipe)
    summary = manifest["global_state"]["balance_worldwide"]
    ts = {x["language"]: x["t"] for x in summary["languages"]}
    assert ts["en"] == 20 and set(ts) == {"en", "de", "zh", "he"}
    assert summary["no_language_rows"] <= 5 and summary["tail_p_from"] == "english"
    # sample: false keeps every matched row; only the unknown language is rejected by the stage
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])
    by_stage = rows.filter(pa.compute.equal(rows.column("rejected_by"), "balance_worldwide"))
    assert set(by_stage.column("rule").to_pylist()) == {"balance:no_language"}
    ok = rows.filter(pa.compute.equal(rows.column("status"), "ok"))
    assert ok.num_rows > 200
    # the tars carry metaclip_p; the re-sampler keeps about sum(p) per epoch, differently each epoch
    tars = sorted(str(p) for p in out.glob("*.tar"))
    meta = {}
    for s in wds.DataPipeline(wds.SimpleShardList(tars), wds.tarfile_to_samples(), wds.decode()):
        meta[s["__key__"]] = s["json"]
    assert sorted(meta) == sorted(ok.column("key").to_pylist())
    ps = np.array([m["metaclip_p"] for m in meta.values()])
    assert {m["metaclip_language"] for m in meta.values()} == {"en", "de", "zh", "he"}
    assert (ps > 0).all() and (ps < 1).any()
    epochs = [
        {s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(tars), wds.tarfile_to_samples(),
                                                  clipcurate_resample(e, seed=0))}
        for e in range(3)
    ]  # fmt: skip
    for kept in epochs:
        assert abs(len(kept) - ps.sum()) <= 4 * np.sqrt((ps * (1 - ps)).sum())
    assert epochs[0] != epochs[1]
    # the report's per-language table
    build(str(out))
    html = (out / "report.html").read_text()
    assert "Per-language thresholds of balance_worldwide" in html
    assert json.loads((out / "manifest.json").read_text())["global_state"]["balance_worldwide"]["languages"]
