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

from schemas import OK, TAR_EXCLUDED_COLUMNS, Status
from schemas.manifest import ShardStats, shard_name
from stages.base import Stage, StageConfig
from stages.io import atomic_write_bytes
from stages.read import SHARD_COL

DOWNLOAD_FAILURES = {Status.INVALID_URL, Status.BLOCKED_ADDRESS, Status.DOWNLOAD_FAILED, Status.OPTED_OUT}
RESIZE_FAILURES = {Status.DECODE_FAILED, Status.FILTERED_SIZE}
MAX_REASONS = 200  # distinct reasons kept per shard in _stats.json; the rest are summed


class WriteConfig(StageConfig):
    caption_member: Literal["original", "rewrite"] = "original"  # what KEY.txt holds
    rewrite_members: bool = False  # also write each rewrite as KEY.rewrite0.txt, KEY.rewrite1.txt, ...
    parquet_compression: str = "zstd"  # codec of the shard Parquet files
    # Filled in by the executor (not for YAML): where and how to name shards.
    output: str | None = None
    name_digits: int = 5
    expected_rows: dict[int, int] | None = None  # shard -> rows; a mismatch is an internal error


def image_ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "img"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class Write(Stage):
    name = "write"
    Config = WriteConfig
    requires = ()
    produces = ()
    sees_all_rows = True

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Write every shard present in ``batch``; return one row of stats per shard written."""
        if not self.config.output:
            raise ValueError("write: no output set (the executor sets it from --output / 'output:')")
        if SHARD_COL not in batch.column_names:
            raise ValueError(f"write: rows lack the internal {SHARD_COL!r} column set by the read stage")
        stats = []
        shards = pc.unique(batch.column(SHARD_COL)).to_pylist()
        for shard in sorted(shards):
            rows = batch.filter(pc.equal(batch.column(SHARD_COL), shard))
            stats.append(self.write_shard(int(shard), rows))
        return pa.Table.from_pylist([{"shard": s["shard"], "stats": json.dumps(s)} for s in stats])

    def write_shard(self, shard: int, rows: pa.Table) -> dict:
        cfg = self.config
        expected = (cfg.expected_rows or {}).get(shard)
        if expected is not None and expected >= 0 and rows.num_rows != expected:
            raise RuntimeError(
                f"internal error: shard {shard} arrived with {rows.num_rows} rows, expected {expected} "
                f"(a shard was split across blocks; raise ray.target_max_block_size)"
            )
        fs, root = fsspec.core.url_to_fs(cfg.output)
        name = shard_name(shard, cfg.name_digits)
        base = f"{root.rstrip('/')}/{name}"
        rows = rows.drop_columns([SHARD_COL])
        tar_bytes = self._tar(rows)
        atomic_write_bytes(fs, f"{base}.tar", tar_bytes)
        pq_bytes = self._parquet(rows)
        atomic_write_bytes(fs, f"{base}.parquet", pq_bytes)
        stats = self._stats(name, rows, len(tar_bytes), len(pq_bytes))
        atomic_write_bytes(fs, f"{base}_stats.json", json.dumps(stats, indent=1).encode())
        return stats

    def _tar(self, rows: pa.Table) -> bytes:
        ok = rows.filter(pc.equal(rows.column("status"), OK))
        meta_cols = [c for c in ok.column_names if c not in TAR_EXCLUDED_COLUMNS]
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
                _add(tar, f"{key}.{image_ext(img)}", img)
                text = m.get("caption") or ""
                rw = (rewrites[i] or []) if rewrites is not None else []
                if self.config.caption_member == "rewrite" and rw:
                    text = rw[0]
                _add(tar, f"{key}.txt", text.encode("utf-8"))
                if self.config.rewrite_members:
                    for j, r in enumerate(rw):
                        _add(tar, f"{key}.rewrite{j}.txt", r.encode("utf-8"))
                _add(tar, f"{key}.json", json.dumps(m, ensure_ascii=False, default=str).encode("utf-8"))
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
