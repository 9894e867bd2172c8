"""Every URL-list format README "Inputs" names, through the read stage without Ray (issue #21): csv,
tsv, json, jsonl and txt, plain and compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``), give the same
rows, keys and columns as the Parquet file of the same list. Rows go through ``check``, ``split`` and ``load_specs`` (``read_rows`` of test_read.py)."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.stages.test_read import read_rows

URLS = [f"http://127.0.0.1:9/{i}.jpg" for i in range(7)]
CAPTIONS = [
    "a bus station",
    "0123",
    'the word "cat", in quotes',
    "sierra nevada",
    "ünïcode ✓",
    "true",
    "last",
]
WIDTHS = [640, 480, 320, 1024, 12, 7, 99]


def write_list(path: Path, fmt: str, captions: bool = True) -> None:
    """The list of URLS (with CAPTIONS and WIDTHS unless ``captions`` is false) in ``fmt``."""
    rows = [{"url": u, "caption": c, "width": w} for u, c, w in zip(URLS, CAPTIONS, WIDTHS)]
    if not captions:
        rows = [{"url": r["url"]} for r in rows]
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "txt":
        path.write_text("".join(r["url"] + "\n" for r in rows), encoding="utf-8")


def compress(path: Path, codec: str) -> Path:
    data = path.read_bytes()
    out = path.with_name(path.name + "." + codec)
    if codec == "gz":
        out.write_bytes(gzip.compress(data))
    elif codec == "bz2":
        out.write_bytes(bz2.compress(data))
    elif codec == "xz":
        out.write_bytes(lzma.compress(data))
    elif codec == "zst":
        import zstandard  # a dependency: fsspec reads .zst with it
        out.write_bytes(zstandard.ZstdCompressor().compress(data))
    path.unlink()
    return out


def split_dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir(parents=True)
    return d


def rows_of(path: Path, tmp_path: Path, **cfg) -> list[dict]:
    table = read_rows(
        {"path": str(path), "save_additional_columns": ["width"], **cfg}, split_dir(tmp_path, "split")
    )
    return table.to_pylist()


@pytest.fixture
def parquet_rows(tmp_path) -> list[dict]:
    src = tmp_path / "ref" / "urls.parquet"
    src.parent.mkdir()
    write_list(src, "parquet")
    rows = rows_of(src, tmp_path / "ref")
    assert [r["url"] for r in rows] == URLS and [r["caption"] for r in rows] == CAPTIONS
    assert [r["width"] for r in rows] == WIDTHS
    assert len({r["key"] for r in rows}) == len(URLS)
    return rows


@pytest.mark.parametrize("codec", [None, "gz", "bz2", "xz", "zst"])
@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl"])
def test_text_formats_read_as_the_parquet_equivalent(fmt, codec, tmp_path, parquet_rows):
    path = tmp_path / f"urls.{fmt}"
    write_list(path, fmt)
    if codec:
        path = compress(path, codec)
    rows = rows_of(path, tmp_path)
    assert rows == parquet_rows  # same keys, urls, captions (text: "0123" stays), widths (ints)


@pytest.mark.parametrize("codec", [None, "gz", "zst"])
def test_a_txt_list_reads_as_the_parquet_of_its_urls(codec, tmp_path):
    ref = tmp_path / "urls.parquet"
    write_list(ref, "parquet", captions=False)
    path = tmp_path / "urls.txt"
    write_list(path, "txt")
    if codec:
        path = compress(path, codec)
    want = read_rows({"path": str(ref), "caption_col": None}, split_dir(tmp_path, "a"))
    got = read_rows({"path": str(path), "caption_col": None}, split_dir(tmp_path, "b"))
    assert got.to_pylist() == want.to_pylist()
    assert got.column("url").to_pylist() == URLS
