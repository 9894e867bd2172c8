"""The row functions of the ``ray.data.llm`` path of the recaption stage (Ray-free).

One request per ``ok`` row with image bytes: unlike ``rewrite`` there is one generation per row, so no
request rows are split off. :meth:`RecapRayPath.explode` marks the other rows as carriers (they bypass
every ``ray.data.llm`` stage through Ray's ``__inference_error__`` mechanism) and stores the batch's Arrow
schema in each row; :meth:`preprocess` adds the engine's request fields to the row (Ray carries the
row's other columns through its stages); :meth:`postprocess` drops them again and keeps ``(text,
error)``; :meth:`collect` validates the captions and restores the column types, in key order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from schemas import OK, conform
from stages.recaption.validate import clean_output, rejection
from stages.rewrite.raypath import RAY_ERROR

SCHEMA, TEXT, ERROR = "_rc_schema", "_rc_text", "_rc_error"
CARRY = "recaption: carrier row"
# A 1x1 PNG: carriers get a request of the same shape as the others (Ray cannot concatenate blocks
# where a nested struct is all null), though they never reach the engine.
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8ffff3f0005fe02fe"
    "a7d6a4a20000000049454e44ae426082"
)


class RecapRayPath:
    """``request(caption, image_bytes, seed)`` returns the engine's request fields of one row;
    ``response(row)`` returns ``(text, error)`` from the engine's output fields of one row."""

    def __init__(
        self,
        config,
        prompts,
        request: Callable[[str, bytes, int], dict[str, Any]],
        response: Callable[[dict[str, Any]], tuple[str | None, str | None]],
    ):
        self.config, self.prompts, self.request, self.response = config, prompts, request, response

    def explode(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        schema = batch.schema.remove_metadata().serialize().to_pybytes()
        status = batch.column("status").to_pylist() if "status" in batch.column_names else [OK] * n
        images = batch.column("image").to_pylist()
        carry = [CARRY if st != OK or not img else "" for st, img in zip(status, images)]
        batch = batch.append_column(SCHEMA, pa.array([schema] * n, pa.binary()))
        return batch.append_column(RAY_ERROR, pa.array(carry, pa.string()))

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get(RAY_ERROR):
            req = self.request("", TINY_PNG, 0)
        else:
            key = str(row["key"])
            req = self.request(self.prompts.caption(row.get("caption")), row["image"], self.prompts.seed(key))
        return {**row, **req}

    def postprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        text, error = self.response(row)
        names = _schema(row[SCHEMA]).names
        return {
            **{k: row.get(k) for k in names},
            SCHEMA: row[SCHEMA],
            TEXT: text,
            ERROR: error,
            RAY_ERROR: "",
        }

    def collect(self, group: pa.Table) -> pa.Table:
        rows = sorted(group.to_pylist(), key=lambda r: str(r["key"]))
        if not rows:
            return group
        schema = _schema(rows[0][SCHEMA])
        out = []
        for r in rows:
            o = {name: r.get(name) for name in schema.names}
            o["caption_recap"], o["recap_reason"] = None, None
            err = r.get(RAY_ERROR) or ""
            if err == CARRY:
                if o.get("status") == OK:
                    o["recap_reason"] = "no image"
            elif err:
                o["recap_reason"] = f"engine_error {err}"[:200]
            else:
                text = clean_output(r.get(TEXT))
                why = r.get(ERROR) or rejection(text, self.config.max_chars)
                o["caption_recap"], o["recap_reason"] = (None, why[:200]) if why else (text, None)
            out.append(o)
        table = pa.Table.from_pylist(out)
        for f in schema:  # Ray's row dicts lose Arrow types
            if f.name in table.column_names and table.schema.field(f.name).type != f.type:
                table = table.set_column(table.column_names.index(f.name), f.name, table[f.name].cast(f.type))
        return conform(table)


@functools.lru_cache(maxsize=64)
def _schema(serialized: bytes) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(serialized))
