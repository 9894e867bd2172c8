"""Write img2dataset-layout shards: ``NNNNN.tar``, ``NNNNN.parquet``, ``NNNNN_stats.json``.

* The tar holds the ``ok`` rows only: ``KEY.jpg`` (or ``.png``/``.webp``, from the image bytes),
  ``KEY.txt`` (the caption; see ``caption_member``) and ``KEY.json`` (the row's metadata columns).
  Tars are deterministic: members in input order, fixed mtime/owner/mode, so the same rows give
  the same bytes.
* The Parquet holds every row of the shard (every status, with its reason and rule), without image
  bytes; a bounded sample of rejected rows keeps a small ``thumbnail`` (``rejected_thumbnails``).
  Embeddings, when a stage produced them, are kept here (not in the json).
* ``_stats.json`` counts rows per status, per reason (numbers as ``#``), per rule and per stage
  (``schemas.manifest.ShardStats``).

Each file is written atomically; ``_stats.json`` is written last and marks the shard complete.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from schemas import OK, TAR_EXCLUDED_COLUMNS, Status
from schemas.manifest import ShardStats, shard_files, shard_name
from schemas.members import add_member, image_ext
from schemas.row import SHARD_COL
from stages.base import RoleConfig
from stages.io import atomic_write_bytes
from stages.roles import Sink, SinkContext
from stages.thumbnails import PER_RULE, THUMBNAIL_PX, keep_per_status

DOWNLOAD_FAILURES = {Status.INVALID_URL, Status.BLOCKED_ADDRESS, Status.DOWNLOAD_FAILED, Status.OPTED_OUT}
RESIZE_FAILURES = {Status.DECODE_FAILED, Status.FILTERED_SIZE}
MAX_REASONS = 200  # distinct reasons kept per shard in _stats.json; the rest are summed
# a number that is not part of a word (sha256) or an HTTP status: per-row detail in a reason
_NUMBER = re.compile(r"(?<![\w.#])(?<!HTTP )\d+(?:\.\d+)*(?:e[-+]?\d+)?")
_SIZE = re.compile(r"#x\d+\b")


def reason_template(reason: str | None) -> str:
    """``reason`` with its per-row numbers as ``#`` (``clip_score # < min_score #``), for ``reason_dict``."""
    return _SIZE.sub("#x#", _NUMBER.sub("#", reason or ""))


class WriteConfig(RoleConfig):
    caption_member: Literal["original", "rewrite"] = Field(
        "original", description="What `KEY.txt` holds: the original caption, or the first rewrite."
    )
    rewrite_members: bool = Field(
        False, description="Also write each rewrite as `KEY.rewrite0.txt`, `KEY.rewrite1.txt`, ..."
    )
    parquet_compression: str = Field("zstd", description="Codec of the shard Parquet files.")
    rejected_thumbnails: int = Field(
        8,
        ge=0,
        le=64,
        description="Keep at most this many thumbnails of rejected rows per status per shard in the "
        f"Parquet `thumbnail` column (JPEG, {THUMBNAIL_PX} px), spread over the status's rules, for the "
        f"report; stages keep at most {PER_RULE} per status and rule per shard, only of rows that had "
        "image bytes. 0: none.",
    )


class Write(Sink):
    name = "write"
    Config = WriteConfig

    def write_shard(self, shard: int, rows: pa.Table, ctx: SinkContext) -> dict:
        expected = ctx.expected_rows.get(shard)
        if expected is not None and expected >= 0 and rows.num_rows != expected:
            raise RuntimeError(
                f"internal error: shard {shard} arrived with {rows.num_rows} rows, expected {expected} "
                f"(a shard was split across blocks; raise ray.target_max_block_size)"
            )
        fs, root = fsspec.core.url_to_fs(ctx.output)
        name = shard_name(shard, ctx.name_digits)
        tar_path, pq_path, stats_path = (f"{root.rstrip('/')}/{f}" for f in shard_files(name))
        rows = keep_per_status(rows.drop_columns([SHARD_COL]), self.config.rejected_thumbnails)
        tar_bytes = self._tar(rows)
        atomic_write_bytes(fs, tar_path, tar_bytes)
        pq_bytes = self._parquet(rows)
        atomic_write_bytes(fs, pq_path, pq_bytes)
        stats = self._stats(name, rows, len(tar_bytes), len(pq_bytes))
        atomic_write_bytes(fs, stats_path, json.dumps(stats, indent=1).encode())
        return stats

    def _tar(self, rows: pa.Table) -> bytes:
        ok = rows.filter(pc.equal(rows.column("status"), OK))
        meta_cols = [c for c in ok.column_names if c not in TAR_EXCLUDED_COLUMNS]
        meta = json_ready(ok.select(meta_cols)).to_pylist()
        images = ok.column("image").to_pylist()
        rewrites = (
            ok.column("caption_rewrites").to_pylist() if "caption_rewrites" in ok.column_names else None
        )
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, m in enumerate(meta):
                key = m["key"]
                img = images[i]
                if img is None:  # an ok row always has bytes after download; re-read rows too
                    continue
                add_member(tar, f"{key}.{image_ext(img)}", img)
                text = m.get("caption") or ""
                rw = (rewrites[i] or []) if rewrites is not None else []
                if self.config.caption_member == "rewrite" and rw:
                    text = rw[0]
                add_member(tar, f"{key}.txt", text.encode("utf-8"))
                if self.config.rewrite_members:
                    for j, r in enumerate(rw):
                        add_member(tar, f"{key}.rewrite{j}.txt", r.encode("utf-8"))
                add_member(tar, f"{key}.json", json.dumps(m, ensure_ascii=False, default=str).encode("utf-8"))
        return buf.getvalue()

    def _parquet(self, rows: pa.Table) -> bytes:
        table = rows.drop_columns(["image"])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=self.config.parquet_compression)
        return sink.getvalue().to_pybytes()

    def _stats(self, name: str, rows: pa.Table, tar_bytes: int, pq_bytes: int) -> dict:
        status = rows.column("status").to_pylist()
        reason = rows.column("reason").to_pylist()
        rule = rows.column("rule").to_pylist() if "rule" in rows.column_names else [None] * rows.num_rows
        by = rows.column("rejected_by").to_pylist()
        st = Counter(status)
        # reasons with their per-row numbers (scores, counts, keys) as '#', so they group
        reasons = Counter(f"{s}: {reason_template(r)}" for s, r in zip(status, reason) if s != OK)
        if len(reasons) > MAX_REASONS:
            top = dict(reasons.most_common(MAX_REASONS))
            top["(other reasons)"] = sum(reasons.values()) - sum(top.values())
            reasons = Counter(top)
        rules = Counter(f"{s}: {r or s}" for s, r in zip(status, rule) if s != OK)
        stage_status: dict[str, dict[str, int]] = {}
        for s, b in zip(status, by):
            if s != OK:
                d = stage_status.setdefault(b or "unknown", {})
                d[s] = d.get(s, 0) + 1
        stats = ShardStats(
            shard=name,
            count=rows.num_rows,
            successes=st.get(OK, 0),
            failed_to_download=sum(v for k, v in st.items() if k in DOWNLOAD_FAILURES),
            failed_to_resize=sum(v for k, v in st.items() if k in RESIZE_FAILURES),
            status_dict=dict(sorted(st.items())),
            reason_dict=dict(reasons.most_common()),
            rule_dict=dict(rules.most_common()),
            stage_status=stage_status,
            tar_bytes=tar_bytes,
            parquet_bytes=pq_bytes,
        )
        return stats.model_dump()


def _floats_as(t: pa.DataType, to: pa.DataType) -> pa.DataType:
    """``t`` with every float16/float32 in it (inside lists and structs too) replaced by ``to``."""
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return to
    if pa.types.is_list(t):
        return pa.list_(_floats_as(t.value_type, to))
    if pa.types.is_large_list(t):
        return pa.large_list(_floats_as(t.value_type, to))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(_floats_as(t.value_type, to), t.list_size)
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_floats_as(f.type, to)) for f in t])
    return t


def json_ready(table: pa.Table) -> pa.Table:
    """``table`` with its float16/float32 values as the float64 of their shortest decimal form, so the
    tar's json holds ``0.2`` for a float32 0.2, not ``0.20000000298023224`` (Arrow's float-to-text cast
    writes the shortest form that reads back as the same float32). Other types are unchanged."""
    for i, name in enumerate(table.column_names):
        t = table.column(name).type
        wide = _floats_as(t, pa.float64())
        if wide != t:
            col = table.column(name).cast(_floats_as(t, pa.string())).cast(wide)
            table = table.set_column(i, name, col)
    return table
