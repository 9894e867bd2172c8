"""Bad inputs fail like bad config (issue #18): one line on stderr naming the file, the stage and the key,
exit 2, before Ray starts, nothing written. Folders are inputs; the input's fingerprint is run state; the
summary compares rows in with rows out.

The refusals run the real CLI (``pipeline.cli.main``) in a fresh Python process, which reports whether
``ray`` was ever imported: Ray cannot have started in a process that never imported it."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import config, plan, report
from pipeline.config import ConfigError
from pipeline.html import sections
from pipeline.preflight import preflight
from stages.read import expand_paths
from tests.conftest import REPO, moto_s3

WORKFLOW = """
name: inputs
samples_per_shard: 5
ray: {show_progress: false}
stages:
  - read: {path: %s}
  - write: {}
"""

# main() in a fresh process; prints its exit code and whether ray was imported, exits with the code.
PROBE = (
    "import json, sys\n"
    "from pipeline.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print(json.dumps({'rc': rc, 'ray_imported': 'ray' in sys.modules}))\n"
    "sys.exit(rc)\n"
)


def _table(n: int = 12, cols: tuple[str, ...] = ("url", "caption")) -> pa.Table:
    data = {"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)], "caption": [f"caption {i}" for i in range(n)]}
    return pa.table({c: data.get(c, [f"{c} {i}" for i in range(n)]) for c in cols})


def _workflow(tmp_path: Path, path: str) -> Path:
    p = tmp_path / "w.yaml"
    p.write_text(WORKFLOW % json.dumps(str(path)))
    return p


def _snapshot(root: Path) -> dict[str, tuple[int, int]] | None:
    if not root.exists():
        return None
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def refused(workflow: Path, out: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``pipeline run WORKFLOW --output OUT ARGS``; assert it was refused properly; return the line."""
    before = _snapshot(out)
    r = subprocess.run(
        [sys.executable, "-c", PROBE, "run", str(workflow), "--output", str(out), "--no-report", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=None if env is None else {**os.environ, **env},
    )  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    assert probe == {"rc": 2, "ray_imported": False}, "refused before Ray (ray never imported)"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    line = lines[0]
    assert line.startswith(f"error: {workflow}: "), line
    assert _snapshot(out) == before, "the output folder is untouched (or still absent)"
    return line


# ---- refusals ------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    line = refused(_workflow(tmp_path, tmp_path / "nope.parquet"), tmp_path / "out")
    assert "stages[0] (read): key 'path'" in line and "nope.parquet" in line and "no such file" in line


def test_missing_url_column(tmp_path):
    pq.write_table(_table(cols=("link", "caption")), tmp_path / "pool.parquet")
    line = refused(_workflow(tmp_path, tmp_path / "pool.parquet"), tmp_path / "out")
    assert "stages[0] (read): key 'url_col'" in line and "column 'url' not found" in line
    assert "pool.parquet" in line and "link, caption" in line


def test_missing_caption_column(tmp_path):
    open(tmp_path / "pool.csv", "w").write("url,text\nhttp://x/1.jpg,a cat\n")
    line = refused(_workflow(tmp_path, tmp_path / "pool.csv"), tmp_path / "out")
    assert "stages[0] (read): key 'caption_col'" in line and "column 'caption' not found" in line
    assert "pool.csv" in line and "url, text" in line


def test_txt_list_with_the_default_caption_col(tmp_path):
    (tmp_path / "urls.txt").write_text("http://x/1.jpg\nhttp://x/2.jpg\n")
    wf = _workflow(tmp_path, tmp_path / "urls.txt")
    line = refused(wf, tmp_path / "out")
    assert "stages[0] (read): key 'caption_col'" in line and "urls.txt" in line
    assert "a txt list has only URLs; set caption_col: null" in line
    # what the message says to do works
    preflight(config.load(wf, overrides=["stages.read.caption_col=null"], output=str(tmp_path / "out")))


def test_folder_of_mixed_formats(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    pq.write_table(_table(), folder / "a.parquet")
    (folder / "b.csv").write_text("url,caption\nhttp://x/1.jpg,a\n")
    line = refused(_workflow(tmp_path, folder), tmp_path / "out")
    assert "stages[0] (read): key 'input_format'" in line and f"folder {folder}" in line
    assert "mixes formats (1 csv, 1 parquet)" in line


def test_folder_with_input_format(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    pq.write_table(_table(), folder / "a.parquet")
    wf = _workflow(tmp_path, folder)
    line = refused(wf, tmp_path / "out", "--set", "stages.read.input_format=csv")
    assert "stages[0] (read): key 'input_format'" in line and "holds no csv file" in line and "a.parquet" in line
    # with the format the folder holds, its files of that format are the input (other files ignored)
    (folder / "notes.csv").write_text("url,caption\nhttp://x/1.jpg,a\n")
    (folder / "_SUCCESS").write_text("")
    assert expand_paths(str(folder), "parquet") == [str(folder / "a.parquet")]
    preflight(config.load(wf, overrides=["stages.read.input_format=parquet"], output=str(tmp_path / "out")))


def test_empty_parquet(tmp_path):
    pq.write_table(_table(0), tmp_path / "empty.parquet")
    wf = _workflow(tmp_path, tmp_path / "empty.parquet")
    line = refused(wf, tmp_path / "out")
    assert "stages[0] (read): key 'path'" in line and "has no rows" in line and "empty.parquet" in line
    assert "allow_empty: true" in line
    preflight(config.load(wf, overrides=["stages.read.allow_empty=true"], output=str(tmp_path / "out")))


def test_header_only_csv(tmp_path):
    (tmp_path / "head.csv").write_text("url,caption\n")
    line = refused(_workflow(tmp_path, tmp_path / "head.csv"), tmp_path / "out")
    assert "stages[0] (read): key 'path'" in line and "has no rows" in line and "head.csv" in line


def test_set_value_that_is_not_yaml(tmp_path):
    pq.write_table(_table(), tmp_path / "pool.parquet")
    line = refused(_workflow(tmp_path, tmp_path / "pool.parquet"), tmp_path / "out", "--set", "stages.read.url_col=[1")
    assert "--set stages.read.url_col=[1" in line and "not valid YAML" in line


def test_output_of_a_different_config(tmp_path):
    pq.write_table(_table(), tmp_path / "pool.parquet")
    wf = _workflow(tmp_path, tmp_path / "pool.parquet")
    out = tmp_path / "out"
    (out / "_clipcurate").mkdir(parents=True)
    (out / "_clipcurate" / "config.json").write_text(json.dumps({"config_hash": "0123456789abcdef", "config": {}}))
    (out / "00000.tar").write_bytes(b"")
    line = refused(wf, out)
    assert f"output {out} holds a run of a different config" in line and "0123456789abcdef" in line
    assert "--overwrite" in line
    other = tmp_path / "not_ours"
    other.mkdir()
    (other / "thesis.pdf").write_bytes(b"%PDF")
    line = refused(wf, other)
    assert f"output {other} is not empty and was not written by clipcurate" in line


def test_object_store_paths_are_checked_too(tmp_path, monkeypatch):
    """s3:// files and folders, on an S3-compatible server on 127.0.0.1 (moto), as in test_cluster."""
    import fsspec
    with moto_s3() as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
        fs.mkdir("inputs")
        with fs.open("inputs/pool/a.parquet", "wb") as f:
            pq.write_table(_table(), f)
        with fs.open("inputs/bare/a.parquet", "wb") as f:
            pq.write_table(_table(cols=("url",)), f)
        wf = _workflow(tmp_path, "s3://inputs/pool/")
        out = str(tmp_path / "out")
        line = refused(wf, tmp_path / "out", "--set", "stages.read.path=s3://inputs/nope.parquet", env=env)
        assert "key 'path'" in line and "s3://inputs/nope.parquet: no such file or folder" in line
        line = refused(wf, tmp_path / "out", "--set", "stages.read.path=s3://inputs/bare", env=env)
        assert "key 'caption_col'" in line and "s3://inputs/bare/a.parquet" in line
        type(fs).clear_instance_cache()
        assert expand_paths("s3://inputs/pool") == ["s3://inputs/pool/a.parquet"]
        pipe = config.load(wf, output=out)
        preflight(pipe)
        fingerprint = pipe.build(0).fingerprint()
        assert fingerprint[0]["size"] > 0 and fingerprint[0]["version"], fingerprint  # the ETag
        type(fs).clear_instance_cache()


# ---- a folder runs, equals the glob, and a changed input is refused ------------------------------


def _rows(out: Path) -> pl.DataFrame:
    return pl.concat([pl.from_arrow(pq.read_table(p)) for p in sorted(out.glob("*.parquet"))]).sort("key")


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_folder_of_parquet_equals_the_glob_and_a_changed_input_is_refused(ray_session, tmp_path):
    from pipeline import ray as executor

    folder = tmp_path / "pool"
    folder.mkdir()
    t = _table(12)
    for i, (a, b) in enumerate(((0, 4), (4, 9), (9, 12))):
        pq.write_table(t.slice(a, b - a), folder / f"part-{i}.parquet")
    (folder / "_SUCCESS").write_text("")  # Spark's marker: skipped
    wf = _workflow(tmp_path, folder)

    def run(path: Path | str, out: Path) -> dict:
        pipe = config.load(wf, overrides=[f"stages.read.path={path}"], output=str(out))
        plan.check(pipe)
        preflight(pipe)  # what `clipcurate run` does before the executor
        return executor.run(pipe)

    by_folder = run(folder, tmp_path / "a")
    by_glob = run(folder / "*.parquet", tmp_path / "b")
    assert by_folder["input_rows"] == by_folder["total_rows"] == 12
    assert _rows(tmp_path / "a").drop("rejected_by", strict=False).equals(
        _rows(tmp_path / "b").drop("rejected_by", strict=False)
    )
    assert _rows(tmp_path / "a")["url"].to_list() == t.column("url").to_pylist()
    assert _tars(tmp_path / "a") == _tars(tmp_path / "b")
    assert by_folder["shards"] == by_glob["shards"]
    fp = json.loads((tmp_path / "a" / "_clipcurate" / "input" / "_fingerprint.json").read_text())
    assert [Path(f["path"]).name for f in fp["files"]] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]

    again = run(folder, tmp_path / "a")  # the same input: resumes, nothing redone
    assert again["resumed"] and again["total_rows"] == 12

    pq.write_table(_table(5), folder / "part-1.parquet")  # the input changes in place
    line = refused(wf, tmp_path / "a", "--set", f"stages.read.path={folder}")
    assert "stages[0] (read): key 'path': the input changed since the run in" in line
    assert "part-1.parquet" in line and "--overwrite" in line
    (folder / "part-3.parquet").write_bytes((folder / "part-1.parquet").read_bytes())  # and grows
    line = refused(wf, tmp_path / "b", "--set", f"stages.read.path={folder / '*.parquet'}")
    assert "new file" in line and "part-3.parquet" in line


# ---- DataComp-like input: typed extra columns and uid keys, through the real pipeline ----------------

DATACOMP_WORKFLOW = """
name: datacomp_like
samples_per_shard: 12
ray: {show_progress: false}
stages:
  - read:
      path: %s
      key_col: uid
      save_additional_columns: [uid, clip_l14_similarity_score, face_bboxes, n_faces, is_mismatched]
  - download: {image_size: 32, timeout: 5, allowed_networks: ["127.0.0.0/8"]}
  - write: {}
"""


def _datacomp_like(urls: Path, n: int = 24) -> pa.Table:
    """The demo world's URL list with DataComp's metadata columns: a hex ``uid``, a float32 score,
    face boxes as lists of lists of float32, an int."""
    import hashlib

    t = pq.read_table(urls).slice(0, n)
    uids = [hashlib.md5(u.encode()).hexdigest() for u in t.column("url").to_pylist()]
    boxes = [[[0.1, 0.2, 0.3, 0.4]] * (i % 3) for i in range(n)]
    return (
        t.append_column("uid", pa.array(uids, pa.string()))
        .append_column("clip_l14_similarity_score", pa.array([i / 40 for i in range(n)], pa.float32()))
        .append_column("face_bboxes", pa.array(boxes, pa.list_(pa.list_(pa.float32()))))
        .append_column("n_faces", pa.array([i % 3 for i in range(n)], pa.int64()))
    )


def test_datacomp_types_and_uid_keys_through_the_pipeline(ray_session, demo_urls, tmp_path):
    import numpy as np
    import webdataset as wds

    from pipeline import ray as executor

    table = _datacomp_like(demo_urls)
    pq.write_table(table, tmp_path / "metadata.parquet")
    wf = tmp_path / "w.yaml"
    wf.write_text(DATACOMP_WORKFLOW % json.dumps(str(tmp_path / "metadata.parquet")))
    out = tmp_path / "out"

    def run() -> dict:
        pipe = config.load(wf, output=str(out))
        plan.check(pipe)
        preflight(pipe)
        return executor.run(pipe)

    first = run()
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])
    assert rows.num_rows == table.num_rows == first["total_rows"]
    for c in ("clip_l14_similarity_score", "face_bboxes", "n_faces", "is_mismatched"):
        assert rows.schema.field(c).type == table.schema.field(c).type, c
    by_uid = {r["uid"]: r for r in table.to_pylist()}
    assert sorted(rows.column("key").to_pylist()) == sorted(by_uid)  # keyed by uid
    assert rows.column("key").to_pylist() == rows.column("uid").to_pylist()
    ok = sum(s == "ok" for s in rows.column("status").to_pylist())
    assert ok >= 18

    samples = list(wds.WebDataset(first["shard_pattern"], shardshuffle=False))
    assert len(samples) == ok
    for s in samples:
        meta = json.loads(s["json"])
        want = by_uid[s["__key__"]]  # the tar's key is the uid
        assert meta["key"] == meta["uid"] == s["__key__"]
        assert isinstance(meta["clip_l14_similarity_score"], float)
        # the float32 in its shortest form (0.025, not 0.02500000037252903), the same float32
        assert meta["clip_l14_similarity_score"] == float(str(np.float32(want["clip_l14_similarity_score"])))
        assert meta["face_bboxes"] == [[0.1, 0.2, 0.3, 0.4]] * want["n_faces"]
        assert meta["n_faces"] == want["n_faces"] and meta["is_mismatched"] is want["is_mismatched"]

    tars = _tars(out)
    again = run()  # resume: the same keys, nothing redone
    assert again["resumed"] and again["total_rows"] == table.num_rows and _tars(out) == tars


def test_duplicate_uid_is_refused_before_any_work(tmp_path):
    t = _datacomp_like_rows(6)
    uid = t.column("uid")[2].as_py()
    pq.write_table(t, tmp_path / "a.parquet")
    pq.write_table(t.slice(2, 1), tmp_path / "b.parquet")
    wf = tmp_path / "w.yaml"
    wf.write_text(DATACOMP_WORKFLOW % json.dumps(str(tmp_path / "*.parquet")))
    line = refused(wf, tmp_path / "out")
    assert "stages[0] (read): key 'key_col':" in line
    assert f"duplicate key '{uid}' in column 'uid': row 3 of {tmp_path / 'a.parquet'} and row 1 of" in line


def _datacomp_like_rows(n: int) -> pa.Table:
    return pa.table(
        {
            "url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "uid": [f"{i:032x}" for i in range(n)],
            "clip_l14_similarity_score": pa.array([i / 10 for i in range(n)], pa.float32()),
            "face_bboxes": pa.array([[[0.1, 0.2, 0.3, 0.4]]] * n, pa.list_(pa.list_(pa.float32()))),
            "n_faces": [1] * n,
            "is_mismatched": [False] * n,
        }
    )


# ---- the summary ----------------------------------------------------------------------------------


def _manifest(input_rows: int, total_rows: int) -> dict:
    return {
        "name": "t",
        "output": "/tmp/out",
        "config": {"stages": [{"read": {"path": "x.parquet"}}, {"download": {}}, {"clip_score": {}}, {"write": {}}]},
        "input_rows": input_rows,
        "total_rows": total_rows,
        "total_samples": total_rows - 5,
        "status_counts": {"ok": total_rows - 5, "download_failed": 3, "filtered_clip": 2},
        "stage_status": {"download": {"download_failed": 3}, "clip_score": {"filtered_clip": 2}},
        # the executor's counters: rows passed through in this run, and busy seconds
        "stage_rows": {"read": total_rows, "download": total_rows, "clip_score": total_rows},
        "stage_seconds": {"read": 0.5, "download": 2.0, "clip_score": 1.5},
        "shards": [{"name": "00000", "count": total_rows, "successes": total_rows - 5}],
        "shard_pattern": "/tmp/out/00000.tar",
        "resumed": False,
        "wall_seconds": 4.0,
    }


def _summary(manifest: dict) -> tuple[dict[str, list[str]], str]:
    from test_report import parse_summary

    buf = io.StringIO()
    report.print_summary(manifest, file=buf)
    return parse_summary(buf.getvalue())


def test_summary_shows_rows_in_and_out_when_they_differ():
    rows, rest = _summary(_manifest(input_rows=20, total_rows=18))
    assert "rows: 20 in, 18 out (13 ok samples in 1 shards)" in rest
    assert "ROWS IN != ROWS OUT: 2 of the 20 input rows are missing from the output" in rest
    rows, rest = _summary(_manifest(input_rows=18, total_rows=18))
    assert "rows: 18 in, 18 out" in rest and "ROWS IN != ROWS OUT" not in rest


def test_rows_per_second_counts_the_rows_a_stage_processed():
    m = _manifest(input_rows=18, total_rows=18)
    rows, _ = _summary(m)
    # download processes all 18 (9/s); clip_score only the 15 still ok after download: 15 / 1.5 s,
    # not the 18 it passed through (12/s)
    assert rows["download"][1:] == ["18", "download_failed: 3", "15", "2.0", "9"]
    assert rows["clip_score"][1:] == ["15", "filtered_clip: 2", "13", "1.5", "10"]
    assert rows["read"][-1] == "36"
    # report.html's funnel comes from the same helper: same numbers from the Parquet rows
    df = pl.DataFrame(
        {
            "status": ["ok"] * 13 + ["download_failed"] * 3 + ["filtered_clip"] * 2,
            "rejected_by": [None] * 13 + ["download"] * 3 + ["clip_score"] * 2,
        }
    )
    html = sections.funnel(m, df, [next(iter(s)) for s in m["config"]["stages"]])
    cells = re.findall(r"<tr>(.*?)</tr>", html)
    clip = next(c for c in cells if "<td>clip_score</td>" in c)
    assert re.findall(r"<td[^>]*>([^<]*)</td>", clip) == ["clip_score", "15", "filtered_clip: 2", "13", "1.5", "10"]


def test_a_resumed_run_rates_only_this_runs_rows():
    m = _manifest(input_rows=18, total_rows=18)
    m["stage_rows"] = {"read": 6, "download": 6, "clip_score": 6}  # one shard of three redone
    m["stage_seconds"] = {"read": 0.5, "download": 1.0, "clip_score": 0.5}
    rows, _ = _summary(m)
    assert rows["download"][-1] == "6" and rows["clip_score"][-1] == "10"  # 18/3 per 1 s, 15/3 per 0.5 s


def test_bad_input_is_a_config_error_in_process(tmp_path):
    """The same checks through the API, for callers that do not go through the CLI."""
    wf = _workflow(tmp_path, tmp_path / "missing" / "*.parquet")
    with pytest.raises(ConfigError) as e:
        preflight(config.load(wf, output=str(tmp_path / "out")))
    assert "\n" not in str(e.value) and "no input file matches" in str(e.value)
    tar = tmp_path / "x.tar"
    with tarfile.open(tar, "w"):
        pass
    preflight(config.load(wf, overrides=[f"stages.read.path={tar}"], output=str(tmp_path / "out")))
