"""Dedup (exact, by URL, sha256 or any column), a shuffle stage, run without Ray (``run_local``:
partition per shard, decide per partition, apply per shard) over several shard splits and partition
counts, against a plain reference of the rule and the driver-merge implementation it replaced."""

from __future__ import annotations

import hashlib
import random

import pyarrow as pa
import pytest

from pipeline.config import ConfigError, from_dict
from schemas import conform
from stages.dedup import Dedup, DedupConfig
from stages.shuffle import merge_decisions, partition_block, run_local
from tests import dedup_reference as reference


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


def fit_apply(rows, partitions, by=("url", "sha256"), n_partitions=4):
    """The shuffle in one process (``run_local``): ``partitions`` are the shards (their rows in any
    order); the rows come back in ``rows`` order."""
    stage = Dedup(DedupConfig(by=list(by)))
    blocks = [conform(pa.Table.from_pylist(p)) for p in partitions]
    out = {r["key"]: r for b in run_local(stage, blocks, n_partitions=n_partitions) for r in b.to_pylist()}
    return stage, [out[r["key"]] for r in rows]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keeps_smallest_key_whatever_the_partitions(seed):
    rows = make_rows()
    rng = random.Random(seed)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    cuts = sorted(rng.sample(range(1, len(rows)), 4))
    partitions = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(rows)])] + [[]]
    rng.shuffle(partitions)
    stage, out = fit_apply(rows, partitions, n_partitions=1 + seed * 3)
    want = expected(rows, ("url", "sha256"))
    assert len(out) == len(rows)
    for r in out:
        if r["key"] == "000000001":
            assert r["status"] == "download_failed"
            continue
        assert r["reason"] == want[r["key"]], r["key"]
        assert r["status"] == ("duplicate" if want[r["key"]] else "ok")
        assert r["rule"] == (
            f"duplicate:{want[r['key']].split()[0].split(':')[1]}" if want[r["key"]] else None
        )
    # Spot checks against the construction of make_rows.
    by_key = {r["key"]: r for r in out}
    assert by_key["000000013"]["reason"] == "dedup:url duplicate of key 000000000"
    assert by_key["000000014"]["status"] == "ok"  # row 1 had its URL but was not ok
    assert by_key["000000027"]["reason"] == "dedup:url duplicate of key 000000014"
    assert by_key["000000029"]["reason"] == "dedup:sha256 duplicate of key 000000012"  # 1st ok with URL 3
    assert by_key["000000016"]["status"] == "ok"  # null URL, first of image 16
    # the driver-merge implementation this stage replaced flags the same rows for the same reasons
    tables = [conform(pa.Table.from_pylist(p)) for p in partitions]
    assert reference.dedup(tables) == {r["key"]: r["reason"] for r in out if r["status"] == "duplicate"}


def test_same_result_as_one_partition():
    rows = make_rows()
    _, out_one = fit_apply(rows, [rows], n_partitions=1)
    _, out_many = fit_apply(rows, [[r] for r in reversed(rows)], n_partitions=7)
    assert out_one == out_many


def test_by_url_only_ignores_image_repeats():
    rows = make_rows()
    _, out = fit_apply(rows, [rows[:20], rows[20:]], by=("url",))
    want = expected(rows, ("url",))
    assert {r["key"]: r["reason"] for r in out if r["status"] != "download_failed"} == {
        k: v for k, v in want.items() if k != "000000001"
    }
    assert all(r["reason"] is None or r["reason"].startswith("dedup:url ") for r in out[2:])


def test_any_column_and_summary():
    """``by`` names any column (here a caption), judged like url; the decisions' summary counts them."""
    rows = make_rows()
    for i, r in enumerate(rows):
        r["caption"] = f"caption {i % 5}"
    stage, out = fit_apply(rows, [rows[:15], rows[15:]], by=("caption", "url"))
    want = expected(rows, ("caption", "url"))
    assert {r["key"]: r["reason"] for r in out if r["status"] != "download_failed"} == {
        k: v for k, v in want.items() if k != "000000001"
    }
    flagged = [r for r in out if r["status"] == "duplicate"]
    assert len(flagged) == 40 - 1 - 5  # five captions, one kept each (row 1 is not ok)
    table = merge_decisions([stage.decide(partition_block(stage, conform(pa.Table.from_pylist(rows)), 0))])
    assert stage.decision_summary(table) == {"flagged": 34, "duplicate_caption": 34, "duplicate_url": 0}
    urls = {r["url"] for r in rows if r["status"] == "ok" and r["url"]}
    assert stage.summary == {  # what the manifest shows: per partition and per shard counts, summed
        "unique_caption": 5,
        "unique_url": len(urls),
        "flagged": 34,
        "duplicate_caption": 34,
        "duplicate_url": 0,
    }


def test_numeric_key_order_and_config():
    rows = [
        {"key": "100", "url": "http://a", "status": "ok"},
        {"key": "99", "url": "http://a", "status": "ok"},
        {"key": "b", "url": "http://a", "status": "ok"},  # not a digit key: after every digit key
    ]
    _, out = fit_apply(rows, [rows[:1], rows[1:]], by=("url",))
    assert [r["status"] for r in out] == ["duplicate", "ok", "duplicate"]
    assert out[0]["reason"] == out[2]["reason"] == "dedup:url duplicate of key 99"
    stage = Dedup(DedupConfig(by=["sha256"], hash_bytes=16))
    parts = stage.partition_rows(
        conform(pa.Table.from_pylist([{"key": "1", "sha256": sha(b"x"), "status": "ok"}]))
    )
    assert parts.column("h").type == pa.binary(16)
    with pytest.raises(ConfigError, match="each once"):
        from_dict({"stages": [{"read": {"path": "x.parquet"}}, {"dedup": {"by": []}}]})
    with pytest.raises(ConfigError, match="each once"):
        from_dict({"stages": [{"read": {"path": "x.parquet"}}, {"dedup": {"by": ["url", "url"]}}]})


def test_plan_refuses_a_column_nothing_makes():
    from pipeline import plan

    raw = {
        "stages": [{"read": {"path": "x.parquet"}}, {"dedup": {"by": ["caption", "phash"]}}, {"write": {}}]
    }
    with pytest.raises(ConfigError, match=r"stages\[1\] \(dedup\): requires column 'phash'") as e:
        plan.check(from_dict(raw, source="w.yaml"))
    assert "\n" not in str(e.value)


def test_apply_without_decisions_is_a_clear_error():
    stage = Dedup(DedupConfig())
    with pytest.raises(RuntimeError, match="no decisions"):
        stage.process(conform(pa.Table.from_pylist([{"key": "1", "url": "http://a", "status": "ok"}])))
