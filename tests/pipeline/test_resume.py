"""Outputs trainers trust (issue #7): exactly once after kill -9, a killed actor loses no rows,
open_clip's own trainer reads the shards, and re-curation reproduces the scores."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import polars as pl
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, demo_pipeline, open_clip_train, tar_samples

SMALL_SHARDS = "samples_per_shard=25"
# One LaCLIP rewrite per caption instead of the demo's four: the runs below test what a kill leaves and how a
# resume repairs it, not the rewriting (tests/stages/test_rewrite.py); the toy LM is most of a demo run's time.
ONE_REWRITE = "stages.rewrite.n_rewrites=1"


def _tar_images(out: Path) -> dict[str, bytes]:
    return tar_samples(fsspec.filesystem("file"), out.glob("*.tar"))[0]


def _rows(out: Path) -> pl.DataFrame:
    return pl.concat([pl.from_arrow(pq.read_table(p)) for p in sorted(out.glob("*.parquet"))], how="diagonal")


def _leftovers(out: Path) -> list[str]:
    return [str(p) for p in out.rglob("*") if ".tmp-" in p.name]


def _identity(p: Path) -> tuple[int, int, bytes]:
    """(inode, mtime, bytes) of a file: all three stay when a rerun keeps it."""
    st = p.stat()
    return st.st_ino, st.st_mtime_ns, p.read_bytes()


def test_exactly_once_after_kill_9(ray_session, demo_urls, tmp_path):
    """Kill the whole run (driver and its local Ray) with SIGKILL after some shards are complete and
    others are in flight, rerun it, and compare with a clean run into another folder. The rerun keeps
    the shards completed before the kill (same inode, mtime and bytes), and removes or redoes what a
    kill mid-write leaves: a planted ``*.tmp-*`` file and a planted tar without its ``_stats.json``
    (planted, because the kill itself rarely lands mid-write)."""
    from pipeline import ray as executor

    killed = tmp_path / "killed"
    cmd = [
        sys.executable, "-m", "pipeline", "run", str(REPO / "workflows" / "demo.yaml"),
        "--output", str(killed), "--no-report",
        "--set", f"stages.read.path={demo_urls}", "--set", SMALL_SHARDS, "--set", ONE_REWRITE,
        "--set", "ray.show_progress=false",
    ]  # fmt: skip
    n_shards = -(-pq.read_metadata(demo_urls).num_rows // 25)
    proc = subprocess.Popen(
        cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if len(list(killed.glob("*_stats.json"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (
            "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = sorted(p.name.removesuffix("_stats.json") for p in killed.glob("*_stats.json"))
    assert 2 <= len(done) < n_shards, "killed after some shards and before all"
    kept = {p.name: _identity(p) for n in done for p in killed.glob(f"{n}.*")} | {
        f"{n}_stats.json": _identity(killed / f"{n}_stats.json") for n in done
    }
    assert len(kept) == 3 * len(done), "tar, parquet and stats of each completed shard"
    todo = next(n for n in (f"{s:0{len(done[0])}d}" for s in range(n_shards)) if n not in done)
    junk_tar = b"a tar cut short by the kill, without its _stats.json"
    (killed / f"{todo}.tar").write_bytes(junk_tar)
    planted_tmp = [
        killed / f"{todo}.parquet.tmp-0badc0de",
        killed / "_clipcurate" / "input" / "x.json.tmp-0badc0de",
    ]
    for p in planted_tmp:
        p.write_bytes(b"partial")

    resumed = executor.run(demo_pipeline(demo_urls, killed, [SMALL_SHARDS, ONE_REWRITE]))
    assert resumed["resumed"] is True
    assert {n: _identity(killed / n) for n in kept} == kept, "shards completed before the kill are kept"
    assert not any(p.exists() for p in planted_tmp), "temporary files of the killed run are removed"
    assert (killed / f"{todo}_stats.json").is_file() and (killed / f"{todo}.tar").read_bytes() != junk_tar
    clean = executor.run(demo_pipeline(demo_urls, tmp_path / "clean", [SMALL_SHARDS, ONE_REWRITE]))

    a, b = _tar_images(killed), _tar_images(tmp_path / "clean")
    assert set(a) == set(b) and len(a) > 0
    assert all(a[k] == b[k] for k in a), "same image bytes per key"
    ra, rb = _rows(killed).sort("key"), _rows(tmp_path / "clean").sort("key")
    assert ra["key"].is_unique().all() and ra.height == rb.height == pq.read_metadata(demo_urls).num_rows
    cols = ["key", "url", "caption", "status", "reason", "width", "height", "sha256", "caption_rewrites"]
    assert ra.select(cols).equals(rb.select(cols))
    assert _leftovers(killed) == []
    for k in ("total_rows", "total_samples", "status_counts", "stage_status"):
        assert resumed[k] == clean[k], k
    assert [s["name"] for s in resumed["shards"]] == [s["name"] for s in clean["shards"]]


def test_same_config_resume_is_a_noop_and_other_config_is_refused(ray_session, demo_run, demo_urls):
    from pipeline import ray as executor
    from pipeline.runs import OutputInUse

    out, first = demo_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("0*")}
    again = executor.run(demo_pipeline(demo_urls, out))
    assert again["resumed"] and again["total_rows"] == first["total_rows"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0*")} == before, "complete shards are kept"
    with pytest.raises(OutputInUse) as e:
        executor.run(demo_pipeline(demo_urls, out, ["stages.clip_score.min_score=0.9"]))
    assert "different config" in str(e.value) and "--overwrite" in str(e.value)


def test_killed_actor_loses_no_rows(ray_session, demo_urls, tmp_path):
    """An actor exits hard (os._exit) mid-batch (``tests.plugins:KillOnce``, an actor stage plugged in
    after clip_score); Ray restarts it and retries the batch, and rows in == rows out."""
    from pipeline import ray as executor

    marker = tmp_path / "killed-once"
    kill = {"tests.plugins:KillOnce": {"marker": str(marker), "num_cpus": 0}}
    m = executor.run(demo_pipeline(demo_urls, tmp_path / "out", [SMALL_SHARDS, ONE_REWRITE], insert={3: kill}))
    assert marker.exists(), "the actor was killed"
    rows = _rows(tmp_path / "out")
    n = pq.read_metadata(demo_urls).num_rows
    assert rows.height == n == m["total_rows"] and rows["key"].is_unique().all()
    assert rows.filter(pl.col("status") == "ok")["clip_score"].null_count() == 0


def test_open_clip_training_reads_the_output(demo_run, tmp_path):
    """A few steps of open_clip's own trainer (open_clip_train.main) on the shards, on the CPU with the
    toy CLIP, using the manifest's shard pattern and sample count: that count is the samples in the
    tars, and open_clip's epoch is all of them (``open_clip_train`` reads its progress lines)."""
    out, manifest = demo_run
    in_tars = len(_tar_images(out))
    assert manifest["total_samples"] == in_tars > 0
    n = str(manifest["total_samples"])
    open_clip_train(
        manifest["shard_pattern"], tmp_path / "logs", "smoke", "--train-num-samples", n, samples=in_tars
    )


def test_recuration_reproduces_scores(ray_session, demo_run, tmp_path):
    """Re-read our own output shards (input_format: webdataset) and re-run clip_score: same scores."""
    from pipeline import config, plan
    from pipeline import ray as executor

    out, _ = demo_run
    pipe = config.from_dict(
        {
            "name": "recurate",
            "samples_per_shard": 100,
            "ray": {"show_progress": False},
            "stages": [
                {"read": {"path": str(out / "*.tar"), "input_format": "webdataset"}},
                {"clip_score": {"model": "local-dir:demo/assets/toy_clip", "batch_size": 32}},
                {"write": {}},
            ],
        },
        output=str(tmp_path / "re"),
    )
    plan.check(pipe)
    m = executor.run(pipe)
    old = _rows(out).filter(pl.col("status") == "ok").select("key", "clip_score").sort("key")
    new = _rows(tmp_path / "re").select("key", "clip_score", "status").sort("key")
    assert m["total_rows"] == old.height == new.height
    assert (new["status"] == "ok").all()
    assert new["key"].to_list() == old["key"].to_list()
    diff = (new["clip_score"] - old["clip_score"]).abs().max()
    assert diff < 1e-5, diff


def test_tar_member_names_are_sanitised(tmp_path):
    from stages.read import Read, sanitize_member_name

    assert sanitize_member_name("../evil.jpg") is None
    assert sanitize_member_name("/etc/passwd") is None
    assert sanitize_member_name("a/../../b.txt") is None
    assert sanitize_member_name("sub/000001.jpg") == "sub/000001.jpg"
    tar_path = tmp_path / "x.tar"
    with tarfile.open(tar_path, "w") as t:
        for name, data in (
            ("../evil.jpg", b"\xff\xd8\xffbad"),
            ("ok1.jpg", b"\xff\xd8\xffgood"),
            ("ok1.txt", b"hi"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    stage = Read(Read.Config(path=str(tar_path), input_format="webdataset"))
    rows = stage._load_tar(str(tar_path), {"shard": 0})
    assert rows.column("key").to_pylist() == ["ok1"]
    assert rows.column("caption").to_pylist() == ["hi"]
    assert json.loads(json.dumps(rows.column("status").to_pylist())) == ["ok"]
