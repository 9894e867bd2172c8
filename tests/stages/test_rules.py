"""Rule tags and thumbnails of rejected rows (issue #19): ``set_status(..., rule=)``, what the stage base
class guarantees (every rejected row has a rule; a bounded sample keeps a thumbnail before its image is
nulled), what the writer keeps and counts, and the download package's tags for every reason it writes."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import OK, Status, conform
from stages.base import Stage, set_status
from stages.download.rules import rule_of
from stages.roles import SinkContext
from stages.thumbnails import PER_RULE, THUMBNAIL_PX, keep_per_status
from stages.write import Write, reason_template


def _jpeg(i: int, size=(200, 120)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (i % 256, 40, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _table(n: int, images: bool = True) -> pa.Table:
    return pa.table(
        {
            "key": [f"{i:04d}" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "image": pa.array([_jpeg(i) if images else None for i in range(n)], pa.binary()),
            "status": [OK] * n,
            "_shard": pa.array([0] * n, pa.int32()),
        }
    )


def test_set_status_writes_one_rule_a_list_or_the_status():
    t = conform(_table(3))
    t = set_status(t, [True, False, False], Status.FILTERED_BASIC, "why", rule="basic:min_words")
    assert t["rule"].to_pylist() == ["basic:min_words", None, None]
    t = set_status(
        t, [False, True, True], Status.DUPLICATE, ["a", "b", "c"], rule=["x", "duplicate:url", "y"]
    )
    assert t["rule"].to_pylist() == ["basic:min_words", "duplicate:url", "y"]
    t = set_status(t, [False, False, True], Status.FILTERED_CLIP, "z")
    assert t["rule"].to_pylist() == ["basic:min_words", "duplicate:url", "filtered_clip"]
    assert t["reason"].to_pylist() == ["why", "b", "z"]


class Odd(Stage):
    """Rejects odd rows with a rule, every fourth row without one; raises on the key 0006."""

    name = "odd"

    def process(self, batch):
        keys = batch["key"].to_pylist()
        if "0006" in keys:
            raise ValueError("bad row")
        idx = [int(k) for k in keys]
        batch = set_status(batch, [i % 2 == 1 for i in idx], Status.FILTERED_BASIC, "odd", rule="odd:rule")
        return set_status(batch, [i % 4 == 0 for i in idx], Status.DUPLICATE, "four")


def test_base_class_tags_every_rejected_row_and_keeps_a_bounded_sample_of_thumbnails():
    from PIL import Image

    n = 60
    out = Odd()(_table(n))
    rows = out.to_pylist()
    for r in rows:
        i = int(r["key"])
        want = "stage_error" if i == 6 else "odd:rule" if i % 2 else "duplicate" if i % 4 == 0 else None
        assert r["rule"] == want, r["key"]
        assert r["image"] is None if want else r["image"] is not None
        assert r["thumbnail"] is None or want is not None  # only rejected rows get one
    thumbs = [r for r in rows if r["thumbnail"] is not None]
    by_rule = {}
    for r in thumbs:
        by_rule[(r["status"], r["rule"])] = by_rule.get((r["status"], r["rule"]), 0) + 1
        with Image.open(io.BytesIO(r["thumbnail"])) as im:
            assert im.format == "JPEG" and max(im.size) == THUMBNAIL_PX
    assert by_rule == {
        (Status.FILTERED_BASIC.value, "odd:rule"): PER_RULE,  # 30 rows rejected, 8 thumbnails
        (Status.DUPLICATE.value, "duplicate"): PER_RULE,
        (Status.STAGE_ERROR.value, "stage_error"): 1,
    }
    # a new call (the next shard) has a new budget; rows without image bytes get none
    again = Odd()(_table(n, images=False))
    assert again["thumbnail"].null_count == n


def test_writer_keeps_thumbnails_per_status_over_rules_and_counts_rules(tmp_path):
    t = Odd()(_table(60))
    assert keep_per_status(t, 0)["thumbnail"].null_count == t.num_rows
    kept = keep_per_status(t, 5).to_pylist()
    basic = [r for r in kept if r["thumbnail"] is not None and r["status"] == Status.FILTERED_BASIC]
    assert len(basic) == 5
    stats = Write({"rejected_thumbnails": 3}).write(t, SinkContext(output=str(tmp_path)))[0]
    pq_rows = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    per_status = {}
    for r in pq_rows:
        if r["thumbnail"] is not None:
            per_status[r["status"]] = per_status.get(r["status"], 0) + 1
    assert per_status == {"filtered_basic": 3, "duplicate": 3, "stage_error": 1}
    want = {}
    for r in pq_rows:
        if r["status"] != OK:
            want[f"{r['status']}: {r['rule']}"] = want.get(f"{r['status']}: {r['rule']}", 0) + 1
    assert stats["rule_dict"] == want
    on_disk = json.loads((tmp_path / "00000_stats.json").read_text())
    assert on_disk["rule_dict"] == want
    assert "thumbnail" not in on_disk  # and never in a sample's json:
    assert all(r["thumbnail"] is None for r in pq_rows if r["status"] == OK)


@pytest.mark.parametrize(
    ("reason", "template"),
    [
        ("clip:min_score clip_score 0.1234 < min_score 0.4713", "clip:min_score clip_score # < min_score #"),
        ("clip:top_fraction clip_score 1.2e-05 < 0.70 (top_fraction 0.3 of 10000)",
         "clip:top_fraction clip_score # < # (top_fraction # of #)"),
        ("HTTP 404", "HTTP 404"),
        ("dedup:sha256 duplicate of key 000000012", "dedup:sha256 duplicate of key #"),
        ("image over max_pixels 89478485: 10000x10000", "image over max_pixels #: #x#"),
        ("private address 10.0.0.1 refused", "private address # refused"),
    ],
)  # fmt: skip
def test_reason_dict_groups_reasons_without_their_numbers(reason, template):
    assert reason_template(reason) == template


# Every reason the download package writes (stages/download/*.py) and its tag.
DOWNLOAD_REASONS = [
    ("invalid_url", "null URL", "null_url"),
    ("invalid_url", "URL is not a string (int)", "not_a_string"),
    ("invalid_url", "bad host or port: Port out of range 0-65535", "bad_host"),
    ("invalid_url", "no host", "no_host"),
    ("invalid_url", "host is not a valid internationalised domain name", "bad_idna"),
    ("invalid_url", "redirect to bad URL: no host", "redirect_bad_url"),
    ("blocked_address", "multicast address 224.0.0.1 refused", "blocked:multicast"),
    ("blocked_address", "non-public address 192.0.0.8 refused", "blocked:non_public"),
    ("download_failed", "dns: NameResolution: Failed to resolve 'x.invalid'", "dns"),
    ("download_failed", "connect: NewConnectionError: [Errno 111] Connection refused", "connect"),
    ("download_failed", "reset: ProtocolError: ('Connection aborted.', ...)", "reset"),
    ("download_failed", "tls: SSLError: certificate verify failed", "tls"),
    ("download_failed", "ConnectTimeout: connect timeout=5", "connect_timeout"),
    ("download_failed", "Timeout: not done within total_timeout 30s", "total_timeout"),
    ("download_failed", "Timeout: body slower than min_body_rate 1000 B/s (12 bytes in 9s)", "min_body_rate"),
    ("download_failed", "rate_limited: HTTP 429 from h:80 (Retry-After 99s, over max_retry_after 10s)", "rate_limited"),
    ("download_failed", "breaker: host h:80 not tried after 5 consecutive failures (last: dns: ...)", "breaker"),
    ("download_failed", "HTTP 301 without Location", "http_301"),
    ("download_failed", "empty response", "empty_response"),
    ("download_failed", "cancelled", "cancelled"),
    ("opted_out", "robots.txt: http://h/robots.txt disallows this path for '*'", "robots_txt"),
    ("opted_out", "tdm-reservation: 1 (TDMRep: text and data mining rights reserved)", "tdm_reservation"),
    ("decode_failed", "bad image header: OSError: broken data stream", "bad_header"),
    ("decode_failed", "Image decoding error", "decode_error"),
    ("filtered_size", "image too small", "min_image_size"),
    ("filtered_size", "image area too large", "max_image_area"),
    ("filtered_size", "aspect ratio too large", "max_aspect_ratio"),
    ("hash_mismatch", "sha256 mismatch", "verify_hash"),
    ("stage_error", "download: ValueError: x", "stage_error"),
]  # fmt: skip


@pytest.mark.parametrize(("status", "reason", "rule"), DOWNLOAD_REASONS)
def test_download_rule_tags(status, reason, rule):
    assert rule_of(status, reason) == rule
