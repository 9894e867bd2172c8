"""Write img2dataset-layout shards: ``NNNNN.tar``, ``NNNNN.parquet``, ``NNNNN_stats.json``.

* The tar holds the ``ok`` rows only: ``KEY.jpg`` (or ``.png``/``.webp``, from the image bytes),
  ``KEY.txt`` (the caption; see ``caption_member``) and ``KEY.json`` (the row's metadata columns).
  Tars are deterministic: members in input order, fixed mtime/owner/mode, so the same rows give
  the same bytes.
* The Parquet holds every row of the shard (every status, with its reason), without image bytes.
  Embeddings, when a stage produced them, are kept here (not in the json).
* ``_stats.json`` counts rows per status, per reason and per stage (``schemas.manifest.ShardStats``).

Each file is written atomically; ``_stats.json`` is written last and marks the shard complete.
"""

from __future__ import annotations

import io
import json
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
from schemas.row import SHARD_COL, is_heavy
from stages.base import RoleConfig
from stages.io import atomic_write_bytes
from stages.roles import Sink, SinkContext

DOWNLOAD_FAILURES = {Status.INVALID_URL, Status.BLOCKED_ADDRESS, Status.DOWNLOAD_FAILED, Status.OPTED_OUT}
RESIZE_FAILURES = {Status.DECODE_FAILED, Status.FILTERED_SIZE}
MAX_REASONS = 200  # distinct reasons kept per shard in _stats.json; the rest are summed


class WriteConfig(RoleConfig):
    caption_member: Literal["original", "rewrite"] = Field(
        "original", description="What `KEY.txt` holds: the original caption, or the first rewrite."
    )
    rewrite_members: bool = Field(
        False, description="Also write each rewrite as `KEY.rewrite0.txt`, `KEY.rewrite1.txt`, ..."
    )
    parquet_compression: str = Field("zstd", description="Codec of the shard Parquet files.")


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
        rows = rows.drop_columns([SHARD_COL])
        tar_bytes = self._tar(rows)
        atomic_write_bytes(fs, tar_path, tar_bytes)
        pq_bytes = self._parquet(rows)
        atomic_write_bytes(fs, pq_path, pq_bytes)
        stats = self._stats(name, rows, len(tar_bytes), len(pq_bytes))
        atomic_write_bytes(fs, stats_path, json.dumps(stats, indent=1).encode())
        return stats

    def _tar(self, rows: pa.Table) -> bytes:
        ok = rows.filter(pc.equal(rows.column("status"), OK))
        meta_cols = [c for c in ok.column_names if c not in TAR_EXCLUDED_COLUMNS and not is_heavy(c)]
        meta = ok.select(meta_cols).to_pylist()
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
        by = rows.column("rejected_by").to_pylist()
        st = Counter(status)
        reasons = Counter(f"{s}: {r}" for s, r in zip(status, reason) if s != OK)
        if len(reasons) > MAX_REASONS:
            top = dict(reasons.most_common(MAX_REASONS))
            top["(other reasons)"] = sum(reasons.values()) - sum(top.values())
            reasons = Counter(top)
        # Per-rule counts: stages start reasons with a stable rule tag ("basic:words ...",
        # "clip:min_score ...", "HTTP 404" -> "HTTP"), so the first word groups them.
        rules = Counter(f"{s}: {(r or '').split(' ', 1)[0]}" for s, r in zip(status, reason) if s != OK)
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
