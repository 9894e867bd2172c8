"""The write sink without Ray: sizes.json, the Parquet's tar column, img2dataset's timing fields and
statuses, and reshard into balanced tars (the units run here in-process, in a shuffled order and
twice, as Ray's retries could). Tars are read back with webdataset."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from stages.reshard import balanced_sizes
from stages.roles import SinkContext
from stages.write import Write, WriteConfig
from tests.conftest import sink_rows


def tar_keys(path: Path) -> list[str]:
    """Sample keys of a tar, in order, read by webdataset."""
    return [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)]


def parquet(out: Path):
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])


def run_sink(write: Write, out: Path, shards: list[pa.Table], shuffle_units: bool = False) -> dict[str, int]:
    """What the executor does with a sink: every shard, then finish_plan / finish_unit / finish."""
    ctx = SinkContext(output=str(out))
    for t in shards:
        write.write(t, ctx)
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]  # as RunDir.shard_stats
    units = write.finish_plan(ctx, stats)
    if shuffle_units:
        units = random.Random(0).sample(units, len(units))
    results = [write.finish_unit(u, ctx) for u in units]
    return write.finish(ctx, stats, results)


UNEVEN = [
    (0, 40, lambda i: i % 4 != 0),
    (1, 40, lambda i: i < 3),
    (2, 40, lambda i: True),
    (3, 40, lambda i: False),
]


def test_sizes_json_equals_the_tar_contents_and_the_parquet_points_to_each_sample(tmp_path):
    shards = [sink_rows(s, n, keep) for s, n, keep in UNEVEN]
    sizes = run_sink(Write(WriteConfig()), tmp_path, shards)
    on_disk = json.loads((tmp_path / "sizes.json").read_text())
    assert on_disk == sizes == {"00000.tar": 30, "00001.tar": 3, "00002.tar": 40, "00003.tar": 0}
    assert {p.name: len(tar_keys(p)) for p in sorted(tmp_path.glob("*.tar"))} == on_disk
    rows = parquet(tmp_path).to_pylist()
    assert len(rows) == 160
    for r in rows:
        assert r["tar"] == (f"{r['key'][:5]}.tar" if r["status"] == "ok" else None)
    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    assert stats["tar_samples"] == stats["successes"] == 30
    assert stats["start_time"] <= stats["end_time"] and stats["duration"] >= 0  # img2dataset's fields


def test_img2dataset_compat_statuses_and_error_message(tmp_path):
    run_sink(Write(WriteConfig(img2dataset_compat=True)), tmp_path, [sink_rows(0, 10, lambda i: i % 2)])
    import polars as pl

    df = pl.read_parquet(str(tmp_path / "*.parquet"))
    ok = df.filter(pl.col("status") == "success")  # an img2dataset script's filter
    assert ok.height == 5 and ok["error_message"].null_count() == 5 and set(ok["clipcurate_status"]) == {"ok"}
    bad = df.filter(pl.col("status") != "success")
    assert set(bad["status"]) == {"failed_to_download"} and set(bad["error_message"]) == {"HTTP 404"}
    assert set(bad["clipcurate_status"]) == {"download_failed"} and "reason" in df.columns
    sample = next(iter(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False)))
    assert json.loads(sample["json"])["status"] == "success"


@pytest.mark.parametrize(
    "total,per,least,want",
    [
        (73, 20, 1, [19, 18, 18, 18]),
        (73, 100, 3, [25, 24, 24]),
        (2, 10, 4, [1, 1]),
        (0, 5, 2, [0]),
        (40, 10, 1, [10] * 4),
    ],
)
def test_balanced_sizes(total, per, least, want):
    got = balanced_sizes(total, per, least)
    assert got == want and sum(got) == total and max(got) - min(got) <= 1


def test_reshard_writes_balanced_tars_and_repoints_the_parquet(tmp_path):
    shards = [sink_rows(s, n, keep) for s, n, keep in UNEVEN]  # 30, 3, 40, 0 samples
    write = Write(WriteConfig(reshard={"samples_per_shard": 20, "min_shards": 2}))
    sizes = run_sink(write, tmp_path, shards, shuffle_units=True)
    assert sizes == {"00000.tar": 19, "00001.tar": 18, "00002.tar": 18, "00003.tar": 18}
    assert json.loads((tmp_path / "sizes.json").read_text()) == sizes
    got = {p.name: tar_keys(p) for p in sorted(tmp_path.glob("*.tar"))}
    assert {k: len(v) for k, v in got.items()} == sizes
    order = [k for keys in got.values() for k in keys]
    rows = parquet(tmp_path).to_pylist()
    ok_keys = [r["key"] for r in rows if r["status"] == "ok"]
    assert order == ok_keys, "every ok sample once, in input order"
    where = {k: name for name, keys in got.items() for k in keys}
    assert all(r["tar"] == where.get(r["key"]) for r in rows), "the tar column names each sample's tar"
    assert len(rows) == 160 and not (tmp_path / "_clipcurate" / "tars").exists(), "staged tars removed"
    # a rerun of the finished run (the executor calls the sink's end again) redoes nothing
    ctx = SinkContext(output=str(tmp_path))
    stats = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*_stats.json"))]
    assert write.finish_plan(ctx, stats) == []
    assert write.finish(ctx, stats, []) == sizes


def test_reshard_killed_midway_is_redone_to_the_same_bytes(tmp_path):
    """A run killed after some units (a balanced tar and a Parquet rewritten, no record yet) is
    finished by the rerun; the result equals an uninterrupted run's, byte for byte."""
    cfg = WriteConfig(reshard={"samples_per_shard": 16})
    shards = [sink_rows(s, n, keep) for s, n, keep in UNEVEN]
    clean = tmp_path / "clean"
    run_sink(Write(cfg), clean, shards)

    killed = tmp_path / "killed"
    write = Write(cfg)
    ctx = SinkContext(output=str(killed))
    stats = [write.write(t, ctx)[0] for t in shards]
    units = write.finish_plan(ctx, stats)
    kinds = {u["kind"] for u in units}
    assert kinds == {"tar", "parquet"}
    for u in (next(u for u in units if u["kind"] == "tar"), next(u for u in units if u["kind"] == "parquet")):
        write.finish_unit(u, ctx)  # ... and the process dies here
    run_sink(Write(cfg), killed, [])  # the rerun: every shard complete, only the end runs
    names = sorted(p.name for p in clean.glob("*") if p.is_file())
    assert names == sorted(p.name for p in killed.glob("*") if p.is_file())
    for n in names:
        if n.endswith((".tar", ".parquet")) or n == "sizes.json":
            assert (clean / n).read_bytes() == (killed / n).read_bytes(), n


def test_the_report_reads_compat_statuses_and_finds_images_in_balanced_tars(tmp_path):
    """The report's readers (pipeline/html) on sink outputs: our status from ``clipcurate_status`` under
    img2dataset_compat, and kept samples' images from the tar the Parquet names after reshard."""
    from pipeline.config import ReportConfig
    from pipeline.html.data import load_rows
    from pipeline.html.samples import pick_kept, samples
    from pipeline.runs import RunDir

    compat = tmp_path / "compat"
    run_sink(Write(WriteConfig(img2dataset_compat=True)), compat, [sink_rows(0, 10, lambda i: i % 2)])
    df = load_rows(RunDir(str(compat)), ["key", "status", "reason"])
    assert sorted(df["status"].unique()) == ["download_failed", "ok"]

    balanced = tmp_path / "balanced"
    shards = [sink_rows(s, n, keep) for s, n, keep in UNEVEN]
    run_sink(Write(WriteConfig(reshard={"samples_per_shard": 25})), balanced, shards)
    df = load_rows(RunDir(str(balanced)), ["key", "status", "reason", "rejected_by", "caption"])
    kept = pick_kept(df)
    assert kept.height > 0 and set(kept["tar"]) <= {p.name for p in balanced.glob("*.tar")}
    page = samples(RunDir(str(balanced)), df, ReportConfig())
    assert page.count("data:image/jpeg") >= kept.height, "every kept sample is shown with its image"
