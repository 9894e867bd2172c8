"""The row functions of the ``ray.data.llm`` path (Ray-free: ``pipeline/ray`` applies them).

``ray.data.llm`` engines return one generation per row, so :meth:`RayPath.explode` turns each input row
into one *carrier* row (the original columns and their Arrow schema; it bypasses the LLM stages through
Ray's ``__inference_error__`` mechanism) plus ``n_rewrites + spares`` light request rows (key, shard
column, caption). :meth:`RayPath.preprocess` builds each request with the engine's ``request`` function,
:meth:`RayPath.postprocess` reads its output with the engine's ``response`` function, and
:meth:`RayPath.collect` gathers the rows back by key (or by shard), with the original column types
restored. That path cannot re-ask after seeing an output, so its retries are the ``spares``: extra
generations that replace rejected ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from schemas import OK, conform
from schemas.row import SHARD_COL
from stages.rewrite.prompt import Prompts
from stages.rewrite.validate import RowRewrites

# Bookkeeping columns (removed again by ``collect``).
SLOT, CAPTION, EXAMPLES, SCHEMA = "_rw_slot", "_rw_caption", "_rw_examples", "_rw_schema"
TEXT, ERROR = "_rw_text", "_rw_error"
RAY_ERROR = "__inference_error__"  # rows with a non-empty value bypass every ray.data.llm stage
CARRY = "rewrite: carrier row"


class RayPath:
    """Explode, pre/postprocess and collect for one configured stage (picklable; no Ray import).

    ``request(caption, examples, seed)`` returns the engine's request fields of one row;
    ``response(row)`` returns ``(text, error)`` from the engine's output fields of one row."""

    def __init__(
        self,
        config,
        prompts: Prompts,
        request: Callable[[str, list[int], int], dict[str, Any]],
        response: Callable[[dict[str, Any]], tuple[str | None, str | None]],
    ):
        self.config = config
        self.prompts = prompts
        self.request = request
        self.response = response

    def explode(self, batch: pa.Table) -> pa.Table:
        """One carrier row per input row (all its columns, and its Arrow schema so that ``collect``
        can restore the types after Ray's row dicts), plus ``n_rewrites + spares`` light request
        rows for each ``ok`` row with a caption."""
        c = self.config
        n = batch.num_rows
        schema = batch.schema.remove_metadata().serialize().to_pybytes()
        carriers = batch.append_column(SLOT, pa.array([-1] * n, pa.int64()))
        carriers = carriers.append_column(SCHEMA, pa.array([schema] * n, pa.binary()))
        carriers = carriers.append_column(RAY_ERROR, pa.array([CARRY] * n, pa.string()))
        rows, slots, captions = [], [], []
        status = batch.column("status").to_pylist() if "status" in batch.column_names else [OK] * n
        for i, (caption, st) in enumerate(zip(batch.column("caption").to_pylist(), status)):
            caption = self.prompts.caption(caption)
            if st == OK and caption:
                for slot in range(c.n_rewrites + c.engine.spares):
                    rows.append(i)
                    slots.append(slot)
                    captions.append(caption)
        # Request rows keep the key and the shard column (the executor gathers rows by shard).
        reqs = batch.select([name for name in ("key", SHARD_COL) if name in batch.column_names]).take(rows)
        reqs = reqs.append_column(SLOT, pa.array(slots, pa.int64()))
        reqs = reqs.append_column(CAPTION, pa.array(captions, pa.string()))
        reqs = reqs.append_column(RAY_ERROR, pa.array([""] * len(rows), pa.string()))
        return pa.concat_tables([carriers, reqs], promote_options="permissive")

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get(RAY_ERROR):
            # The carrier bypasses the LLM stages, but gets a request of the same shape: Ray cannot
            # concatenate blocks where a nested struct (payload, sampling_params) is all null.
            key, slot, caption = "carrier", 0, ""
        else:
            key, slot, caption = str(row["key"]), int(row[SLOT]), row[CAPTION]
        examples = self.prompts.examples(key, slot, 0)
        return {EXAMPLES: examples, **self.request(caption, examples, self.prompts.seed(key, slot, 0))}

    def postprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        text, error = self.response(row)
        out = {"key": row["key"], SLOT: row[SLOT], CAPTION: row[CAPTION], EXAMPLES: list(row[EXAMPLES]),
               TEXT: text, ERROR: error, RAY_ERROR: ""}  # fmt: skip
        if SHARD_COL in row:
            out[SHARD_COL] = row[SHARD_COL]
        return out

    def collect(self, group: pa.Table) -> pa.Table:
        """Gather carrier and request rows (of one key, or of several: a whole shard) into one row per
        key, sorted by key (the input order within a shard)."""
        carriers: dict[str, dict[str, Any]] = {}
        requests_: dict[str, list[dict[str, Any]]] = {}
        for r in group.to_pylist():
            key = str(r["key"])
            if r.get(SLOT) == -1:
                if key in carriers:
                    raise RuntimeError(f"rewrite: two carrier rows for key {key!r}")
                carriers[key] = r
            else:
                requests_.setdefault(key, []).append(r)
        if set(requests_) - set(carriers):
            raise RuntimeError(
                f"rewrite: request rows without a carrier row: {sorted(set(requests_) - set(carriers))[:3]}"
            )
        order = sorted(carriers)
        rows = [self._collect_one(carriers[k], requests_.get(k, [])) for k in order]
        table = pa.Table.from_pylist(rows)
        schema = _schema(carriers[order[0]][SCHEMA]) if order else pa.schema([])
        for f in schema:  # Ray's row dicts lose Arrow types (int32 -> int64 or double, ...)
            if f.name in table.column_names and table.schema.field(f.name).type != f.type:
                table = table.set_column(table.column_names.index(f.name), f.name, table[f.name].cast(f.type))
        return conform(table)

    def _collect_one(self, carrier: dict[str, Any], reqs: list[dict[str, Any]]) -> dict[str, Any]:
        names = _schema(carrier[SCHEMA]).names
        out = {name: carrier.get(name) for name in names}
        out["caption_rewrites"], out["rewrite_reason"] = None, None  # rows that were not ok
        if reqs:
            state = RowRewrites(reqs[0][CAPTION], self.config, self.prompts.bank)
            for r in sorted(reqs, key=lambda r: r[SLOT]):
                if len(state.accepted) >= self.config.n_rewrites:
                    break
                engine_error = r.get(RAY_ERROR) or None
                error = r.get(ERROR) or (f"engine_error {engine_error}"[:80] if engine_error else None)
                state.offer(r[SLOT], r.get(TEXT), list(r.get(EXAMPLES) or []), error)
            out["caption_rewrites"], out["rewrite_reason"] = state.result()
        elif out.get("status") == OK:
            out["caption_rewrites"], out["rewrite_reason"] = [], "no caption"
        return out


@functools.lru_cache(maxsize=64)
def _schema(serialized: bytes) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(serialized))
