"""Dedup (exact, by URL and sha256), a global stage, called directly without Ray: fit_partial on
several partitions, merge, a JSON round trip of the state (as the executor persists it), apply."""

from __future__ import annotations

import hashlib
import json
import random

import pyarrow as pa
import pytest

from pipeline.config import ConfigError, from_dict
from schemas import conform
from stages.dedup import Dedup, DedupConfig


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_rows():
    """40 rows: URL repeats, image repeats under other URLs, nulls, and rows already rejected."""
    rows = []
    for i in range(40):
        rows.append(
            {
                "key": f"{i:09d}",
                "url": f"http://img.test/{i % 13}.jpg",  # every 13th row repeats a URL
                "sha256": sha(b"image-%d" % (i % 17)),  # and every 17th an image
                "status": "ok",
            }
        )
    rows[3]["url"] = None  # null URL: never a duplicate by URL
    rows[16]["url"] = None
    rows[5]["sha256"] = None  # not downloaded: no hash
    rows[22]["sha256"] = None
    rows[1]["status"] = "download_failed"  # not ok: not in the pool, so row 14 (same URL) is first
    return rows


def expected(rows, by):
    """Reference: first (smallest key) ok row per value; a row loses on the first field in ``by``."""
    first: dict[tuple[str, str], str] = {}
    for r in sorted(rows, key=lambda r: r["key"]):
        if r["status"] != "ok":
            continue
        for f in by:
            if r[f]:
                first.setdefault((f, r[f]), r["key"])
    out = {}
    for r in rows:
        reason = None
        if r["status"] == "ok":
            for f in by:
                kept = first.get((f, r[f])) if r[f] else None
                if kept is not None and kept != r["key"]:
                    reason = f"dedup:{f} duplicate of key {kept}"
                    break
        out[r["key"]] = reason
    return out


def fit_apply(rows, partitions, by=("url", "sha256"), apply_batch=7):
    stage = Dedup(DedupConfig(by=list(by)))
    parts = [stage.fit_partial(conform(pa.Table.from_pylist(p))) for p in partitions]
    state = json.loads(json.dumps(stage.merge(parts)))
    stage.load_state(state)
    out = []
    for i in range(0, len(rows), apply_batch):
        out.extend(stage(conform(pa.Table.from_pylist(rows[i : i + apply_batch]))).to_pylist())
    return stage, state, out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keeps_smallest_key_whatever_the_partitions(seed):
    rows = make_rows()
    rng = random.Random(seed)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    cuts = sorted(rng.sample(range(1, len(rows)), 4))
    partitions = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(rows)])] + [[]]
    rng.shuffle(partitions)
    stage, state, out = fit_apply(rows, partitions)
    want = expected(rows, ("url", "sha256"))
    assert len(out) == len(rows)
    for r in out:
        if r["key"] == "000000001":
            assert r["status"] == "download_failed"
            continue
        assert r["reason"] == want[r["key"]], r["key"]
        assert r["status"] == ("duplicate" if want[r["key"]] else "ok")
    # Spot checks against the construction of make_rows.
    by_key = {r["key"]: r for r in out}
    assert by_key["000000013"]["reason"] == "dedup:url duplicate of key 000000000"
    assert by_key["000000014"]["status"] == "ok"  # row 1 had its URL but was not ok
    assert by_key["000000027"]["reason"] == "dedup:url duplicate of key 000000014"
    assert by_key["000000029"]["reason"] == "dedup:sha256 duplicate of key 000000012"  # 1st ok with URL 3
    assert by_key["000000016"]["status"] == "ok"  # null URL, first of image 16
    assert stage.state_summary(state) == {"unique_url": 13, "unique_sha256": 17}
    assert all(len(h) == 16 for h in state["url"])  # 8-byte BLAKE2b, in hex


def test_same_result_as_one_partition():
    rows = make_rows()
    _, state_one, out_one = fit_apply(rows, [rows])
    _, state_many, out_many = fit_apply(rows, [[r] for r in reversed(rows)], apply_batch=40)
    assert state_one == state_many
    assert out_one == out_many


def test_by_url_only_ignores_image_repeats():
    rows = make_rows()
    _, state, out = fit_apply(rows, [rows[:20], rows[20:]], by=("url",))
    assert set(state) == {"url"}
    want = expected(rows, ("url",))
    assert {r["key"]: r["reason"] for r in out if r["status"] != "download_failed"} == {
        k: v for k, v in want.items() if k != "000000001"
    }
    assert all(r["reason"] is None or r["reason"].startswith("dedup:url ") for r in out[2:])


def test_numeric_key_order_and_config():
    rows = [
        {"key": "100", "url": "http://a", "status": "ok"},
        {"key": "99", "url": "http://a", "status": "ok"},
    ]
    _, _, out = fit_apply(rows, [rows[:1], rows[1:]], by=("url",))
    assert [r["status"] for r in out] == ["duplicate", "ok"]
    assert out[0]["reason"] == "dedup:url duplicate of key 99"
    stage = Dedup(DedupConfig(by=["sha256"], hash_bytes=16))
    st = stage.fit_partial(conform(pa.Table.from_pylist([{"key": "1", "sha256": sha(b"x"), "status": "ok"}])))
    assert [len(h) for h in st["sha256"]] == [32]
    with pytest.raises(ConfigError, match=r"\(dedup\): key 'by"):
        from_dict({"stages": [{"read": {"path": "x.parquet"}}, {"dedup": {"by": ["caption"]}}]})
    with pytest.raises(ConfigError, match="each once"):
        from_dict({"stages": [{"read": {"path": "x.parquet"}}, {"dedup": {"by": []}}]})


def test_apply_without_state_is_a_clear_error():
    stage = Dedup(DedupConfig())
    with pytest.raises(RuntimeError, match="no fitted state"):
        stage.process(conform(pa.Table.from_pylist([{"key": "1", "url": "http://a", "status": "ok"}])))
