"""The read stage's inputs without Ray (issue #19, "Inputs"): headerless csv/tsv (``column_names``),
extra columns that keep their Arrow types through the shard Parquet and the tar's json (read back with
``webdataset``), and sample keys from a column (``key_col``: unique, dot-free, checked in one line).

Rows go through what a run does on the driver and the workers: ``check``, ``split`` into input-shard
Parquet files, ``load_specs``; and the ``write`` sink writes them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from pydantic import ValidationError

from schemas.row import SHARD_SPEC_SCHEMA, key_digits
from stages import read_keys
from stages.base import StageFailed
from stages.read import Read
from stages.read_inputs import InputError
from stages.roles import SinkContext
from stages.write import Write

# CC3M's layout: caption<TAB>url, no header line. A caption that reads as a number stays text.
CC3M = [
    ("a very typical bus station", "http://127.0.0.1:9/0.jpg"),
    ("0123", "http://127.0.0.1:9/1.jpg"),
    ('the word "cat" in quotes', "http://127.0.0.1:9/2.jpg"),
    ("sierra nevada range", "http://127.0.0.1:9/3.jpg"),
    ("a dog", "http://127.0.0.1:9/4.jpg"),
    ("true", "http://127.0.0.1:9/5.jpg"),
    ("last line, no newline", "http://127.0.0.1:9/6.jpg"),
]


def read_rows(cfg: dict, tmp_path: Path, samples_per_shard: int = 3, check: bool = True) -> pa.Table:
    """``check``, then split into input-shard Parquet files and load them all (``RunDir.input_plan``
    and the executor's source tasks, without Ray)."""
    src = Read(cfg)
    if check:
        src.check()
    folder = tmp_path / "input"
    folder.mkdir(exist_ok=True)
    paths: dict[int, str] = {}

    def write_shard(i: int, t: pa.Table) -> None:
        paths[i] = str(folder / f"{i:05d}.parquet")
        pq.write_table(t, paths[i])

    counts = src.split(samples_per_shard, write_shard)
    sd, idd = key_digits(len(counts), samples_per_shard)
    n = len(counts)
    specs = pa.table(
        [list(range(n)), [paths[i] for i in range(n)], counts, [sd] * n, [idd] * n], schema=SHARD_SPEC_SCHEMA
    )
    return src.load_specs(specs)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def write_ok(rows: pa.Table, out: Path) -> tuple[pa.Table, list[dict]]:
    """The rows as downloaded (``ok`` with an image) through the ``write`` sink; (the shard Parquet,
    the tar's samples read back with webdataset)."""
    from stages.base import replace_column

    rows = replace_column(rows, "image", [_jpeg()] * rows.num_rows, pa.binary())
    stats = Write(Write.Config()).write(rows, SinkContext(output=str(out)))
    tables = [pq.read_table(out / f"{s['shard']}.parquet") for s in stats]
    tars = [str(out / f"{s['shard']}.tar") for s in stats]
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    return pa.concat_tables(tables), samples


# ---- headerless csv/tsv ---------------------------------------------------------------------------


def test_headerless_tsv_with_column_names_reads_every_line(tmp_path):
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_text("\n".join(f"{c}\t{u}" for c, u in CC3M))
    cfg = {"path": str(path), "url_col": "url", "caption_col": "caption", "column_names": ["caption", "url"]}
    rows = read_rows(cfg, tmp_path)
    assert rows.num_rows == len(CC3M)
    assert list(zip(rows.column("caption").to_pylist(), rows.column("url").to_pylist())) == CC3M
    keys = [f"0000{shard}{i}" for shard in range(3) for i in range(3)][: len(CC3M)]
    assert rows.column("key").to_pylist() == keys  # positional, as without column_names
    # without column_names the first line is a header: no column 'url', refused before any work
    with pytest.raises(InputError) as e:
        Read({"path": str(path)}).check()
    assert e.value.key == "url_col" and "column 'url' not found" in str(e.value)


def test_headerless_csv_keeps_extra_columns_typed(tmp_path):
    path = tmp_path / "pool.csv.gz"
    import gzip

    path.write_bytes(gzip.compress(b"http://x/0.jpg,a cat,0.25,3\nhttp://x/1.jpg,a dog,0.5,4\n"))
    cfg = {
        "path": str(path),
        "column_names": ["url", "caption", "score", "n"],
        "save_additional_columns": ["score", "n"],
    }
    rows = read_rows(cfg, tmp_path)
    assert rows.column("caption").to_pylist() == ["a cat", "a dog"]
    assert rows.schema.field("score").type == pa.float64() and rows.column("score").to_pylist() == [0.25, 0.5]
    assert rows.schema.field("n").type == pa.int64() and rows.column("n").to_pylist() == [3, 4]


def test_column_names_refusals(tmp_path):
    tsv = tmp_path / "cc.tsv"
    tsv.write_text("a cat\thttp://x/0.jpg\textra\n")
    with pytest.raises(InputError) as e:  # three columns where two are named
        Read({"path": str(tsv), "column_names": ["caption", "url"]}).check()
    assert e.value.key == "column_names" and "cc.tsv" in str(e.value) and "2 columns" in str(e.value)
    assert "\n" not in str(e.value)
    pq.write_table(pa.table({"url": ["http://x/0.jpg"], "caption": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError) as e:  # a Parquet file has its names
        Read({"path": str(tmp_path / "p.parquet"), "column_names": ["url", "caption"]}).check()
    assert e.value.key == "column_names" and "p.parquet is parquet" in str(e.value)
    with pytest.raises(ValidationError, match="'url' .* is not one of column_names"):
        Read.Config(path=str(tsv), column_names=["caption", "link"])
    with pytest.raises(ValidationError, match="names 'url' twice"):
        Read.Config(path=str(tsv), column_names=["url", "url"], caption_col=None)
    with pytest.raises(ValidationError, match="use key_col"):
        Read.Config(path=str(tsv), save_additional_columns=["key"])


# ---- extra columns keep their types -----------------------------------------------------------------

# DataComp's metadata, as its Parquet files type it (a few rows)
DATACOMP = pa.table(
    {
        "uid": [
            "f8a0c1e2d3b4a5968778695a4b3c2d1e",
            "0b1c2d3e4f5a69788796a5b4c3d2e1f0",
            "00000000000000000000000000000001",
        ],
        "url": ["http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/b.jpg", "http://127.0.0.1:9/c.jpg"],
        "text": ["a red circle", "a blue square", "a green star"],
        "original_width": pa.array([640, 800, 1024], pa.int64()),
        "clip_l14_similarity_score": pa.array([0.2, 0.31, None], pa.float32()),
        "face_bboxes": pa.array([[[0.1, 0.1, 0.3, 0.3]], [], None], pa.list_(pa.list_(pa.float64()))),
        "n_faces": pa.array([1, 0, 2], pa.int64()),
        "nsfw": [False, False, True],
    }
)
EXTRA = ["uid", "clip_l14_similarity_score", "face_bboxes", "n_faces", "nsfw"]


def test_extra_columns_keep_their_types_in_the_parquet_and_the_tar_json(tmp_path):
    pq.write_table(DATACOMP, tmp_path / "metadata.parquet")
    cfg = {
        "path": str(tmp_path / "metadata.parquet"),
        "caption_col": "text",
        "save_additional_columns": EXTRA,
    }
    rows = read_rows(cfg, tmp_path)
    table, samples = write_ok(rows, tmp_path / "out")
    for c in EXTRA:  # the shard Parquet: the input's types and values
        assert table.schema.field(c).type == DATACOMP.schema.field(c).type, c
        assert table.column(c).to_pylist() == DATACOMP.column(c).to_pylist(), c
    assert len(samples) == 3
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["clip_l14_similarity_score"] for m in metas] == [0.2, 0.31, None]  # float32 as written: 0.2
    assert [m["face_bboxes"] for m in metas] == [[[0.1, 0.1, 0.3, 0.3]], [], None]
    assert [m["n_faces"] for m in metas] == [1, 0, 2] and [m["nsfw"] for m in metas] == [False, False, True]
    assert [m["uid"] for m in metas] == DATACOMP.column("uid").to_pylist()

    # re-curation from those tars: the json's numbers and lists come back as numbers and lists
    again = read_rows(
        {"path": str(tmp_path / "out" / "*.tar"), "save_additional_columns": EXTRA}, tmp_path / "out"
    )
    assert again.column("face_bboxes").to_pylist() == [[[0.1, 0.1, 0.3, 0.3]], [], None]
    assert pa.types.is_floating(again.schema.field("clip_l14_similarity_score").type)
    assert again.column("n_faces").to_pylist() == [1, 0, 2]


def test_a_column_keeps_one_type_over_files(tmp_path):
    """The first file's type holds for the whole run; a later file whose values convert is cast, one
    whose values do not fails the split in one line naming the column and the file."""
    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    a.write_text('{"url": "http://x/0.jpg", "caption": "a", "score": 0.5}\n')
    b.write_text('{"url": "http://x/1.jpg", "caption": "b", "score": 2}\n')
    c.write_text('{"url": "http://x/2.jpg", "caption": "c", "score": "high"}\n')
    rows = read_rows({"path": [str(a), str(b)], "save_additional_columns": ["score"]}, tmp_path)
    assert rows.schema.field("score").type == pa.float64() and rows.column("score").to_pylist() == [0.5, 2.0]
    with pytest.raises(StageFailed) as e:
        read_rows({"path": [str(a), str(c)], "save_additional_columns": ["score"]}, tmp_path)
    msg = str(e.value)
    assert (
        msg.startswith("stage read: key 'save_additional_columns': column 'score' is double")
        and "c.jsonl" in msg
    )


# ---- key_col -------------------------------------------------------------------------------------------


def test_key_col_keys_the_samples_by_uid(tmp_path):
    pq.write_table(DATACOMP, tmp_path / "metadata.parquet")
    cfg = {"path": str(tmp_path / "metadata.parquet"), "caption_col": "text", "key_col": "uid"}
    rows = read_rows(cfg, tmp_path, samples_per_shard=2)
    assert rows.column("key").to_pylist() == DATACOMP.column("uid").to_pylist()
    assert "uid" not in rows.column_names  # a key only, unless save_additional_columns keeps the column too
    _, samples = write_ok(rows, tmp_path / "out")
    assert [s["__key__"] for s in samples] == DATACOMP.column("uid").to_pylist()


def test_key_col_refuses_duplicates_and_dots_in_one_line(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(DATACOMP, a)
    pq.write_table(DATACOMP.slice(1, 1), b)  # the second row again, in another file

    def refusal(path, **cfg) -> str:
        with pytest.raises(InputError) as e:
            Read({"path": path, "caption_col": "text", "key_col": "uid", **cfg}).check()
        assert e.value.key == "key_col" and "\n" not in str(e.value)
        return str(e.value)

    uid = DATACOMP.column("uid")[1].as_py()
    msg = refusal([str(a), str(b)])
    assert f"duplicate key '{uid}' in column 'uid': row 2 of {a} and row 1 of {b}" in msg
    dup = tmp_path / "dup.csv"
    dup.write_text("uid,url,text\nk1,http://x/0.jpg,a\nk2,http://x/1.jpg,b\nk1,http://x/2.jpg,c\n")
    assert f"duplicate key 'k1' in column 'uid': rows 1 and 3 of {dup}" in refusal(str(dup))
    dotted = tmp_path / "dotted.csv"
    dotted.write_text("uid,url,text\nk1,http://x/0.jpg,a\nk2.jpg,http://x/1.jpg,b\n")
    msg = refusal(str(dotted))
    assert "has a dot" in msg and "'k2.jpg'" in msg and f"row 2 of {dotted}" in msg
    empty = tmp_path / "empty.csv"
    empty.write_text('uid,url,text\nk1,http://x/0.jpg,a\n"",http://x/1.jpg,b\n')
    assert f"the key in column 'uid' is null: None (row 2 of {empty})" in refusal(
        str(empty)
    )  # "" reads as null
    urls = tmp_path / "urls.txt"
    urls.write_text("http://x/0.jpg\n")
    assert "a txt list has only URLs" in refusal(str(urls), caption_col=None)
    # the split checks the keys too (a run that skipped the check): the run fails, in one line
    with pytest.raises(StageFailed, match=r"^stage read: key 'key_col': duplicate key 'k1'"):
        read_rows({"path": str(dup), "caption_col": "text", "key_col": "uid"}, tmp_path, check=False)


def test_key_check_tells_shared_hashes_from_duplicates(monkeypatch):
    """Two keys sharing a 64-bit hash are not duplicates. Such keys cannot be found by hand, so the
    hash is replaced by a constant here: every key then shares it, and only the rescan decides."""
    import numpy as np

    monkeypatch.setattr(read_keys, "_hash", lambda keys: np.zeros(len(keys), np.uint64))
    batches = [(pa.array(["a", "b"]), "f1", 0), (pa.array(["c"]), "f2", 0)]
    check = read_keys.KeyCheck("uid")
    for keys, path, first in batches:
        check.add(keys, path, first)
    check.finish(lambda: iter(batches))  # unique keys: passes
    batches.append((pa.array(["b"]), "f3", 0))
    check = read_keys.KeyCheck("uid")
    for keys, path, first in batches:
        check.add(keys, path, first)
    with pytest.raises(
        read_keys.BadKey, match="duplicate key 'b' in column 'uid': row 2 of f1 and row 1 of f3"
    ):
        check.finish(lambda: iter(batches))
