"""What readers and trainers find in an output (issue #19): sizes.json equal to the tars, balanced
tars with ``write.reshard`` that open_clip's trainer reads with one worker per tar, the manifest's
shard pattern as webdataset opens it (local, and ``pipe:aws s3 cp`` on an S3 server), and the
README's Parquet-reading snippets run on a real output."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
import webdataset as wds

from tests.conftest import REPO, moto_s3, open_clip_train


def wds_sizes(out: Path) -> dict[str, int]:
    """Samples per tar of an output, counted by webdataset."""
    return {
        p.name: sum(1 for _ in wds.WebDataset(str(p), shardshuffle=False)) for p in sorted(out.glob("*.tar"))
    }


def test_sizes_json_equals_the_tars(demo_run):
    out, manifest = demo_run
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == wds_sizes(out) and sum(sizes.values()) == manifest["total_samples"] > 0
    assert manifest["tar_count"] == len(sizes)
    n = sum(1 for _ in wds.WebDataset(manifest["shard_pattern"], shardshuffle=False))  # a local pattern
    assert n == manifest["total_samples"]
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["end_time"] >= stats["start_time"] > 0 and stats["duration"] == pytest.approx(
        stats["end_time"] - stats["start_time"], abs=1e-3
    )


def _readme_block(name: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has the {name} snippet"
    return m.group(1)


def test_readme_parquet_snippets_read_every_row(demo_run):
    out, manifest = demo_run
    code = _readme_block("read-parquet")
    assert code.startswith('out = "out"')
    scope: dict = {}
    exec(code.replace('out = "out"', f"out = {str(out)!r}", 1), scope)  # noqa: S102 - the README's own code
    n = manifest["total_rows"]
    assert scope["df"].height == scope["table"].num_rows == scope["dataset"].count_rows() == n
    assert scope["ok"].height == manifest["total_samples"]


def reshard_pipeline(tars: str, output: Path):
    """Re-curate an output: its tars in, a basic filter that drops about a quarter unevenly, balanced tars out."""
    from pipeline import config, plan

    pipe = config.from_dict(
        {
            "name": "reshard",
            "samples_per_shard": 50,
            "ray": {"show_progress": False},
            "stages": [
                {"read": {"path": tars, "input_format": "webdataset"}},
                {
                    "basic_filter": {
                        "english": False,
                        "lang_id": None,
                        "min_words": 6,
                        "min_image_side": None,
                        "max_aspect_ratio": None,
                    }
                },  # fmt: skip
                {"write": {"reshard": {"samples_per_shard": 200, "min_shards": 2}}},
            ],
        },
        output=str(output),
    )
    plan.check(pipe)
    return pipe


def test_reshard_balances_the_tars_and_open_clip_trains_with_a_worker_per_tar(
    ray_session, demo_run, tmp_path
):
    from pipeline import ray as executor

    src, _ = demo_run
    out = tmp_path / "balanced"
    m = executor.run(reshard_pipeline(str(src / "*.tar"), out))
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == wds_sizes(out), "sizes.json equals the tars"
    assert len(sizes) >= 2 and max(sizes.values()) - min(sizes.values()) <= 1
    assert sum(sizes.values()) == m["total_samples"] and m["tar_count"] == len(sizes)
    rows = pl.read_parquet(str(out / "*.parquet"))
    assert rows.height == m["total_rows"] > m["total_samples"] > 0, "the Parquet holds every row"
    per_tar = rows.filter(pl.col("status") == "ok").group_by("tar").len()
    assert dict(per_tar.iter_rows()) == sizes, "the tar column points to each sample's tar"
    assert rows.filter(pl.col("status") != "ok")["tar"].null_count() == rows.height - m["total_samples"]
    assert not (out / "_clipcurate" / "tars").exists()

    again = executor.run(reshard_pipeline(str(src / "*.tar"), out))  # resume of a finished run: no-op
    assert again["resumed"] and json.loads((out / "sizes.json").read_text()) == sizes

    # open_clip's trainer, one dataloader worker per tar; no --train-num-samples: it reads sizes.json
    # (without it, open_clip refuses a webdataset with no sample count)
    open_clip_train(
        m["shard_pattern"], tmp_path / "logs", "balanced", samples=m["total_samples"], workers=len(sizes)
    )


@pytest.mark.skipif(shutil.which("aws") is None, reason="the aws CLI (the pipe: command) is not installed")
def test_s3_shard_pattern_is_a_pipe_webdataset_reads(tmp_path, monkeypatch):
    """Tars written to an S3 server (moto on 127.0.0.1, standing in for S3) by the write sink; the
    manifest's pattern for them is ``pipe:aws s3 cp ... -``, which webdataset opens as it is."""
    import fsspec

    from pipeline.manifest import shard_pattern, shard_urls
    from stages.roles import SinkContext
    from stages.write import Write, WriteConfig
    from tests.conftest import sink_rows

    with moto_s3() as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
        fs.mkdir("outputs")
        url = "s3://outputs/run"
        write = Write(WriteConfig())
        for t in (sink_rows(0, 12, lambda i: i % 3), sink_rows(1, 12, lambda i: True)):
            write.write(t, SinkContext(output=url))
        stats = [json.loads(fs.cat(p)) for p in sorted(fs.glob("outputs/run/*_stats.json"))]
        sizes = write.finish(SinkContext(output=url), stats, [])
        pattern = shard_pattern(url, list(sizes))
        assert pattern == "pipe:aws s3 cp s3://outputs/run/{00000..00001}.tar -"
        assert shard_urls(url, list(sizes)) == "s3://outputs/run/{00000..00001}.tar"
        keys = [s["__key__"] for s in wds.WebDataset(pattern, shardshuffle=False)]
        assert (
            len(keys) == sum(sizes.values()) == 20 and json.loads(fs.cat("outputs/run/sizes.json")) == sizes
        )


def test_local_shard_pattern_is_plain():
    from pipeline.manifest import shard_pattern

    assert (
        shard_pattern("/data/out", ["00000.tar", "00001.tar", "00002.tar"]) == "/data/out/{00000..00002}.tar"
    )
    assert shard_pattern("/data/out/", ["00000.tar"]) == "/data/out/00000.tar"
    assert shard_pattern("gs://b/out", ["00000.tar", "00001.tar"]) == "gs://b/out/{00000..00001}.tar"
