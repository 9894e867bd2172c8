"""A run with a global stage through the Ray executor (issue #21; README "How it runs", step 3, and
"Using it"): read -> basic_filter -> dedup -> write on a 20-row Parquet (4 shards of 5), no download.

* basic_filter and dedup through Ray give the rows their documented status, rule and reason.
* The fitted dedup state is persisted in ``_clipcurate/state/``; spills are removed after a success.
* A rerun with a shard missing resumes: the state is reused (same file, same mtime; no ``fit_seconds``
  for dedup in the manifest), the shard's missing spill is rebuilt, the complete shards are left as
  they were, and ``keep_intermediate: true`` keeps the spill.
* ``--overwrite`` from the CLI: another config on this non-empty output is refused without it (exit 2,
  before Ray) and run with it.
* The driver forwards its ``FSSPEC_*``, ``HF_*`` and ``GOOGLE_APPLICATION_*`` variables to the workers
  of a cluster it joins (here: the test session's Ray, started without them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO, filter_dedup_workflow

N, PER_SHARD = 20, 5
SHORT = {0, 5, 10, 15}  # caption "cat": one word, under min_words 3
DUPLICATES = {
    17: 1,
    18: 2,
    19: 3,
}  # same URL as the row it duplicates (16 repeats 0, which basic_filter rejected)
def _rows(out: Path) -> dict[int, dict]:
    t = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])
    return {
        int(r["url"].rsplit("/", 1)[1].split(".")[0]) + 16 * (r["caption"].endswith("b")): r
        for r in t.to_pylist()
    }


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("global")
    urls = [f"http://127.0.0.1:9/{i % 16}.jpg" for i in range(N)]
    # the caption's last letter tells rows 16..19 from 0..3 (same URL)
    caps = ["cat" if i in SHORT else f"a photo of cat {i} {'b' if i >= 16 else 'a'}" for i in range(N)]
    pq.write_table(pa.table({"url": urls, "caption": caps}), d / "pool.parquet")
    path = d / "w.yaml"
    wf = filter_dedup_workflow(str(d / "pool.parquet"), samples_per_shard=PER_SHARD, ray={"show_progress": False})
    path.write_text(yaml.safe_dump(wf))
    return path


def _pipe(workflow: Path, out: Path, *sets: str):
    from pipeline import config, plan

    pipe = config.from_dict(
        yaml.safe_load(workflow.read_text()), source=str(workflow), overrides=list(sets), output=str(out)
    )
    plan.check(pipe)
    return pipe


@pytest.fixture(scope="module")
def first_run(ray_session, workflow, tmp_path_factory):
    from pipeline import ray as executor

    out = tmp_path_factory.mktemp("global_out") / "out"
    manifest = executor.run(_pipe(workflow, out))
    return out, manifest


def test_basic_filter_and_dedup_through_ray(first_run):
    out, manifest = first_run
    rows = _rows(out)
    assert sorted(rows) == list(range(N))
    for i, r in rows.items():
        if i in SHORT:
            assert (r["status"], r["rule"], r["rejected_by"]) == (
                "filtered_basic",
                "basic:min_words",
                "basic_filter",
            )
        elif i in DUPLICATES:
            assert (r["status"], r["rule"], r["rejected_by"]) == ("duplicate", "duplicate:url", "dedup")
            assert r["reason"].endswith(f"duplicate of key {rows[DUPLICATES[i]]['key']}"), r["reason"]
        else:
            assert (r["status"], r["rule"], r["reason"]) == ("ok", None, None), i
    assert manifest["status_counts"] == {"ok": 13, "filtered_basic": 4, "duplicate": 3}
    assert manifest["total_rows"] == N and manifest["tar_count"] == N // PER_SHARD


def test_state_persisted_and_spills_removed_after_success(first_run):
    out, manifest = first_run
    state = out / "_clipcurate" / "state" / "02_dedup.json"
    assert state.is_file()
    assert "dedup" in manifest["fit_seconds"], "the first run fits dedup"
    spill = out / "_clipcurate" / "spill"
    assert not spill.exists() or not any(spill.rglob("*.parquet")), (
        "spills are removed after a successful run"
    )


def test_resume_reuses_the_state_and_rebuilds_a_missing_spill(first_run, workflow):
    from pipeline import ray as executor

    out, _ = first_run
    before = _rows(out)
    state = out / "_clipcurate" / "state" / "02_dedup.json"
    state_mtime, state_bytes = state.stat().st_mtime_ns, state.read_bytes()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("0000[013]*")}
    for p in out.glob("00002*"):  # shard 2 incomplete, as after a kill; its spill is gone too
        p.unlink()
    # keep_intermediate is not part of the config hash: the run resumes
    manifest = executor.run(_pipe(workflow, out, "keep_intermediate=true"))
    assert manifest["resumed"] is True
    assert state.stat().st_mtime_ns == state_mtime and state.read_bytes() == state_bytes, "state reused"
    assert "dedup" not in manifest["fit_seconds"], "no fit pass on resume"
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0000[013]*")} == kept, "complete shards kept"
    assert _rows(out) == before
    spills = sorted(
        p.relative_to(out / "_clipcurate" / "spill").as_posix() for p in out.rglob("spill/**/*.parquet")
    )
    assert spills == ["02/00002.parquet"], "the missing spill was rebuilt (only it) and kept"
    assert pq.read_table(out / "_clipcurate" / "spill" / spills[0]).num_rows == PER_SHARD


def test_overwrite_from_the_cli(ray_session, first_run, workflow):
    """After the resume test (any order works: both need only a finished output). The CLI joins the
    test session's Ray (``ray.address``) rather than starting one of its own."""
    import ray

    out, _ = first_run
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "pipeline", "run", str(workflow), "--output", str(out),
           "--set", "stages.basic_filter.min_words=1", "--set", "stages.basic_filter.min_chars=1",
           "--set", f"ray.address={address}"]  # fmt: skip
    old = json.loads((out / "manifest.json").read_text())["config_hash"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--overwrite" in lines[0], r.stderr
    assert json.loads((out / "manifest.json").read_text())["config_hash"] == old, "output untouched"
    r = subprocess.run([*cmd, "--overwrite"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config_hash"] != old
    assert manifest["status_counts"] == {"ok": 16, "duplicate": 4}  # "cat" passes min_words 1; 16 repeats 0


FORWARD = {
    "FSSPEC_T21": "fsspec",
    "HF_T21": "hf",
    "GOOGLE_APPLICATION_T21": "gcs",
    "OTHER_T21": "not forwarded",
}


def test_the_driver_forwards_its_variables_to_the_workers(ray_session, workflow, tmp_path):
    """A driver process joins the session's Ray (started by this test process, which lacks these
    variables) with ``init_ray`` and asks a worker task for them."""
    import ray

    assert not set(FORWARD) & set(os.environ)
    address = ray.get_runtime_context().gcs_address
    code = f"""
import os, ray, yaml
from pipeline import config
from pipeline.ray.session import init_ray
pipe = config.from_dict(yaml.safe_load(open({str(workflow)!r})), source={str(workflow)!r},
                        overrides=["ray.address={address}"], output={str(tmp_path / "o")!r})
init_ray(pipe, quiet=True)
names = {sorted(FORWARD)!r}
print("SEEN", ray.get(ray.remote(lambda: {{k: os.environ.get(k) for k in names}}).remote()))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, **FORWARD}, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    [line] = [ln for ln in r.stdout.splitlines() if ln.startswith("SEEN ")]
    seen = eval(line[5:])  # noqa: S307 - our own dict literal
    assert seen == {**{k: v for k, v in FORWARD.items() if k != "OTHER_T21"}, "OTHER_T21": None}
