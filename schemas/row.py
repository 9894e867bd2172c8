"""The Arrow row schema.

One row is one image-text pair. ``BASE_FIELDS`` exist from the read stage on; stages add the
columns listed in ``STAGE_FIELDS`` (the planner checks that every column a stage requires is
produced upstream). Column names follow img2dataset / DataComp.
"""

from __future__ import annotations

import pyarrow as pa

BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("key", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("image", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("sha256", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("rejected_by", pa.string()),  # name of the stage that set a non-ok status
    pa.field("rule", pa.string()),  # short stable tag of the rule that rejected the row (README)
    pa.field("thumbnail", pa.binary()),  # small JPEG of a sample of rejected rows (stages.thumbnails)
)
BASE_SCHEMA = pa.schema(BASE_FIELDS)

# Base columns that exist (possibly null) from the source on, but carry data only once a stage
# that declares them in ``fills`` has run (the planner checks ``requires`` against that).
FILLED_LATER: tuple[str, ...] = ("image", "width", "height", "original_width", "original_height", "sha256")

def key_digits(n_shards: int, samples_per_shard: int) -> tuple[int, int]:
    """Digits of the shard and index parts of a key (img2dataset's scheme)."""
    import math

    shard_digits = max(5, len(str(max(n_shards - 1, 0))))
    index_digits = max(1, math.ceil(math.log10(samples_per_shard))) if samples_per_shard > 1 else 1
    return shard_digits, index_digits


def make_key(shard: int, index: int, shard_digits: int, index_digits: int) -> str:
    """A row's key from its input position: ``{shard}{index}``, zero-padded."""
    return f"{shard:0{shard_digits}d}{index:0{index_digits}d}"


# Internal: the output shard a row belongs to (set by the source, dropped by the sink).
SHARD_COL = "_shard"
# One input shard as the source loads it (what the executor hands ``Source.load``).
SHARD_SPEC_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("path", pa.string()),
        ("rows", pa.int64()),
        ("shard_digits", pa.int32()),
        ("index_digits", pa.int32()),
    ]
)

# Columns that stages may add. A stage's ``produces`` must name columns from this table
# (or, for pass-through user columns such as ``save_additional_columns``, declare them at
# run time through ``Stage.extra_produces``).
STAGE_FIELDS: dict[str, pa.DataType] = {
    # download
    "exif": pa.string(),
    "http_status": pa.int32(),
    # clip_score
    "clip_score": pa.float32(),
    "image_embedding": pa.list_(pa.float16()),
    "text_embedding": pa.list_(pa.float16()),
    # filters
    "language": pa.string(),
    # near_dedup
    "phash": pa.string(),
    # balance
    "metaclip_entries": pa.list_(pa.int32()),
    # balance_worldwide (also metaclip_entries: ids within the row's language list)
    "metaclip_language": pa.string(),
    "metaclip_p": pa.float64(),
    # rewrite
    "caption_rewrites": pa.list_(pa.string()),
    "rewrite_reason": pa.string(),
    # recaption / fuse (stages/recaption)
    "caption_recap": pa.string(),
    "recap_reason": pa.string(),
    "caption_fused": pa.string(),
    "fuse_reason": pa.string(),
}

# Columns by role, for readers that must not know which stage adds them (the HTML report):
# per-row scores (a histogram each, thresholds from the stages that require or produce them),
# per-row lists of matched entry ids (counts after balancing), and the rewritten captions.
IMAGE_COLUMN = "image"
SCORE_COLUMNS: tuple[str, ...] = ("clip_score",)
REWRITES_COLUMN = "caption_rewrites"
REWRITE_REASON_COLUMN = "rewrite_reason"  # why a row got fewer rewrites than asked (null: all of them)
LANGUAGE_COLUMN = "language"  # detected language code of the caption
THUMBNAIL_COLUMN = "thumbnail"

# Written by the sink into the Parquet: the tar (relative to the output) holding the row's sample (null:
# none), and, with write.img2dataset_compat (where ``status`` holds img2dataset's values), our status.
TAR_COLUMN = "tar"
OWN_STATUS_COLUMN = "clipcurate_status"

# Columns nulled when a row is rejected (they are the expensive ones to carry around).
HEAVY_COLUMNS: tuple[str, ...] = ("image", "image_embedding", "text_embedding")
# Columns that never go in a sample's ``.json`` inside the tar.
TAR_EXCLUDED_COLUMNS: frozenset[str] = frozenset({"image", "image_embedding", "text_embedding", "thumbnail"})
# Named embedding columns (``clip_l14_image_embedding``...) are heavy and stay out of the tar too.
EMBEDDING_SUFFIX = "_embedding"


def is_heavy(name: str) -> bool:
    """A heavy column: nulled on rejected rows, never in a sample's ``.json``."""
    return name in HEAVY_COLUMNS or name.endswith(EMBEDDING_SUFFIX)


def field_type(name: str) -> pa.DataType | None:
    for f in BASE_FIELDS:
        if f.name == name:
            return f.type
    return STAGE_FIELDS.get(name)


def known_columns() -> set[str]:
    return {f.name for f in BASE_FIELDS} | set(STAGE_FIELDS)


def empty_table(extra: dict[str, pa.DataType] | None = None) -> pa.Table:
    fields = list(BASE_FIELDS) + [pa.field(k, v) for k, v in (extra or {}).items()]
    return pa.schema(fields).empty_table()


def conform(table: pa.Table, extra_columns: dict[str, pa.DataType] | None = None) -> pa.Table:
    """Return ``table`` with every base column present (nulls where missing), base columns first
    in schema order, each cast to its schema type. Other columns keep their order after them."""
    n = table.num_rows
    cols, names = [], []
    for f in BASE_FIELDS:
        if f.name in table.column_names:
            col = table.column(f.name)
            if col.type != f.type:
                col = col.cast(f.type)
        else:
            col = pa.nulls(n, f.type)
        cols.append(col)
        names.append(f.name)
    for name in table.column_names:
        if name in names:
            continue
        col = table.column(name)
        want = (extra_columns or {}).get(name) or STAGE_FIELDS.get(name)
        if want is not None and col.type != want:
            col = col.cast(want)
        cols.append(col)
        names.append(name)
    return pa.Table.from_arrays(cols, names=names)


def null_heavy(table: pa.Table, mask: pa.Array) -> pa.Table:
    """Null the heavy columns (``is_heavy``) where ``mask`` is true."""
    import pyarrow.compute as pc

    for name in [c for c in table.column_names if is_heavy(c)]:
        if name in table.column_names:
            i = table.column_names.index(name)
            col = table.column(name)
            table = table.set_column(i, name, pc.if_else(mask, pa.nulls(len(col), col.type), col))
    return table
