"""Exact dedup (``dedup``), a shuffle stage (``stages.shuffle``): one row per URL, per image
``sha256``, or per value of any other column named in ``by``.

A row whose key is not the smallest among the ``ok`` rows holding one of its values is a
``duplicate``; the reason names the field and the kept key:

    dedup:url duplicate of key 000000012
    dedup:sha256 duplicate of key 000000012

So the first occurrence by key is kept, whatever the batch split or the order of the workers.
Each field is judged on its own: a row is kept only if it holds the smallest key for every one
of its values, and the reason names the first field (in ``by`` order) it loses on. (The key named
there may itself be dropped for another field.) Null or empty values are never duplicates.

Keys compare as numbers when they are digit strings (shorter first, then by text), which is plain
text order for the fixed-width keys ``read`` makes.

How it runs (a shuffle, see ``stages.shuffle``): each ``ok`` row gives one partition row per
non-empty value of a ``by`` field: ``(part, key, rank, h)`` where ``h`` is the first ``hash_bytes``
bytes of BLAKE2b of the value, ``rank`` the field's index in ``by`` and ``part`` 8 bytes of ``h``
mixed with the rank. Rows with equal values share a ``part``, so they meet in one ``decide`` call,
which keeps the smallest key of every ``(rank, h)`` and flags the others. No process holds more
than one partition (about ``len(by) * pool / partitions`` rows of ~50 bytes). Two distinct values
with the same ``h`` count as equal: the chance of any such pair among N distinct values is about
N^2 / 2^(8*hash_bytes+1): ~3e-6 for N = 10M at 8 bytes; raise ``hash_bytes`` for billion-row pools.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from stages.base import StageConfig
from stages.shuffle import PART, ShuffleStage, decisions

_MIX = 0x9E3779B97F4A7C15  # spreads the field rank over the part bits


class DedupConfig(StageConfig):
    by: list[str] = Field(
        ["url", "sha256"],
        description="Columns to dedup on, checked in this order: `url`, `sha256` (needs `download` "
        "before) or any column an earlier stage produces or `read` keeps.",
    )
    hash_bytes: int = Field(
        8, ge=4, le=32, description="BLAKE2b digest bytes kept per value (shuffle size vs collisions)."
    )

    @field_validator("by")
    @classmethod
    def _non_empty(cls, v):
        if not v or len(set(v)) != len(v) or not all(v):
            raise ValueError("'by' must list column names (e.g. 'url', 'sha256'), each once")
        return v


def key_rank(key: str) -> tuple:
    """Sort key of a row key: digit keys as numbers (shorter first, then by text), others after, as text
    (the order every dedup tier keeps the first of)."""
    return (0, len(key), key) if key.isdigit() else (1, 0, key)


def _smaller(a: str, b: str) -> bool:
    """True if key ``a`` sorts before key ``b`` (``key_rank``)."""
    return key_rank(a) < key_rank(b)


def key_order(keys: pa.Array) -> list[tuple[pa.Array, str]]:
    """Sort keys (for ``Table.sort_by``) that order ``keys`` as ``key_rank`` does."""
    keys = keys.cast(pa.string())
    digit = pc.utf8_is_digit(keys).fill_null(False)
    nd = pc.cast(pc.invert(digit), pa.int8())
    length = pc.if_else(digit, pc.utf8_length(keys), pa.scalar(0, pa.int32()))
    return [(nd, "ascending"), (length, "ascending"), (keys, "ascending")]


class Dedup(ShuffleStage):
    name = "dedup"
    Config = DedupConfig
    requires = ("key",)

    def required_columns(self) -> tuple[str, ...]:
        # The fields deduped on: ``sha256`` is filled by the download, so the plan rejects a dedup
        # on it placed before the download (it would find no duplicates), and a column nothing
        # makes is refused before any work.
        return (*self.requires, *self.config.by)

    @property
    def partition_columns(self) -> tuple[str, ...]:  # type: ignore[override] - depends on the config
        return tuple(self.config.by)

    def _digest(self, value: Any) -> bytes:
        text = value if isinstance(value, str) else str(value)
        return hashlib.blake2b(
            text.encode("utf-8", "surrogatepass"), digest_size=self.config.hash_bytes
        ).digest()

    # ---- partition -----------------------------------------------------------------------
    def partition_rows(self, batch: pa.Table) -> pa.Table:
        keys = batch.column("key").cast(pa.string()).to_pylist()
        out_key, out_rank, out_h = [], [], []
        for rank, field in enumerate(self.config.by):
            if field not in batch.column_names:
                continue
            for key, value in zip(keys, batch.column(field).to_pylist()):
                if value is None or value == "":
                    continue
                out_key.append(key)
                out_rank.append(rank)
                out_h.append(self._digest(value))
        hb = self.config.hash_bytes
        head = b"".join(h[:8].ljust(8, b"\0") for h in out_h)
        part = np.frombuffer(head, dtype=">u8").astype(np.uint64) if out_h else np.zeros(0, np.uint64)
        part = part ^ (np.asarray(out_rank, dtype=np.uint64) * np.uint64(_MIX))
        return pa.table(
            {
                PART: pa.array(part, pa.uint64()),
                "key": pa.array(out_key, pa.string()),
                "rank": pa.array(out_rank, pa.int64()),
                "h": pa.array(out_h, pa.binary(hb)),
            }
        )

    # ---- decide --------------------------------------------------------------------------
    def decide(self, group: pa.Table) -> pa.Table:
        """Flag every row of ``group`` that is not the smallest key of its ``(rank, h)``."""
        if group.num_rows == 0:
            return decisions(group, [], [], [])
        idx = pa.array(np.arange(group.num_rows, dtype=np.int64))
        order = pa.table({"rank": group.column("rank"), "h": group.column("h"), "i": idx})
        for n, (arr, _) in enumerate(key_order(group.column("key"))):
            order = order.append_column(f"k{n}", arr)
        order = order.sort_by([("rank", "ascending"), ("h", "ascending"), ("k0", "ascending"),
                               ("k1", "ascending"), ("k2", "ascending")])  # fmt: skip
        rank = order.column("rank").to_numpy()
        h = order.column("h").combine_chunks()
        n = len(rank)
        first = np.ones(n, dtype=bool)
        if n > 1:
            same_h = pc.equal(h.slice(1), h.slice(0, n - 1)).to_numpy(zero_copy_only=False)
            first[1:] = ~(same_h & (rank[1:] == rank[:-1]))
        start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        dup = np.flatnonzero(~first)
        rows = order.column("i").to_numpy()
        keys = order.column("k2").to_pylist() if len(dup) else []
        by = self.config.by
        kept = [keys[start[j]] for j in dup]
        fields = [by[rank[j]] for j in dup]
        return decisions(
            group,
            rows[dup].tolist(),
            [f"dedup:{f} duplicate of key {k}" for f, k in zip(fields, kept)],
            [f"duplicate:{f}" for f in fields],
            ranks=rank[dup].tolist(),
        )

    def group_summary(self, group: pa.Table, decided: pa.Table) -> dict[str, Any]:
        """Distinct values per field in this partition (a value lives in one partition only)."""
        out = {}
        rank = group.column("rank")
        for i, field in enumerate(self.config.by):
            h = group.column("h").filter(pc.equal(rank, i))
            out[f"unique_{field}"] = int(pc.count_distinct(h).as_py()) if len(h) else 0
        return out

    def decision_summary(self, table: pa.Table) -> dict[str, Any]:
        out = {"flagged": table.num_rows}
        for field in self.config.by:
            out[f"duplicate_{field}"] = 0
        if table.num_rows:
            for d in pc.value_counts(table.column("rule")).to_pylist():
                field = d["values"].split(":", 1)[1]
                out[f"duplicate_{field}"] = d["counts"]
        return out
