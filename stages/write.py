"""Write img2dataset-layout shards: ``NNNNN.tar``, ``NNNNN.parquet``, ``NNNNN_stats.json``.

* The tar holds the ``ok`` rows only: ``KEY.jpg`` (or ``.png``/``.webp``, from the image bytes),
  ``KEY.txt`` (the caption; see ``caption_member``) and ``KEY.json`` (the row's metadata columns).
  Tars are deterministic: members in input order, fixed mtime/owner/mode, so the same rows give
  the same bytes.
* The Parquet holds every row of the shard (every status, with its reason and rule), without image
  bytes; a bounded sample of rejected rows keeps a small ``thumbnail`` (``rejected_thumbnails``).
  Embeddings, when a stage produced them, are kept here (not in the json).
  Its ``tar`` column names the tar (relative to the output) that holds each sample (null: none).
* ``_stats.json`` counts rows per status, per reason (numbers as ``#``), per rule and per stage
  (``schemas.manifest.ShardStats``), with img2dataset's ``start_time``/``end_time``/``duration``.

Each file is written atomically; ``_stats.json`` is written last and marks the shard complete.
At the end of the run (``finish_plan``/``finish_unit``/``finish``, see ``stages/reshard.py``):
``sizes.json``, and with ``reshard`` the balanced tars that replace the per-shard ones.
With ``img2dataset_compat`` the Parquet and the tar ``.json`` use img2dataset's ``status`` values
(``success``, ``failed_to_download``, ``failed_to_resize``) and ``error_message``; our status stays
in ``clipcurate_status``.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
import time
from collections import Counter
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from schemas import OK, TAR_EXCLUDED_COLUMNS, Status
from schemas.manifest import TAR_SUFFIX, ShardStats, shard_files, shard_name
from schemas.members import add_member, image_ext
from schemas.row import OWN_STATUS_COLUMN, SHARD_COL, is_heavy
from stages import caption_choice, reshard
from stages.base import RoleConfig
from stages.io import atomic_write_bytes
from stages.reshard import STAGED_DIR, TAR_COL
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


# img2dataset's status of each of ours (the others keep their name) and the columns of img2dataset_compat
I2D_STATUS = {OK: "success", Status.HASH_MISMATCH.value: "failed_to_download"}
I2D_STATUS |= {s.value: "failed_to_download" for s in DOWNLOAD_FAILURES}
I2D_STATUS |= {s.value: "failed_to_resize" for s in RESIZE_FAILURES}
OWN_STATUS_COL, ERROR_COL = OWN_STATUS_COLUMN, "error_message"


class ReshardConfig(RoleConfig):
    samples_per_shard: int = Field(
        ..., ge=1, description="Most samples per balanced tar (the tars hold the run's `ok` samples)."
    )
    min_shards: int = Field(
        1, ge=1, description="At least this many tars (open_clip's `--workers` x GPUs), while samples last."
    )


class WriteConfig(RoleConfig):
    caption_member: Literal["original", "rewrite"] = Field(
        "original", description="What `KEY.txt` holds: the original caption, or the first rewrite."
    )
    caption_choice: Literal["original", "recap", "fused", "mix"] | None = Field(
        None,
        description="What `KEY.txt` holds when recaptioning ran (`stages/caption_choice.py`): `original`, "
        "`recap`, `fused`, or `mix` (per sample, the fused/recap caption with probability `mix_p`, else the "
        "original; seeded by `mix_seed` and the key). Recorded in `caption_kind`; null: `caption_member` decides.",
    )
    mix_p: float = Field(0.8, ge=0.0, le=1.0, description="`mix`: probability of the generated caption.")
    mix_seed: int = Field(0, description="`mix`: seeds the per-sample draw.")

    @model_validator(mode="after")
    def _one_caption_rule(self):
        if self.caption_choice is not None and self.caption_member != "original":
            raise ValueError("give 'caption_choice' or caption_member: rewrite, not both")
        return self

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
    reshard: ReshardConfig | None = Field(
        None,
        description="Rewrite the `ok` samples into balanced tars once every shard is written: "
        "`{samples_per_shard: N, min_shards: K}`; sizes differ by at most one sample. The tars are then "
        "numbered apart from the Parquet files (the Parquet's `tar` column names each sample's tar).",
    )
    img2dataset_compat: bool = Field(
        False,
        description="Parquet and tar `.json` as img2dataset's: `status` is `success`, `failed_to_download`, "
        "`failed_to_resize` (other statuses keep their name), `error_message` holds the reason; our status "
        "is kept in `clipcurate_status`.",
    )


class Write(Sink):
    name = "write"
    Config = WriteConfig

    def write_shard(self, shard: int, rows: pa.Table, ctx: SinkContext) -> dict:
        start = ctx.started.get(shard) or time.time()
        expected = ctx.expected_rows.get(shard)
        if expected is not None and expected >= 0 and rows.num_rows != expected:
            raise RuntimeError(
                f"internal error: shard {shard} arrived with {rows.num_rows} rows, expected {expected} "
                f"(a shard was split across blocks; raise ray.target_max_block_size)"
            )
        fs, root = fsspec.core.url_to_fs(ctx.output)
        name = shard_name(shard, ctx.name_digits)
        tar_file, pq_file, stats_file = shard_files(name)
        if self.config.reshard is not None:  # staged until finish() writes the balanced tars
            tar_file = f"{STAGED_DIR}/{tar_file}"
        tar_path, pq_path, stats_path = (f"{root.rstrip('/')}/{f}" for f in (tar_file, pq_file, stats_file))
        rows = keep_per_status(rows.drop_columns([SHARD_COL]), self.config.rejected_thumbnails)
        c = self.config
        rows = caption_choice.annotate(rows, c.caption_choice, c.mix_p, c.mix_seed)
        shown = self._compat(rows) if self.config.img2dataset_compat else rows
        tar_bytes, in_tar = self._tar(rows, shown)
        atomic_write_bytes(fs, tar_path, tar_bytes)
        pq_bytes = self._parquet(shown, pa.array([tar_file if t else None for t in in_tar], pa.string()))
        atomic_write_bytes(fs, pq_path, pq_bytes)
        stats = self._stats(name, rows, len(tar_bytes), len(pq_bytes))
        end = time.time()
        stats.update(tar_samples=sum(in_tar), start_time=start, end_time=end, duration=round(end - start, 3))
        atomic_write_bytes(fs, stats_path, json.dumps(stats, indent=1).encode())
        return stats

    @staticmethod
    def _compat(rows: pa.Table) -> pa.Table:
        """img2dataset's ``status`` and ``error_message``; ours in ``clipcurate_status``."""
        ours = rows.column("status")
        theirs = pa.array([I2D_STATUS.get(s, s) for s in ours.to_pylist()], pa.string())
        error = pc.if_else(pc.equal(ours, OK), pa.scalar(None, pa.string()), rows.column("reason"))
        i = rows.column_names.index("status")
        rows = rows.set_column(i, "status", theirs)
        rows = rows.add_column(i + 1, OWN_STATUS_COL, ours)
        return rows.append_column(ERROR_COL, error.cast(pa.string()))

    def _tar(self, rows: pa.Table, shown: pa.Table) -> tuple[bytes, list[bool]]:
        """The tar of the ``ok`` rows of ``rows`` (metadata as in ``shown``), and per row whether it
        went into the tar."""
        is_ok = pc.equal(rows.column("status"), OK)
        ok = shown.filter(is_ok)
        in_tar = [False] * rows.num_rows
        positions = [i for i, v in enumerate(is_ok.to_pylist()) if v]
        meta_cols = [c for c in ok.column_names if c not in TAR_EXCLUDED_COLUMNS and not is_heavy(c)]
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
                in_tar[positions[i]] = True
                add_member(tar, f"{key}.{image_ext(img)}", img)
                text = m.get("caption") or ""
                rw = (rewrites[i] or []) if rewrites is not None else []
                if self.config.caption_member == "rewrite" and rw:
                    text = rw[0]
                if self.config.caption_choice is not None:
                    text = caption_choice.caption_text(m)
                add_member(tar, f"{key}.txt", text.encode("utf-8"))
                if self.config.rewrite_members:
                    for j, r in enumerate(rw):
                        add_member(tar, f"{key}.rewrite{j}.txt", r.encode("utf-8"))
                add_member(tar, f"{key}.json", json.dumps(m, ensure_ascii=False, default=str).encode("utf-8"))
        return buf.getvalue(), in_tar

    def _parquet(self, rows: pa.Table, tar: pa.Array) -> bytes:
        table = rows.drop_columns(["image"])
        if TAR_COL in table.column_names:  # a re-read output of ours: its old tar is not this run's
            table = table.drop_columns([TAR_COL])
        table = table.append_column(TAR_COL, tar)
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

    # ---- the end of the run: sizes.json, balanced tars (stages/reshard.py) ----------------------
    def finish_plan(self, ctx: SinkContext, stats: list[dict]) -> list[dict]:
        r = self.config.reshard
        if r is None:
            return []
        fs, root = reshard.url_to_fs(ctx.output)
        p = reshard.plan(root, stats, r.samples_per_shard, r.min_shards, ctx.name_digits)
        done = reshard.read_record(fs, root)
        if done is not None and done == {"layout": p["layout"], "sources": p["sources"]}:
            return []
        return p["units"]

    def finish_unit(self, unit: dict, ctx: SinkContext) -> dict:
        fs, _ = reshard.url_to_fs(ctx.output)
        if unit["kind"] == "tar":
            return {"tar": unit["out"], "samples": reshard.write_balanced_tar(fs, unit)}
        n = reshard.point_parquet(fs, unit, self.config.parquet_compression)
        return {"parquet": unit["path"], "samples": n}

    def finish(self, ctx: SinkContext, stats: list[dict], results: list[dict]) -> dict[str, int]:
        fs, root = reshard.url_to_fs(ctx.output)
        r = self.config.reshard
        if r is None:
            sizes = {f"{st['shard']}{TAR_SUFFIX}": reshard.tar_samples(st) for st in stats}
        else:
            p = reshard.plan(root, stats, r.samples_per_shard, r.min_shards, ctx.name_digits)
            sizes = {posixpath.basename(k): v for k, v in p["layout"].items()}
            written = {posixpath.basename(x["tar"]): x["samples"] for x in results if "tar" in x}
            if any(written.get(k, v) != v for k, v in sizes.items()):
                raise RuntimeError(f"reshard: balanced tars {written} differ from the plan {sizes}")
            reshard.commit(fs, root, p["layout"], p["sources"])
        reshard.write_sizes(fs, root, sizes)
        return sizes


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
