"""Pool-wide stages on Ray at pool scale (issue #13): exact ``dedup`` (a shuffle stage: per-shard
decision files, ``pipeline/ray/shuffle.py``) and ``clip_filter`` (a two-round reduce) through the
executor, read -> dedup -> clip_filter -> write on a Parquet pool with url, sha256 and clip_score
columns (no download: the scores and hashes are made up here, seeded, standing in for the
download's and clip_score's output, which is all these stages read).

* Exactness: several shard sizes and partition (bucket) counts give the same rows, statuses and
  reasons as the driver-merge dedup it replaced (``tests/dedup_reference.py``) followed by DataComp's
  rule over the rows dedup keeps.
* Resume: a CLI run killed (SIGKILL) during the shuffle, with what a kill mid-write leaves planted
  (a ``*.tmp-*`` file and a cut-short decisions file, the completion marker absent), then rerun,
  writes the same shard files, byte for byte, as a clean run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from schemas import conform
from tests import dedup_reference as reference
from tests.conftest import REPO

N = 600


def _pool(path: Path, n: int = N) -> pa.Table:
    rng = np.random.default_rng(13)
    url_of = rng.integers(0, int(n * 0.8), n)  # ~20% repeated URLs
    img_of = rng.integers(0, int(n * 0.85), n)  # and images under other URLs
    clip = np.round(rng.normal(0.3, 0.05, n), 3)  # rounded: ties at the cut
    table = pa.table(
        {
            "url": [f"http://127.0.0.1:9/{u}.jpg" for u in url_of],
            "text": [f"a photo number {i}" for i in range(n)],
            "sha256": [hashlib.sha256(b"img%d" % j).hexdigest() for j in img_of],
            "clip_score": pa.array(clip, pa.float64()),
        }
    )
    pq.write_table(table, path)
    return table


def _workflow(pool: Path, per_shard: int) -> dict:
    read = {"path": str(pool), "caption_col": "text", "save_additional_columns": ["sha256", "clip_score"]}
    return {
        "name": "shuffle",
        "samples_per_shard": per_shard,
        "ray": {"show_progress": False},
        "stages": [
            {"read": read},
            {"dedup": {"by": ["url", "sha256"]}},
            {"clip_filter": {"top_fraction": 0.3}},
            {"write": {}},
        ],
    }


def _run(wf: dict, out: Path):
    from pipeline import config, plan
    from pipeline import ray as executor

    pipe = config.from_dict(wf, output=str(out))
    plan.check(pipe)
    return executor.run(pipe)


def _result(out: Path) -> dict[str, tuple]:
    t = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])
    return {
        r["key"]: (r["status"], r["reason"], r["rule"])
        for r in t.select(["key", "status", "reason", "rule"]).to_pylist()
    }


def _expected(table: pa.Table, keys: list[str]) -> dict[str, tuple]:
    """The driver-merge dedup, then DataComp's rule over the rows it keeps (as clip_filter had it)."""
    from stages.clip_filter import _why, datacomp_threshold

    rows = conform(
        table.append_column("key", pa.array(keys)).append_column("status", pa.array(["ok"] * len(keys)))
    )
    dups = reference.dedup([rows], by=("url", "sha256"))
    out = {k: ("duplicate", r, f"duplicate:{r.split()[0].split(':')[1]}") for k, r in dups.items()}
    pool = [(k, s) for k, s in zip(keys, table.column("clip_score").to_pylist()) if k not in dups]
    thr = datacomp_threshold(np.array([s for _, s in pool]), 0.3)
    n = len(pool)
    for k, s in pool:
        if s >= thr:
            out[k] = ("ok", None, None)
        else:
            rule = {"threshold": thr, "top_fraction": 0.3}
            tag, reason = _why("clip_score", s, False, rule, n)
            out[k] = ("filtered_clip", reason, tag)
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[Path, pa.Table]:
    d = tmp_path_factory.mktemp("shuffle_pool")
    return d / "pool.parquet", _pool(d / "pool.parquet")


@pytest.mark.parametrize(("per_shard", "rows_per_partition"), [(50, 100), (250, 10**6)])
def test_same_rows_as_the_driver_merge_whatever_the_split(ray_session, pool, tmp_path, monkeypatch,
                                                          per_shard, rows_per_partition):  # fmt: skip
    from pipeline.ray import shuffle

    monkeypatch.setattr(shuffle, "ROWS_PER_PARTITION", rows_per_partition)
    path, table = pool
    out = tmp_path / "out"
    manifest = _run(_workflow(path, per_shard), out)
    got = _result(out)
    keys = sorted(got)  # read's keys follow the input order
    want = _expected(table, keys)
    assert got == want
    n_dup = sum(v[0] == "duplicate" for v in want.values())
    assert 0 < n_dup < N and manifest["status_counts"]["duplicate"] == n_dup
    summary = manifest["global_state"]["dedup"]
    assert summary["flagged"] == n_dup == summary["duplicate_url"] + summary["duplicate_sha256"]
    assert summary["unique_url"] == len(set(table.column("url").to_pylist()))
    assert summary["unique_sha256"] == len(set(table.column("sha256").to_pylist()))
    marker = out / "_clipcurate" / "state" / "01_dedup.json"
    assert marker.is_file() and (out / "_clipcurate" / "state" / "01_dedup" / "decisions").is_dir()
    assert not (out / "_clipcurate" / "state" / "01_dedup" / "parts").exists(), "shuffle files removed"
    buckets = yaml.safe_load(marker.read_text())["buckets"]
    assert buckets == -(-N // rows_per_partition)
    assert manifest["global_state"]["clip_filter"]["kept"] == sum(v[0] == "ok" for v in want.values())


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".parquet", ".tar")}


def test_killed_during_the_shuffle_then_rerun_writes_the_clean_bytes(ray_session, tmp_path):
    import ray

    n = 1500
    path = tmp_path / "pool.parquet"
    _pool(path, n)
    wf = _workflow(path, 75)
    wf_path = tmp_path / "w.yaml"
    wf_path.write_text(yaml.safe_dump(wf))
    _run(wf, tmp_path / "clean")

    killed = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "pipeline", "run", str(wf_path), "--output", str(killed), "--no-report",
           "--set", f"ray.address={address}"]  # fmt: skip
    base = killed / "_clipcurate" / "state" / "01_dedup"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (base / "parts").is_dir() and any((base / "parts").iterdir()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, (
            "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1.0)  # the dead driver's tasks are ended by Ray
    # what a kill mid-write leaves (planted: the kill rarely lands on these exact moments)
    (killed / "_clipcurate" / "state" / "01_dedup.json").unlink(missing_ok=True)
    (base / "decisions").mkdir(parents=True, exist_ok=True)
    (base / "decisions" / "shard-00000.parquet").write_bytes(b"cut short")
    (base / "decisions" / "shard-00001.parquet.tmp-0badc0de").write_bytes(b"cut short")
    assert not list(killed.glob("*.parquet")), "killed before any shard was written"

    manifest = _run(wf, killed)
    assert manifest["resumed"] is True
    assert _files(killed) == _files(tmp_path / "clean")
    assert not [p for p in killed.rglob("*") if ".tmp-" in p.name]


def test_a_shuffle_stage_with_a_reduce_step_plugged_in(ray_session, pool, tmp_path):
    """``tests.plugins:ScoreBandDedup`` (no edit in ``pipeline/``): its fit runs first, its state is
    persisted beside the decisions (``NN_name/fit.json``) and loaded by the shuffle's tasks; the rows
    equal ``run_local``'s over the same shards."""
    from stages.shuffle import run_local
    from tests.plugins import ScoreBandDedup, ScoreBandDedupConfig

    path, table = pool
    wf = _workflow(path, 200)
    wf["stages"][1:3] = [{"tests.plugins:ScoreBandDedup": {"bands": 7}}]
    out = tmp_path / "out"
    manifest = _run(wf, out)
    got = _result(out)
    assert (out / "_clipcurate" / "state" / "01_score_band_dedup" / "fit.json").is_file()
    keys = sorted(got)
    rows = conform(table.append_column("key", pa.array(keys)).append_column("status", pa.array(["ok"] * N)))
    blocks = [rows.slice(a, 200) for a in range(0, N, 200)]
    local = run_local(ScoreBandDedup(ScoreBandDedupConfig(bands=7)), blocks, n_partitions=3)
    want = {r["key"]: (r["status"], r["reason"], r["rule"]) for b in local for r in b.to_pylist()}
    assert got == want
    flagged = sum(v[0] == "duplicate" for v in want.values())
    assert 0 < flagged < N - 3
    top = max(rows.column("clip_score").to_pylist())  # as the rows carry it (float32, schemas/)
    assert manifest["global_state"]["score_band_dedup"] == {"max": top, "flagged": flagged}
