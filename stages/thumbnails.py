"""Small JPEG thumbnails of a bounded sample of rejected rows, so the report can show what each rule dropped.

A rejected row loses its image bytes (``schemas.row.HEAVY_COLUMNS``); just before that, the stage base
class (``stages.base``) keeps a thumbnail (``THUMBNAIL_PX`` on the longest side) in the ``thumbnail``
column for at most ``PER_RULE`` rows per (status, rule) per call, i.e. per shard and stage, and only for
rows whose image bytes exist (a failed download has none). The writer then keeps at most
``write.rejected_thumbnails`` per status per shard (``keep_per_status``), spread over the rules.
"""

from __future__ import annotations

import io
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from schemas import OK
from schemas.row import IMAGE_COLUMN, THUMBNAIL_COLUMN

THUMBNAIL_PX = 96  # longest side
PER_RULE = 8  # thumbnails a stage keeps per (status, rule) per call (one call is one shard)


def jpeg_thumbnail(data: bytes, px: int = THUMBNAIL_PX) -> bytes | None:
    """A JPEG of at most ``px`` pixels on the longest side, or None when ``data`` is not an image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (px, px))  # JPEG: decode at a reduced scale
            im = im.convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=75)
    except Exception:  # noqa: BLE001 - bytes that do not decode get no thumbnail
        return None
    return buf.getvalue()


class Budget:
    """Thumbnails left per (status, rule) for one call of a stage."""

    def __init__(self, per_rule: int = PER_RULE):
        self.per_rule = per_rule
        self.used: Counter[tuple[str, str]] = Counter()

    def fill(self, table: pa.Table, mask: pa.Array) -> pa.Table:
        """Set ``thumbnail`` for rows of ``mask`` (rows a stage just rejected) that still have image
        bytes, while the budget of their (status, rule) lasts. Other rows keep their value."""
        if IMAGE_COLUMN not in table.column_names or THUMBNAIL_COLUMN not in table.column_names:
            return table
        images, thumbs = table.column(IMAGE_COLUMN), table.column(THUMBNAIL_COLUMN)
        wanted = pc.and_(pc.and_(mask, pc.is_valid(images)), pc.is_null(thumbs)).fill_null(False)
        idx = pc.indices_nonzero(wanted)  # the image bytes of other rows are never touched
        if not len(idx):
            return table
        status = table.column("status").take(idx).to_pylist()
        rules = table.column("rule").take(idx).to_pylist() if "rule" in table.column_names else status
        made: dict[int, bytes] = {}
        for i, st, rule in zip(idx.to_pylist(), status, rules):
            key = (st, rule or st)
            if self.used[key] >= self.per_rule:
                continue
            thumb = jpeg_thumbnail(images[i].as_py())
            if thumb is not None:
                made[i] = thumb
                self.used[key] += 1
        if not made:
            return table
        values = thumbs.to_pylist()  # nulls but a few: cheap
        for i, thumb in made.items():
            values[i] = thumb
        i = table.column_names.index(THUMBNAIL_COLUMN)
        return table.set_column(i, THUMBNAIL_COLUMN, pa.array(values, pa.binary()))


def keep_per_status(table: pa.Table, n: int) -> pa.Table:
    """Null every thumbnail but at most ``n`` per status, taken round-robin over the status's rules
    (in row order within a rule), and every thumbnail of an ``ok`` row."""
    if THUMBNAIL_COLUMN not in table.column_names:
        return table
    col = table.column(THUMBNAIL_COLUMN)
    if col.null_count == len(col):
        return table
    status = table.column("status").to_pylist()
    rule = table.column("rule").to_pylist() if "rule" in table.column_names else [None] * len(status)
    queues: dict[str, dict[str, list[int]]] = {}
    for i, has in enumerate(pc.is_valid(col).to_pylist()):
        if has and status[i] != OK:
            queues.setdefault(status[i], {}).setdefault(rule[i] or "", []).append(i)
    keep: set[int] = set()
    for by_rule in queues.values():
        lists = [by_rule[r] for r in sorted(by_rule)]
        picked, depth = 0, 0
        while picked < n and any(depth < len(x) for x in lists):
            for x in lists:
                if depth < len(x) and picked < n:
                    keep.add(x[depth])
                    picked += 1
            depth += 1
    mask = pa.array([i in keep for i in range(len(status))], pa.bool_())
    kept = pc.if_else(mask, col, pa.nulls(len(col), col.type))
    return table.set_column(table.column_names.index(THUMBNAIL_COLUMN), THUMBNAIL_COLUMN, kept)
