"""What README "Outputs" promises of the write sink, without Ray (issue #21): tars are deterministic
(the same rows give the same bytes), ``write.caption_member: rewrite`` and ``write.rewrite_members``
give the documented members, ``_stats.json`` holds ``status_dict``, ``reason_dict`` (numbers as ``#``,
cut at 200 (``MAX_REASONS``) with the rest summed into ``(other reasons)``) and ``rule_dict``, and the writer
refuses a shard that arrives split across blocks. Tars are read back with webdataset and tarfile."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pytest
import webdataset as wds

from stages.base import replace_column
from stages.roles import SinkContext
from stages.write import Write, WriteConfig
from tests.conftest import sink_rows


def write_shard0(out: Path, rows: pa.Table, **cfg) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    [stats] = Write(WriteConfig(**cfg)).write(rows, SinkContext(output=str(out)))
    return stats


def with_rewrites(rows: pa.Table) -> pa.Table:
    rw = [[f"rewrite A of {c}", f"rewrite B of {c}"] for c in rows.column("caption").to_pylist()]
    return rows.append_column("caption_rewrites", pa.array(rw, pa.list_(pa.string())))


def test_two_writes_of_the_same_rows_give_byte_identical_tars(tmp_path):
    rows = sink_rows(0, 12, lambda i: i % 3 != 0)
    write_shard0(tmp_path / "a", rows)
    time.sleep(1.1)  # a tar that recorded the wall clock (mtime) would differ now
    write_shard0(tmp_path / "b", rows)
    a, b = (tmp_path / d / "00000.tar" for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert len(members) == 8 * 3  # 8 ok rows: jpg, txt, json each, in input order
    assert [m.name for m in members[:3]] == ["00000001.jpg", "00000001.txt", "00000001.json"]
    assert len({(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members}) == 1  # fixed mtime, owner


def test_caption_member_rewrite_puts_the_first_rewrite_in_txt(tmp_path):
    rows = with_rewrites(sink_rows(0, 4, lambda i: True))
    write_shard0(tmp_path, rows, caption_member="rewrite")
    samples = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False))
    assert [s["txt"].decode() for s in samples] == [f"rewrite A of caption 0 {i}" for i in range(4)]
    assert all("rewrite0.txt" not in s for s in samples)  # rewrite_members is off
    # the original caption stays in the json
    assert [json.loads(s["json"])["caption"] for s in samples] == [f"caption 0 {i}" for i in range(4)]


def test_rewrite_members_writes_each_rewrite_as_its_own_member(tmp_path):
    rows = with_rewrites(sink_rows(0, 3, lambda i: True))
    write_shard0(tmp_path, rows, rewrite_members=True)
    samples = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False))
    for i, s in enumerate(samples):
        assert s["txt"].decode() == f"caption 0 {i}"  # caption_member: original (the default)
        assert s["rewrite0.txt"].decode() == f"rewrite A of caption 0 {i}"
        assert s["rewrite1.txt"].decode() == f"rewrite B of caption 0 {i}"
        assert "rewrite2.txt" not in s
        assert json.loads(s["json"])["caption_rewrites"] == [
            f"rewrite A of caption 0 {i}",
            f"rewrite B of caption 0 {i}",
        ]


def test_stats_json_counts_statuses_reasons_with_numbers_as_hash_and_rules(tmp_path):
    n = 10
    rows = sink_rows(0, n, lambda i: i < 4)  # 4 ok, 6 download_failed "HTTP 404"
    status = ["ok"] * 4 + ["download_failed"] * 3 + ["filtered_clip"] * 3
    reason = (
        [None] * 4
        + ["HTTP 404"] * 3
        + [f"clip:min_score clip_score 0.{i}123 < min_score 0.4713" for i in range(3)]
    )
    rule = [None] * 4 + ["http_404"] * 2 + [None] + ["clip_score:min_score"] * 3
    rows = replace_column(rows, "status", status, pa.string())
    rows = replace_column(rows, "reason", reason, pa.string())
    rows = rows.append_column("rule", pa.array(rule, pa.string()))
    write_shard0(tmp_path, rows)
    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    assert stats["count"] == n and stats["successes"] == 4 and stats["failed_to_download"] == 3
    assert stats["status_dict"] == {"download_failed": 3, "filtered_clip": 3, "ok": 4}
    assert stats["reason_dict"] == {
        "download_failed: HTTP 404": 3,  # the HTTP code is not a per-row number
        "filtered_clip: clip:min_score clip_score # < min_score #": 3,
    }
    # a rejected row without a tag counts under its status
    assert stats["rule_dict"] == {
        "download_failed: http_404": 2,
        "download_failed: download_failed": 1,
        "filtered_clip: clip_score:min_score": 3,
    }
    assert stats["tar_samples"] == 4


def test_reason_dict_keeps_the_top_reasons_and_sums_the_rest(tmp_path):
    # 205 distinct reasons (numbers inside words are not per-row numbers: no '#' grouping); the first
    # one is the most common (3 rows), the others one row each. The README promises the top 200.
    distinct = [f"reason_v{i}x" for i in range(205)]
    reasons = [distinct[0]] * 3 + distinct[1:]
    rows = sink_rows(0, len(reasons), lambda i: False)
    rows = replace_column(rows, "reason", reasons, pa.string())
    write_shard0(tmp_path, rows)
    rd = json.loads((tmp_path / "00000_stats.json").read_text())["reason_dict"]
    assert len(rd) == 200 + 1
    assert rd[f"download_failed: {distinct[0]}"] == 3
    assert rd["(other reasons)"] == 5  # 205 distinct, 200 kept
    assert sum(rd.values()) == len(reasons)
    assert json.loads((tmp_path / "00000_stats.json").read_text())["status_dict"] == {
        "download_failed": len(reasons)
    }


def test_a_shard_split_across_blocks_is_refused(tmp_path):
    rows = sink_rows(0, 10, lambda i: True)
    ctx = SinkContext(output=str(tmp_path), expected_rows={0: 10})
    write = Write(WriteConfig())
    with pytest.raises(RuntimeError, match=r"shard 0 arrived with 6 rows, expected 10 .*split across blocks"):
        write.write(rows.slice(0, 6), ctx)
    assert not list(tmp_path.glob("*_stats.json"))  # the shard is not marked complete
    write.write(rows, ctx)  # the whole shard is written
    assert json.loads((tmp_path / "00000_stats.json").read_text())["count"] == 10
