"""Read URL lists (parquet, csv, tsv, json, jsonl, txt; optionally gzipped) or existing WebDataset shards.

``path`` is a file, a folder, a glob or a list of them. Before anything runs, ``check`` looks at the input
without reading it whole (listing, Parquet footers, first rows of text files): files exist, their format is
known, the configured columns are there, and there is a row (unless ``allow_empty``).

Reading happens in two steps, like img2dataset:

1. ``split`` (on the driver, streaming, never the whole list in memory): the input is cut into
   input shards of ``samples_per_shard`` rows, written as small Parquet files (text only) in the run
   directory. The position of a row in the input fixes its shard id and its index, hence its key
   (``f"{shard:0{shard_digits}d}{index:0{index_digits}d}"``, img2dataset's scheme). Keys are then
   stable across reruns and resume, whatever Ray does. With ``key_col`` the keys are a column's values
   instead (checked by ``stages.read_keys``: present, dot-free, unique within the run). The columns of
   ``save_additional_columns`` keep their input types (one type per column over the run).
2. ``__call__`` (in Ray tasks) loads one or more input shards: a table of shard specs in, rows out.

``input_format: webdataset`` re-reads tars (ours or img2dataset's) for re-curation without
downloading again: each tar is one shard, members are grouped by key, names are sanitised
(absolute paths and ``..`` are refused), and the image bytes, caption and json metadata come back
as rows with status ``ok``.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, ValidationInfo, field_validator

from schemas import OK, conform
from schemas.members import IMAGE_EXTS, split_member
from schemas.row import FILLED_LATER, SHARD_COL, key_digits, make_key  # noqa: F401 - key_digits re-exported
from schemas.row import SHARD_SPEC_SCHEMA as SPEC_SCHEMA  # noqa: F401 - re-exported
from stages.base import Resources, RoleConfig, StageFailed, path_field
from stages.read_files import iter_key_batches, stream_file
from stages.roles import Source

FORMATS = ("auto", "parquet", "csv", "tsv", "json", "jsonl", "txt", "webdataset")
# Columns the pipeline sets on every row: never carried from the input by save_additional_columns.
RESERVED_COLUMNS = frozenset({"key", "status", "reason", "rejected_by", "image", SHARD_COL})


class ReadConfig(RoleConfig):
    path: str | list[str] = path_field(
        always=True,
        description="A file, folder or glob, or a list of them; any fsspec path (`s3://...`, `file://...`). "
        "A folder is read as its files of the format, sorted by name (names starting with `.` or `_` skipped)."
    )
    input_format: Literal[FORMATS] = Field(
        "auto",
        description="img2dataset's names; `auto`: from each file's extension (a folder: its files of the one "
        "known format they share).",
    )
    url_col: str = Field("url", description="Column holding the URL (img2dataset's `url_col`).")
    caption_col: str | None = Field("caption", description="Column holding the caption; null: no captions.")
    save_additional_columns: list[str] = Field(
        [],
        description="Input columns carried to the output with their types (Parquet and the tar's json): "
        "floats stay floats, lists stay lists (img2dataset's option). A column's type is the one of the "
        "rows read first; later files must convert to it.",
    )
    key_col: str | None = Field(
        None,
        description="A column whose values are the sample keys (DataComp's `uid`) instead of keys from the "
        "row's position; each key must be unique in the run, non-empty, without `.`, `/` or `\\`, at most "
        "80 bytes (checked before the run, one line naming the key and the rows).",
    )
    column_names: list[str] | None = Field(
        None,
        description="csv/tsv without a header line (CC3M, CC12M: `caption<TAB>url`): the names of the "
        "columns in order; every line is then a row. null: the first line is the header.",
    )
    csv_delimiter: str | None = Field(None, description="Text formats; default: `,` for csv, tab for tsv.")
    allow_empty: bool = Field(
        False,
        description="An input with no rows is an error (one line, before Ray starts); true: run it anyway "
        "(an output with no shards).",
    )

    @field_validator("save_additional_columns")
    @classmethod
    def _not_reserved(cls, v):
        bad = [c for c in v if c in RESERVED_COLUMNS]
        if bad:
            hint = " (use key_col to take the keys from a column)" if "key" in bad else ""
            raise ValueError(
                f"{bad[0]!r} is a column clipcurate sets; it cannot be carried from the input{hint}"
            )
        return v

    @field_validator("column_names")
    @classmethod
    def _names(cls, v, info: ValidationInfo):
        if v is None:
            return v
        if not v or any(not isinstance(c, str) or not c for c in v):
            raise ValueError("column_names must be a non-empty list of non-empty names")
        dup = next((c for c in v if v.count(c) > 1), None)
        if dup is not None:
            raise ValueError(f"column_names names {dup!r} twice")
        d = info.data
        wanted = [
            d.get("url_col"),
            d.get("caption_col"),
            d.get("key_col"),
            *(d.get("save_additional_columns") or []),
        ]
        missing = [c for c in wanted if c and c not in v]
        if missing:
            raise ValueError(f"column {missing[0]!r} (a configured column) is not one of column_names {v}")
        return v

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("'path' must name at least one file")
        return v


def _fmt_of(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    p = path.lower()
    for suf in (".gz", ".bz2", ".zst", ".xz"):
        if p.endswith(suf):
            p = p[: -len(suf)]
    for ext, fmt in (
        (".parquet", "parquet"),
        (".csv", "csv"),
        (".tsv", "tsv"),
        (".jsonl", "jsonl"),
        (".json", "json"),
        (".txt", "txt"),
        (".tar", "webdataset"),
    ):
        if p.endswith(ext):
            return fmt
    raise ValueError(
        f"cannot infer input_format of {path!r}; set input_format to one of {', '.join(FORMATS[1:])}"
    )


def expand_paths(path: str | list[str], input_format: str = "auto") -> list[str]:
    """Expand folders and globs. Returns fully qualified fsspec URLs, sorted within each pattern
    (see ``stages.read_inputs.resolve_inputs``)."""
    from stages.read_inputs import resolve_inputs

    return [i["name"] for i in resolve_inputs(path, input_format)]


class Read(Source):
    name = "read"
    Config = ReadConfig
    requires = ()
    produces = ()

    def resources(self) -> Resources:
        return Resources(num_cpus=0, actor=False)

    def filled_columns(self) -> tuple[str, ...]:
        # re-curation from tars: rows come with their images and sizes
        return FILLED_LATER if self.reads_webdataset() else ()

    def extra_produces(self) -> dict[str, pa.DataType]:
        # The columns keep the input's types, known once the input is read (``ColumnTypes``):
        # declared here by name, with the null type standing for "the input's type".
        return {c: pa.null() for c in self.config.save_additional_columns}

    def reads_webdataset(self) -> bool:
        """True when the input is WebDataset tars (re-curation): rows then come with their images."""
        from stages.read_inputs import _known_format

        cfg = self.config
        if cfg.input_format != "auto":
            return cfg.input_format == "webdataset"
        paths = [cfg.path] if isinstance(cfg.path, str) else cfg.path
        if all(_known_format(p) is not None for p in paths):
            return all(_known_format(p) == "webdataset" for p in paths)
        try:  # a folder (or a name without a known extension): look at the files it stands for
            return all(_fmt_of(p, "auto") == "webdataset" for p in expand_paths(cfg.path))
        except (OSError, ValueError):
            return False  # a missing or unreadable input: check() reports it

    # ---- driver side, before anything runs: a cheap look at the input --------------------------
    def fingerprint(self) -> list[dict]:
        """Size and version (ETag, generation or modification time) of every input file, in input
        order: the run state records it, so a rerun on a changed input is refused."""
        from stages.read_inputs import _fingerprint_entry, resolve_inputs

        return [_fingerprint_entry(i) for i in resolve_inputs(self.config.path, self.config.input_format)]

    def check(self) -> None:
        """Check the input without reading it whole: it exists, its format is known, the configured
        columns are there (Parquet schema, first rows or header of text files) and it has a row.
        Raises ``stages.read_inputs.InputError`` (a ``ValueError``; one line naming the key and the file)."""
        from stages.read_inputs import check_inputs

        check_inputs(self.config)

    # ---- driver side: split into input shards ------------------------------------------------
    def iter_input_batches(self) -> Iterator[pa.Table]:
        """Stream the input list as tables with columns url, caption, the additional columns (with their
        input types, one type per column over the whole input) and, with ``key_col``, key. Raises
        ``StageFailed`` (one line) on keys that are missing, dotted or not unique, or on a column whose
        type changes from file to file in a way that does not convert."""
        from stages.read_inputs import shown_path
        from stages.read_keys import BadKey, ColumnTypes, KeyCheck, TypeConflict

        cfg = self.config
        types = ColumnTypes(cfg.save_additional_columns, shown_path)
        keys = KeyCheck(cfg.key_col, shown_path) if cfg.key_col else None
        try:
            for path in expand_paths(cfg.path, cfg.input_format):
                fmt = _fmt_of(path, cfg.input_format)
                if fmt == "webdataset":
                    raise ValueError("webdataset input is split per tar; iter_input_batches is for URL lists")
                first = 0
                for t in stream_file(path, fmt, cfg):
                    t = types.fix(self._select(t, path), path)
                    if keys is not None:
                        keys.add(t.column("key"), path, first)
                    first += t.num_rows
                    yield t
            if keys is not None:
                keys.finish(self.iter_keys)
        except BadKey as e:
            raise StageFailed(self.name, f"key 'key_col': {e}") from None
        except TypeConflict as e:
            raise StageFailed(self.name, f"key 'save_additional_columns': {e}") from None

    def iter_keys(self) -> Iterator[tuple[pa.Array, str, int]]:
        """``iter_key_batches`` over the input's files."""
        cfg = self.config
        paths = expand_paths(cfg.path, cfg.input_format)
        return iter_key_batches(cfg, [(p, _fmt_of(p, cfg.input_format)) for p in paths])

    def _select(self, t: pa.Table, path: str) -> pa.Table:
        cfg = self.config
        cols = {}
        missing = [
            c
            for c in [cfg.url_col, cfg.caption_col, cfg.key_col, *cfg.save_additional_columns]
            if c and c not in t.column_names
        ]
        if missing:
            raise ValueError(f"{path}: column(s) {missing} not found; columns are {t.column_names}")
        cols["url"] = t.column(cfg.url_col).cast(pa.string())
        cols["caption"] = (
            t.column(cfg.caption_col).cast(pa.string())
            if cfg.caption_col
            else pa.nulls(t.num_rows, pa.string())
        )
        if cfg.key_col:
            cols["key"] = t.column(cfg.key_col).cast(pa.string())
        for c in cfg.save_additional_columns:
            cols[c] = t.column(c)  # as typed in the input (``ColumnTypes`` keeps one type per column)
        return pa.table(cols)

    def split(self, samples_per_shard: int, write_shard) -> list[int]:
        """Stream the input and call ``write_shard(shard_id, table)`` for each input shard.
        Returns the row count of each shard. For webdataset input, each tar is one shard and
        ``write_shard`` receives a one-row table naming the tar."""
        cfg = self.config
        paths = expand_paths(cfg.path, cfg.input_format)
        if all(_fmt_of(p, cfg.input_format) == "webdataset" for p in paths):
            counts = []
            for i, p in enumerate(paths):
                write_shard(i, pa.table({"tar": [p]}))
                counts.append(-1)  # unknown until read
            return counts
        counts: list[int] = []
        buf: list[pa.Table] = []
        buffered = 0
        for t in self.iter_input_batches():
            while t.num_rows:
                take = min(t.num_rows, samples_per_shard - buffered)
                buf.append(t.slice(0, take))
                buffered += take
                t = t.slice(take)
                if buffered == samples_per_shard:
                    write_shard(len(counts), pa.concat_tables(buf))
                    counts.append(buffered)
                    buf, buffered = [], 0
        if buffered:
            write_shard(len(counts), pa.concat_tables(buf))
            counts.append(buffered)
        return counts

    # ---- worker side: load shards -------------------------------------------------------------
    def load(self, spec: dict) -> pa.Table:
        """The rows of the input shard ``spec`` (a ``SHARD_SPEC_SCHEMA`` row)."""
        with fsspec.open(spec["path"], "rb") as f:
            shard = pq.read_table(f)
        if "tar" in shard.column_names:
            return self._load_tar(shard.column("tar")[0].as_py(), spec)
        return self._load_rows(shard, spec)

    def _load_rows(self, shard: pa.Table, spec: dict) -> pa.Table:
        n = shard.num_rows
        if "key" in shard.column_names:  # key_col: the keys came with the rows
            t = shard
        else:
            keys = [make_key(spec["shard"], i, spec["shard_digits"], spec["index_digits"]) for i in range(n)]
            t = shard.append_column("key", pa.array(keys, pa.string()))
        t = t.append_column("status", pa.array([OK] * n, pa.string()))
        t = t.append_column(SHARD_COL, pa.array([spec["shard"]] * n, pa.int32()))
        return conform(t)

    def _load_tar(self, tar_path: str, spec: dict) -> pa.Table:
        samples: dict[str, dict] = {}
        order: list[str] = []
        with fsspec.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = sanitize_member_name(m.name)
                if name is None:
                    continue
                key, ext = split_member(name)
                if not key or not ext:
                    continue
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                data = tar.extractfile(m).read()
                samples[key][ext.lower()] = data
        rows = []
        for key in order:
            s = samples[key]
            meta = {}
            if "json" in s:
                try:
                    meta = json.loads(s["json"])
                except ValueError:
                    meta = {}
            img = next((s[e] for e in IMAGE_EXTS if e in s), None)
            caption = s["txt"].decode("utf-8", "replace") if "txt" in s else meta.get("caption")
            row = {
                "key": meta.get("key") or key,
                "url": meta.get("url"),
                "caption": caption,
                "image": img,
                "status": OK if img is not None else "decode_failed",
                "reason": None if img is not None else "no image member in tar",
                "rule": None if img is not None else "no_image_member",
            }
            for c in ("width", "height", "original_width", "original_height"):
                v = meta.get(c)
                row[c] = int(v) if isinstance(v, int | float) else None
            row["sha256"] = meta.get("sha256")
            for c in self.config.save_additional_columns:
                row[c] = meta.get(c)  # as the json holds it: numbers, lists and objects keep their types
            rows.append(row)
        t = pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())})
        t = conform(t)
        return t.append_column(SHARD_COL, pa.array([spec["shard"]] * t.num_rows, pa.int32()))


def sanitize_member_name(name: str) -> str | None:
    """Return a safe relative member name, or None for absolute paths, ``..`` parts or empty names."""
    if not name or name.startswith(("/", "\\")) or "\\" in name:
        return None
    norm = posixpath.normpath(name)
    if norm.startswith("../") or norm == ".." or "/../" in f"/{norm}/" or posixpath.isabs(norm):
        return None
    return norm
