"""Exact dedup (``dedup``), a global stage: one row per URL and one row per image ``sha256``.

Fit: for every ``ok`` row and every field in ``by``, hash the value and remember the smallest key
that holds it. Apply: a row whose key is not the smallest for one of its values is a
``duplicate``; the reason names the field and the kept key:

    dedup:url duplicate of key 000000012
    dedup:sha256 duplicate of key 000000012

So the first occurrence by key is kept, whatever the batch split or the order of the workers.
Each field is judged on its own: a row is kept only if it holds the smallest key for every one
of its values, and the reason names the first field (in ``by`` order) it loses on. (The key named
there may itself be dropped for another field.) Null or empty values are never duplicates.

Keys compare as numbers when they are digit strings (shorter first, then by text), which is plain
text order for the fixed-width keys ``read`` makes.

State: ``{field: {hash: key}}`` with one entry per *distinct* value of each field among ``ok``
rows, so it grows with the number of unique URLs/images, not with duplicates. A hash is the first
``hash_bytes`` bytes of BLAKE2b, in hex; at the default 8 bytes an entry is about 40 bytes of JSON
(16 hex + a key), so 10M unique URLs + images take about 800 MB of JSON and several times that
as a Python dict while merging. The chance of any false duplicate among N distinct values is about
N^2 / 2^(8*hash_bytes+1): ~3e-6 for N = 10M at 8 bytes; raise ``hash_bytes`` for billion-row pools.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from schemas import OK, Status
from stages.base import Stage, StageConfig, set_status


class DedupConfig(StageConfig):
    by: list[Literal["url", "sha256"]] = Field(
        ["url", "sha256"], description="Fields to dedup on, checked in this order (`sha256` needs `download` before)."
    )
    hash_bytes: int = Field(
        8, ge=4, le=32, description="BLAKE2b digest bytes kept per value (state size vs collisions)."
    )

    @field_validator("by")
    @classmethod
    def _non_empty(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError("'by' must list 'url' and/or 'sha256', each once")
        return v


def _smaller(a: str, b: str) -> bool:
    """True if key ``a`` sorts before key ``b``: digit keys as numbers, others after, as text."""
    da, db = a.isdigit(), b.isdigit()
    if da and db:
        return (len(a), a) < (len(b), b)
    if da != db:
        return da
    return a < b


class Dedup(Stage):
    name = "dedup"
    Config = DedupConfig
    requires = ("key",)
    is_global = True

    fit_columns = ("url", "sha256")

    def required_columns(self) -> tuple[str, ...]:
        # The fields deduped on: ``sha256`` is filled by the download, so the plan rejects a dedup
        # on it placed before the download (it would find no duplicates).
        return (*self.requires, *self.config.by)

    def _hash(self, value: str) -> str:
        return hashlib.blake2b(
            value.encode("utf-8", "surrogatepass"), digest_size=self.config.hash_bytes
        ).hexdigest()

    # ---- fit -----------------------------------------------------------------------------
    def fit_partial(self, batch: pa.Table) -> dict[str, dict[str, str]]:
        ok = pc.equal(batch.column("status"), OK).fill_null(False)
        rows = batch.filter(ok)
        keys = rows.column("key").to_pylist()
        state: dict[str, dict[str, str]] = {}
        for field in self.config.by:
            seen: dict[str, str] = {}
            values = rows.column(field).to_pylist() if field in rows.column_names else [None] * len(keys)
            for key, value in zip(keys, values):
                if not value:
                    continue
                h = self._hash(value)
                old = seen.get(h)
                if old is None or _smaller(key, old):
                    seen[h] = key
            state[field] = seen
        return state

    def merge(self, states: list[dict[str, dict[str, str]]]) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {field: {} for field in self.config.by}
        for state in states:
            for field, seen in state.items():
                acc = out.setdefault(field, {})
                for h, key in seen.items():
                    old = acc.get(h)
                    if old is None or _smaller(key, old):
                        acc[h] = key
        return out

    def load_state(self, state: dict[str, dict[str, str]]) -> None:
        self._state = state

    def state_summary(self, state: dict[str, dict[str, str]]) -> dict[str, Any]:
        return {f"unique_{field}": len(seen) for field, seen in state.items()}

    # ---- apply ---------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        state = getattr(self, "_state", None)
        if state is None:
            raise RuntimeError("dedup: no fitted state; call load_state(merge([fit_partial(...)])) first")
        keys = batch.column("key").to_pylist()
        reasons: list[str | None] = [None] * len(keys)
        rules: list[str | None] = [None] * len(keys)
        for field in self.config.by:
            seen = state.get(field, {})
            values = batch.column(field).to_pylist() if field in batch.column_names else [None] * len(keys)
            for i, (key, value) in enumerate(zip(keys, values)):
                if reasons[i] is not None or not value:
                    continue
                kept = seen.get(self._hash(value))
                # A value missing from the state was not seen in the fit pass: nothing to compare.
                if kept is not None and _smaller(kept, key):
                    reasons[i] = f"dedup:{field} duplicate of key {kept}"
                    rules[i] = f"duplicate:{field}"
        mask = [r is not None for r in reasons]
        if any(mask):
            batch = set_status(batch, mask, Status.DUPLICATE, reasons, rule=rules)
        return batch
