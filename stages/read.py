"""Read URL lists (parquet, csv, tsv, json, jsonl, txt; optionally gzipped) or existing WebDataset shards.

``path`` is a file, a folder, a glob or a list of them. Before anything runs, ``check`` looks at the input
without reading it whole (listing, Parquet footers, first rows of text files): files exist, their format is
known, the configured columns are there, and there is a row (unless ``allow_empty``).

Reading happens in two steps, like img2dataset:

1. ``split`` (on the driver, streaming, never the whole list in memory): the input is cut into
   input shards of ``samples_per_shard`` rows, written as small Parquet files (text only) in the run
   directory. The position of a row in the input fixes its shard id and its index, hence its key
   (``f"{shard:0{shard_digits}d}{index:0{index_digits}d}"``, img2dataset's scheme). Keys are then
   stable across reruns and resume, whatever Ray does.
2. ``__call__`` (in Ray tasks) loads one or more input shards: a table of shard specs in, rows out.

``input_format: webdataset`` re-reads tars (ours or img2dataset's) for re-curation without
downloading again: each tar is one shard, members are grouped by key, names are sanitised
(absolute paths and ``..`` are refused), and the image bytes, caption and json metadata come back
as rows with status ``ok``.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from schemas import OK, conform
from schemas.members import IMAGE_EXTS, split_member
from schemas.row import FILLED_LATER, SHARD_COL, key_digits, make_key  # noqa: F401 - key_digits re-exported
from schemas.row import SHARD_SPEC_SCHEMA as SPEC_SCHEMA  # noqa: F401 - re-exported
from stages.base import Resources, RoleConfig, path_field
from stages.roles import Source

FORMATS = ("auto", "parquet", "csv", "tsv", "json", "jsonl", "txt", "webdataset")


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
        description="Input columns carried to the output (Parquet and the tar's json), as strings: text as is, "
        "other values JSON-encoded (true, 3, [1, 2]).",
    )
    csv_delimiter: str | None = Field(None, description="Text formats; default: `,` for csv, tab for tsv.")
    allow_empty: bool = Field(
        False,
        description="An input with no rows is an error (one line, before Ray starts); true: run it anyway "
        "(an output with no shards).",
    )

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
        return {c: pa.string() for c in self.config.save_additional_columns}

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
        """Stream the input list as tables with columns url, caption, and the additional columns."""
        cfg = self.config
        for path in expand_paths(cfg.path, cfg.input_format):
            fmt = _fmt_of(path, cfg.input_format)
            if fmt == "webdataset":
                raise ValueError("webdataset input is split per tar; iter_input_batches is for URL lists")
            yield from (self._select(t, path) for t in _stream_file(path, fmt, cfg))

    def _select(self, t: pa.Table, path: str) -> pa.Table:
        cfg = self.config
        cols = {}
        missing = [
            c
            for c in [cfg.url_col, cfg.caption_col, *cfg.save_additional_columns]
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
        for c in cfg.save_additional_columns:
            col = t.column(c)
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                col = pa.array(
                    [None if v is None else json.dumps(v, default=str) for v in col.to_pylist()], pa.string()
                )
            cols[c] = col.cast(pa.string())
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
            }
            for c in ("width", "height", "original_width", "original_height"):
                v = meta.get(c)
                row[c] = int(v) if isinstance(v, int | float) else None
            row["sha256"] = meta.get("sha256")
            for c in self.config.save_additional_columns:
                v = meta.get(c)
                row[c] = None if v is None else v if isinstance(v, str) else json.dumps(v)
            rows.append(row)
        t = pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())})
        t = conform(t, self.extra_produces())
        return t.append_column(SHARD_COL, pa.array([spec["shard"]] * t.num_rows, pa.int32()))


def sanitize_member_name(name: str) -> str | None:
    """Return a safe relative member name, or None for absolute paths, ``..`` parts or empty names."""
    if not name or name.startswith(("/", "\\")) or "\\" in name:
        return None
    norm = posixpath.normpath(name)
    if norm.startswith("../") or norm == ".." or "/../" in f"/{norm}/" or posixpath.isabs(norm):
        return None
    return norm


def _stream_file(path: str, fmt: str, cfg: ReadConfig) -> Iterator[pa.Table]:
    with fsspec.open(path, "rb", compression="infer") as f:
        if fmt == "parquet":
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=65536):
                yield pa.Table.from_batches([batch])
        elif fmt in ("csv", "tsv"):
            delim = cfg.csv_delimiter or ("\t" if fmt == "tsv" else ",")
            convert = pacsv.ConvertOptions(strings_can_be_null=True, column_types=None)
            reader = pacsv.open_csv(
                f,
                parse_options=pacsv.ParseOptions(delimiter=delim, newlines_in_values=True),
                convert_options=convert,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
            )
            for batch in reader:
                yield pa.Table.from_batches([batch])
        elif fmt == "jsonl":
            yield pajson.read_json(f, read_options=pajson.ReadOptions(block_size=1 << 24))
        elif fmt == "json":
            data = json.load(io.TextIOWrapper(f, "utf-8"))
            if not isinstance(data, list):
                raise ValueError(f"{path}: a json input must be a list of objects")
            yield pa.Table.from_pylist(data)
        elif fmt == "txt":
            urls = [line.strip() for line in io.TextIOWrapper(f, "utf-8") if line.strip()]
            yield pa.table({cfg.url_col: pa.array(urls, pa.string())})
        else:  # pragma: no cover - guarded by Literal
            raise ValueError(fmt)
