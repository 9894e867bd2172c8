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
import math
import os
import posixpath
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from schemas import OK, conform
from stages.base import Resources, Stage, StageConfig

FORMATS = ("auto", "parquet", "csv", "tsv", "json", "jsonl", "txt", "webdataset")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARD_COL = "_shard"  # internal: which output shard a row belongs to (dropped by the writer)
SPEC_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("path", pa.string()),
        ("rows", pa.int64()),
        ("shard_digits", pa.int32()),
        ("index_digits", pa.int32()),
    ]
)


class ReadConfig(StageConfig):
    # file, folder, glob, or a list of them; any fsspec path (s3://..., file://...). A folder is read as
    # its files of the format, sorted (names starting with '.' or '_' skipped).
    path: str | list[str]
    # img2dataset's names; auto = from the extension (a folder: its files of the one known format they share)
    input_format: Literal[FORMATS] = "auto"
    url_col: str = "url"  # column holding the URL (img2dataset's url_col)
    caption_col: str | None = "caption"  # column holding the caption; null: no captions
    # Input columns carried to the output (Parquet and the tar's json), as strings: text as is,
    # other values JSON-encoded (true, 3, [1, 2]).
    save_additional_columns: list[str] = []
    # text formats
    csv_delimiter: str | None = None  # default: ',' for csv, '\t' for tsv
    allow_empty: bool = Field(
        False,
        description="an input with no rows is an error (one line, before Ray starts); true: run it anyway "
        "(an output with no shards)",
    )

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("'path' must name at least one file")
        return v


def key_digits(n_shards: int, samples_per_shard: int) -> tuple[int, int]:
    shard_digits = max(5, len(str(max(n_shards - 1, 0))))
    index_digits = max(1, math.ceil(math.log10(samples_per_shard))) if samples_per_shard > 1 else 1
    return shard_digits, index_digits


def make_key(shard: int, index: int, shard_digits: int, index_digits: int) -> str:
    return f"{shard:0{shard_digits}d}{index:0{index_digits}d}"


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
    raise ValueError(f"cannot infer input_format of {path!r}; set input_format to one of {', '.join(FORMATS[1:])}")


def expand_paths(path: str | list[str], input_format: str = "auto") -> list[str]:
    """Expand folders and globs. Returns fully qualified fsspec URLs, sorted within each pattern
    (see ``resolve_inputs``)."""
    return [i["name"] for i in resolve_inputs(path, input_format)]


class Read(Stage):
    name = "read"
    Config = ReadConfig
    requires = ()
    produces = ()
    sees_all_rows = True

    def resources(self) -> Resources:
        return Resources(num_cpus=1, actor=False)

    def extra_produces(self) -> dict[str, pa.DataType]:
        return {c: pa.string() for c in self.config.save_additional_columns}

    def reads_webdataset(self) -> bool:
        """True when the input is WebDataset tars (re-curation): rows then come with their images."""
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
        return [_fingerprint_entry(i) for i in resolve_inputs(self.config.path, self.config.input_format)]

    def check(self) -> list[dict]:
        """Check the input without reading it whole: it exists, its format is known, the configured
        columns are there (Parquet schema, first rows or header of text files) and it has a row.
        Raises ``InputError`` naming the key at fault; returns the input's ``fingerprint``."""
        return check_inputs(self.config)

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
        missing = [c for c in [cfg.url_col, cfg.caption_col, *cfg.save_additional_columns] if c and c not in t.column_names]
        if missing:
            raise ValueError(f"{path}: column(s) {missing} not found; columns are {t.column_names}")
        cols["url"] = t.column(cfg.url_col).cast(pa.string())
        cols["caption"] = (
            t.column(cfg.caption_col).cast(pa.string()) if cfg.caption_col else pa.nulls(t.num_rows, pa.string())
        )
        for c in cfg.save_additional_columns:
            col = t.column(c)
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                col = pa.array([None if v is None else json.dumps(v, default=str) for v in col.to_pylist()], pa.string())
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
    def __call__(self, specs: pa.Table) -> pa.Table:
        """Load the input shards listed in ``specs`` (``SPEC_SCHEMA``) and return their rows."""
        out = []
        for spec in specs.to_pylist():
            with fsspec.open(spec["path"], "rb") as f:
                shard = pq.read_table(f)
            if "tar" in shard.column_names:
                out.append(self._load_tar(shard.column("tar")[0].as_py(), spec))
            else:
                out.append(self._load_rows(shard, spec))
        if not out:
            return conform(pa.table({"key": pa.array([], pa.string()), "status": pa.array([], pa.string())}))
        return pa.concat_tables(out, promote_options="permissive")

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
                base = posixpath.basename(name)
                key, _, ext = base.partition(".")
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


# ---- input resolution and the pre-run check (no Ray, never a whole file) -----------------------

INSPECT_BYTES = 1 << 20  # text formats: what the check reads of each file, at most (plus one line)
CHECK_THREADS = 16  # files inspected at once (Parquet footers or first rows; I/O-bound)
FINGERPRINT_VERSION_KEYS = ("ETag", "etag", "VersionId", "generation", "mtime", "LastModified", "last_modified", "updated")


class InputError(ValueError):
    """A bad input (missing file, unknown format, missing column, no rows). ``key`` is the read option
    the user should look at; ``str(err)`` is one line."""

    def __init__(self, key: str, message: str):
        super().__init__(" ".join(str(message).split()))
        self.key = key


def _known_format(path: str) -> str | None:
    """The format a file name implies (compression suffixes ignored), or None."""
    try:
        return _fmt_of(path, "auto")
    except ValueError:
        return None


def shown_path(url: str) -> str:
    """A path as a person wants to read it: relative to the working directory when under it."""
    if "://" in url and not url.startswith("file://"):
        return url
    p = url[len("file://") :] if url.startswith("file://") else url
    cwd = os.getcwd()
    return os.path.relpath(p, cwd) if p.startswith(cwd + os.sep) else p


def _has_magic(p: str) -> bool:
    return any(c in p for c in "*?[")


def resolve_inputs(path: str | list[str], input_format: str = "auto") -> list[dict]:
    """The input files of ``path`` (a file, folder or glob, or a list of them), as fsspec ``info``
    dicts whose ``name`` is a fully qualified URL; sorted within each entry, entries in order.

    A folder stands for its files of ``input_format`` (by extension), or with ``auto`` its files of a
    known format, which must all be of one format; names starting with ``.`` or ``_`` (``_SUCCESS``,
    ``.crc`` files) are skipped. Raises ``InputError`` for a missing path, an empty glob or folder."""
    out: list[dict] = []
    for pat in [path] if isinstance(path, str) else path:
        fs, token = fsspec.core.url_to_fs(pat)
        proto = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol

        def qualified(p: str, proto=proto) -> str:
            return p if proto in ("file", "local") else f"{proto}://{p}"

        if _has_magic(pat):
            found = fs.glob(token, detail=True)
            files = [i for i in found.values() if i.get("type") != "directory"]
            if not files:
                raise InputError("path", f"no input file matches {pat!r}")
        else:
            try:
                info = fs.info(token)
            except FileNotFoundError:
                raise InputError("path", f"{pat}: no such file or folder") from None
            if info.get("type") == "directory":
                files = _folder_files(fs, token, pat, input_format)
            else:
                files = [info]
        out.extend(dict(i, name=qualified(i["name"])) for i in sorted(files, key=lambda i: i["name"]))
    return out


def _folder_files(fs, token: str, shown: str, input_format: str) -> list[dict]:
    entries = [
        i
        for i in fs.ls(token, detail=True)
        if i.get("type") == "file" and not posixpath.basename(i["name"].rstrip("/")).startswith((".", "_"))
    ]
    names = sorted(posixpath.basename(i["name"]) for i in entries)
    listing = ", ".join(names[:8]) + (f", ... ({len(names)} files)" if len(names) > 8 else "") if names else "nothing"
    if input_format != "auto":
        files = [i for i in entries if _known_format(i["name"]) == input_format]
        if not files:
            ext = {"webdataset": ".tar"}.get(input_format, f".{input_format}")
            raise InputError(
                "input_format",
                f"folder {shown} holds no {input_format} file (names ending in {ext}, optionally compressed); "
                f"it holds {listing}; name the files with a glob instead",
            )
        return files
    files = [i for i in entries if _known_format(i["name"]) is not None]
    if not files:
        raise InputError(
            "path",
            f"folder {shown} holds no file of a known format ({', '.join(FORMATS[1:])}); it holds {listing}",
        )
    kinds: dict[str, int] = {}
    for i in files:
        fmt = _known_format(i["name"])
        kinds[fmt] = kinds.get(fmt, 0) + 1
    if len(kinds) > 1:
        mix = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        raise InputError(
            "input_format",
            f"folder {shown} mixes formats ({mix}); set input_format to read the files of one format",
        )
    return files


def _fingerprint_entry(info: dict) -> dict:
    version = next((str(info[k]) for k in FINGERPRINT_VERSION_KEYS if info.get(k) is not None), None)
    return {"path": info["name"], "size": info.get("size"), "version": version}


def check_inputs(cfg: ReadConfig) -> list[dict]:
    """``Read.check``: see there. Every file is inspected (footers and first rows only, in threads)."""
    infos = resolve_inputs(cfg.path, cfg.input_format)
    fmts = [cfg.input_format if cfg.input_format != "auto" else _known_format(i["name"]) for i in infos]
    for i, fmt in zip(infos, fmts):
        if fmt is None:
            raise InputError(
                "input_format",
                f"cannot tell the format of {shown_path(i['name'])} from its name; "
                f"set input_format to one of {', '.join(FORMATS[1:])}",
            )
    tars = [f == "webdataset" for f in fmts]
    if any(tars) and not all(tars):
        raise InputError("input_format", "the input mixes WebDataset tars with URL lists; read one kind per run")
    fingerprint = [_fingerprint_entry(i) for i in infos]
    if all(tars):
        return fingerprint  # each tar is one shard; its rows are counted when read
    with ThreadPoolExecutor(max_workers=max(1, min(CHECK_THREADS, len(infos)))) as pool:
        looks = list(pool.map(lambda a: _inspect(a[0]["name"], a[1], cfg), zip(infos, fmts)))
    if all(rows == 0 for _, rows in looks) and not cfg.allow_empty:
        what = shown_path(infos[0]["name"]) if len(infos) == 1 else f"{len(infos)} files"
        raise InputError("path", f"the input has no rows ({what}); set allow_empty: true to run on an empty input")
    wanted = [("url_col", cfg.url_col), ("caption_col", cfg.caption_col)]
    wanted += [("save_additional_columns", c) for c in cfg.save_additional_columns]
    for info, fmt, (columns, rows) in zip(infos, fmts, looks):
        if columns is None or rows == 0:  # unknown (a huge first json object) or nothing to read
            continue
        for key, col in wanted:
            if col and col not in columns:
                shown = ", ".join(columns[:20]) + (", ..." if len(columns) > 20 else "")
                hint = "; a txt list has only URLs; set caption_col: null" if fmt == "txt" and key == "caption_col" else ""
                raise InputError(
                    key, f"column '{col}' not found in {shown_path(info['name'])} (columns: {shown or 'none'}{hint})"
                )
    return fingerprint


def _inspect(path: str, fmt: str, cfg: ReadConfig) -> tuple[list[str] | None, int | None]:
    """(column names, rows) of one input file from its footer or first rows. ``rows`` is exact for
    Parquet; for text formats 0 (none) or None (at least one). Column names are None when unknown."""
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            if fmt == "parquet":
                pf = pq.ParquetFile(f)
                return pf.schema_arrow.names, pf.metadata.num_rows
            if fmt in ("csv", "tsv"):
                delim = cfg.csv_delimiter or ("\t" if fmt == "tsv" else ",")
                try:
                    reader = pacsv.open_csv(
                        f,
                        parse_options=pacsv.ParseOptions(delimiter=delim, newlines_in_values=True),
                        read_options=pacsv.ReadOptions(block_size=INSPECT_BYTES),
                    )
                except pa.ArrowInvalid as e:
                    if "Empty CSV" in str(e):
                        return [], 0
                    raise
                for batch in reader:  # the first non-empty block; a header-only file ends at once
                    if batch.num_rows:
                        return reader.schema.names, None
                return reader.schema.names, 0
            text = io.TextIOWrapper(f, "utf-8")
            if fmt == "txt":
                for line in text:
                    if line.strip():
                        return [cfg.url_col], None
                return [cfg.url_col], 0
            if fmt == "jsonl":
                keys: dict[str, None] = {}
                seen = n = 0
                for line in text:
                    seen += len(line)
                    if line.strip():
                        obj = json.loads(line)
                        if isinstance(obj, dict):
                            keys.update(dict.fromkeys(obj))
                        n += 1
                    if seen > INSPECT_BYTES and n:
                        break
                return (list(keys), None) if n else ([], 0)
            if fmt == "json":
                head = text.read(INSPECT_BYTES)
                complete = len(head) < INSPECT_BYTES
                s = head.lstrip()
                if not s.startswith("["):
                    raise InputError("input_format", f"{shown_path(path)}: a json input must be a list of objects")
                dec = json.JSONDecoder()
                pos = len(head) - len(s) + 1
                while pos < len(head) and head[pos] in " \t\r\n":
                    pos += 1
                if head[pos : pos + 1] == "]":
                    return [], 0
                try:
                    first, _ = dec.raw_decode(head, pos)
                except json.JSONDecodeError:
                    if complete:
                        raise
                    return None, None  # a first object larger than what the check reads
                # pa.Table.from_pylist (the reader) takes its columns from the first object
                return (list(first) if isinstance(first, dict) else []), None
    except InputError:
        raise
    except (ValueError, UnicodeDecodeError, pa.ArrowException, EOFError) as e:
        raise InputError("input_format", f"{shown_path(path)}: cannot read as {fmt}: {e}") from None
    return None, None  # pragma: no cover - formats are guarded by the Literal
