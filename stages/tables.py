"""Arrow table helpers of the stage contract: set a rejected row's ``status``/``reason``/``rule``
(``set_status``), set or append a column with the row schema's type (``replace_column``), and give a
stage's output the columns it declares (``_add_missing``, ``_align_columns``)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from schemas import field_type


def _add_missing(table: pa.Table, cols: dict[str, pa.DataType]) -> pa.Table:
    for name, typ in cols.items():
        if name not in table.column_names:
            table = table.append_column(pa.field(name, typ), pa.nulls(table.num_rows, typ))
    return table


def _align_columns(table: pa.Table, like: pa.Table) -> pa.Table:
    """Give ``table`` the columns of ``like`` in the same order (nulls for missing ones)."""
    for f in like.schema:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    names = like.column_names + [c for c in table.column_names if c not in like.column_names]
    return table.select(names)


def set_status(table: pa.Table, mask, status: str, reasons, rule=None) -> pa.Table:
    """Set ``status``/``reason``/``rule`` where ``mask`` is true. ``reasons`` is one string or one per
    row (free text: numbers, keys, hosts); ``rule`` a short stable tag (README, "Statuses and reasons"),
    one string or one per row; None: the status itself."""
    mask = pa.array(mask, pa.bool_()) if not isinstance(mask, pa.Array | pa.ChunkedArray) else mask
    n = table.num_rows

    def per_row(v):
        one = v is None or isinstance(v, str)
        return pa.array([v] * n if one else list(v), pa.string())

    st = pc.if_else(mask, pa.array([str(status)] * n, pa.string()), table.column("status"))
    rsn = pc.if_else(mask, per_row(reasons), table.column("reason"))
    old_rule = table.column("rule") if "rule" in table.column_names else pa.nulls(n, pa.string())
    rl = pc.if_else(mask, per_row(str(status) if rule is None else rule), old_rule)
    table = table.set_column(table.column_names.index("status"), "status", st)
    table = table.set_column(table.column_names.index("reason"), "reason", rsn)
    return replace_column(table, "rule", rl, pa.string())


def replace_column(table: pa.Table, name: str, values, typ: pa.DataType | None = None) -> pa.Table:
    """Set or append column ``name``."""
    typ = typ or field_type(name)
    arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values, typ)
    if typ is not None and arr.type != typ:
        arr = arr.cast(typ)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(pa.field(name, arr.type), arr)
