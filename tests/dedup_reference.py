"""The driver-merge exact dedup that ``stages/dedup.py`` replaced (kept only as a reference: the
exactness tests and ``bench/dedup_scale.py`` check the shuffle stage against it).

Fit: per block, ``{field: {blake2b(value): smallest key}}``; merge those dicts (one process holds
one entry per distinct value of the pool); apply: a row whose key is not the smallest for one of its
values (the first field in ``by`` order it loses on) is a ``duplicate``."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from schemas import OK, Status, conform
from stages.dedup import _smaller
from stages.tables import set_status


def _hash(value, hash_bytes: int) -> str:
    text = value if isinstance(value, str) else str(value)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=hash_bytes).hexdigest()


def fit_partial(batch: pa.Table, by, hash_bytes: int = 8) -> dict[str, dict[str, str]]:
    rows = batch.filter(pc.equal(batch.column("status"), OK).fill_null(False))
    keys = rows.column("key").to_pylist()
    state = {}
    for field in by:
        seen: dict[str, str] = {}
        values = rows.column(field).to_pylist() if field in rows.column_names else [None] * len(keys)
        for key, value in zip(keys, values):
            if value is None or value == "":
                continue
            h = _hash(value, hash_bytes)
            old = seen.get(h)
            if old is None or _smaller(key, old):
                seen[h] = key
        state[field] = seen
    return state


def merge(states, by) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {field: {} for field in by}
    for state in states:
        for field, seen in state.items():
            acc = out[field]
            for h, key in seen.items():
                old = acc.get(h)
                if old is None or _smaller(key, old):
                    acc[h] = key
    return out


def apply(batch: pa.Table, state, by, hash_bytes: int = 8) -> pa.Table:
    batch = conform(batch)
    keys = batch.column("key").to_pylist()
    status = batch.column("status").to_pylist()
    reasons: list[str | None] = [None] * len(keys)
    rules: list[str | None] = [None] * len(keys)
    for field in by:
        seen = state.get(field, {})
        values = batch.column(field).to_pylist() if field in batch.column_names else [None] * len(keys)
        for i, (key, value) in enumerate(zip(keys, values)):
            if status[i] != OK or reasons[i] is not None or value is None or value == "":
                continue
            kept = seen.get(_hash(value, hash_bytes))
            if kept is not None and _smaller(kept, key):
                reasons[i] = f"dedup:{field} duplicate of key {kept}"
                rules[i] = f"duplicate:{field}"
    mask = [r is not None for r in reasons]
    if any(mask):
        batch = set_status(batch, mask, Status.DUPLICATE, reasons, rule=rules)
    return batch


def dedup(tables: list[pa.Table], by=("url", "sha256"), hash_bytes: int = 8) -> dict[str, str]:
    """``{key: reason}`` of the rows the driver-merge dedup flags over ``tables``."""
    state = merge([fit_partial(conform(t), by, hash_bytes) for t in tables], by)
    out = {}
    for t in tables:
        done = apply(t, state, by, hash_bytes)
        for k, st, r in zip(*(done.column(c).to_pylist() for c in ("key", "status", "reason"))):
            if st == Status.DUPLICATE:
                out[k] = r
    return out
