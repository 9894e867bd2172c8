"""The read stage's look at its input before anything runs (``Read.check``, ``Read.fingerprint``):
resolve files, folders and globs to files, and inspect each file without reading it whole (the
listing, Parquet footers, the header or first rows of text files). No Ray.
"""

from __future__ import annotations

import io
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stages.io import shown_path, url_of
from stages.read import FORMATS, ReadConfig, _fmt_of
from stages.read_files import csv_options, iter_key_batches

INSPECT_BYTES = 1 << 20  # text formats: what the check reads of each file, at most (plus one line)
CHECK_THREADS = 16  # files inspected at once (Parquet footers or first rows; I/O-bound)
FINGERPRINT_VERSION_KEYS = ("ETag", "etag", "VersionId", "generation", "mtime", "LastModified", "last_modified", "updated")


class InputError(ValueError):
    """A bad input (missing file, unknown format, missing column, no rows). ``key`` is the read option
    the user should look at; ``str(err)`` is one line: ``key 'KEY': what is wrong``."""

    def __init__(self, key: str, message: str):
        super().__init__(" ".join(f"key '{key}': {message}".split()))
        self.key = key


def _known_format(path: str) -> str | None:
    """The format a file name implies (compression suffixes ignored), or None."""
    try:
        return _fmt_of(path, "auto")
    except ValueError:
        return None


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

        def qualified(p: str, fs=fs) -> str:
            return url_of(fs, p)

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
    """``Read.check``: see there. Every file is inspected (footers and first rows only, in threads).
    Returns the input's fingerprint."""
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
    for key, kinds in (
        ("column_names", ("csv", "tsv")),
        ("key_col", ("parquet", "csv", "tsv", "json", "jsonl")),
    ):
        if getattr(cfg, key) is None:
            continue
        other = next(((i, f) for i, f in zip(infos, fmts) if f not in kinds), None)
        if other is not None:
            what = {
                "column_names": "names the columns of csv/tsv files without a header line",
                "key_col": "takes the keys from a column of a URL list (a WebDataset input keeps its tars' keys; "
                "a txt list has only URLs)",
            }[key]
            raise InputError(key, f"{key} {what}; {shown_path(other[0]['name'])} is {other[1]}")
    fingerprint = [_fingerprint_entry(i) for i in infos]
    if all(tars):
        return fingerprint  # each tar is one shard; its rows are counted when read
    with ThreadPoolExecutor(max_workers=max(1, min(CHECK_THREADS, len(infos)))) as pool:
        looks = list(pool.map(lambda a: _inspect(a[0]["name"], a[1], cfg), zip(infos, fmts)))
    if all(rows == 0 for _, rows in looks) and not cfg.allow_empty:
        what = shown_path(infos[0]["name"]) if len(infos) == 1 else f"{len(infos)} files"
        raise InputError("path", f"the input has no rows ({what}); set allow_empty: true to run on an empty input")
    wanted = [("url_col", cfg.url_col), ("caption_col", cfg.caption_col), ("key_col", cfg.key_col)]
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
    if cfg.key_col:
        check_keys(cfg, [(i["name"], f) for i, f in zip(infos, fmts)])
    return fingerprint


def check_keys(cfg: ReadConfig, files: list[tuple[str, str]]) -> None:
    """Read the ``key_col`` column of every file (that column only) and check its keys
    (``stages.read_keys``): present, no dots or slashes, short enough, unique within the run."""
    from stages.read_keys import BadKey, KeyCheck

    check = KeyCheck(cfg.key_col, shown_path)
    try:
        for keys, path, first in iter_key_batches(cfg, files):
            check.add(keys, path, first)
        check.finish(lambda: iter_key_batches(cfg, files))
    except BadKey as e:
        raise InputError("key_col", str(e)) from None
    except (pa.ArrowException, ValueError, UnicodeDecodeError) as e:
        raise InputError("key_col", f"cannot read column '{cfg.key_col}' as text keys: {e}") from None


def _inspect(path: str, fmt: str, cfg: ReadConfig) -> tuple[list[str] | None, int | None]:
    """(column names, rows) of one input file from its footer or first rows. ``rows`` is exact for
    Parquet; for text formats 0 (none) or None (at least one). Column names are None when unknown."""
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            if fmt == "parquet":
                pf = pq.ParquetFile(f)
                return pf.schema_arrow.names, pf.metadata.num_rows
            if fmt in ("csv", "tsv"):
                try:
                    reader = pacsv.open_csv(f, **csv_options(fmt, cfg, INSPECT_BYTES))
                except pa.ArrowInvalid as e:
                    if "Empty CSV" in str(e):
                        return ([] if cfg.column_names is None else cfg.column_names), 0
                    if cfg.column_names is not None and "Expected" in str(e) and "columns" in str(e):
                        raise InputError(
                            "column_names",
                            f"{shown_path(path)}: the first lines do not have the {len(cfg.column_names)} "
                            f"columns column_names names ({', '.join(cfg.column_names)}): {e}",
                        ) from None
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
