"""The stage-agnostic core: a stage defined outside the project runs with no edit in pipeline/;
operators are named after their stages; errors that are not a row's fail the run (one line, non-zero
exit) and a rerun after the fix resumes; row errors under ``max_error_fraction`` do not."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO


def _url_list(path: Path, n: int) -> Path:
    caps = [f"a {'red' if i % 3 else 'tiny'} square number {i}" if i % 5 else "sq" for i in range(n)]
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)], "caption": caps}), path)
    return path


def _workflow(tmp_path: Path, urls: Path, middle: list[dict], per_shard: int = 25) -> Path:
    wf = {
        "name": "contract",
        "samples_per_shard": per_shard,
        "ray": {"num_cpus": 2, "show_progress": False},
        "stages": [{"read": {"path": str(urls)}}, *middle, {"write": {}}],
    }
    p = tmp_path / "wf.yaml"
    p.write_text(yaml.safe_dump(wf, sort_keys=False))
    return p


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "CLIPCURATE_TEST_BROKEN"}
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=600
    )


def test_a_new_stage_needs_no_edit_in_pipeline(ray_session, tmp_path):
    """``tests.plugins:CaptionLength`` is named by import path in the workflow; the planner checks its
    declared columns, the executor runs it on Ray, and its column reaches the Parquet."""
    from pipeline import config, plan
    from pipeline import ray as executor

    urls = _url_list(tmp_path / "urls.parquet", 60)
    wf = _workflow(tmp_path, urls, [{"tests.plugins:CaptionLength": {"min_chars": 3}}])
    pipe = config.load(wf, output=str(tmp_path / "out"))
    steps = plan.check(pipe)
    assert [s.name for s in steps][1] == "tests.plugins:CaptionLength" and "caption_chars" in steps[1].produces
    m = executor.run(pipe)
    rows = [r for p in sorted((tmp_path / "out").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert m["total_rows"] == len(rows) == 60
    short = [r for r in rows if r["caption"] == "sq"]
    assert len(short) == 12 and all(r["status"] == "filtered_basic" and r["rejected_by"] == "caption_length" for r in short)
    assert all(r["caption_chars"] == len(r["caption"]) for r in rows)
    assert m["stage_status"]["caption_length"] == {"filtered_basic": 12}


def test_operators_are_named_after_their_stages(ray_session, demo_urls, tmp_path):
    """What Ray Data's progress display and dashboard show: ``MapBatches(<stage>)``, not a wrapper."""
    from pipeline.ray import Executor
    from tests.conftest import demo_pipeline

    ex = Executor(demo_pipeline(demo_urls, tmp_path / "out"))
    ds = ex.dataset(ex.prepare())
    text = str(ds) + "\n" + ds._logical_plan.dag.dag_str
    for name in ("read", "download", "clip_score", "rewrite"):
        assert f"MapBatches({name})" in text, text
    assert "StageActor" not in text and "_task_fn" not in text


@pytest.mark.integration
def test_a_stage_that_raises_on_every_row_fails_the_run_and_a_rerun_resumes(tmp_path):
    """Every row of the last shard raises while CLIPCURATE_TEST_BROKEN is set: the run exits 1 with one
    line naming the stage and the error. Unset (the fix), the same command resumes: shards completed
    before the failure are kept as they were, and the output equals a clean run's."""
    urls = _url_list(tmp_path / "urls.parquet", 400)
    wf = _workflow(tmp_path, urls, [{"tests.plugins:Broken": {"fail_shard_prefix": "00015"}}])
    out = tmp_path / "out"
    r = _cli(["run", str(wf), "--output", str(out), "--no-report"], env={"CLIPCURATE_TEST_BROKEN": "1"})
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "stage broken:" in errors[0] and "KeyError" in errors[0] and "caption_en" in errors[0]
    assert "Traceback" not in errors[0]
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    assert "00015_stats.json" not in done and not (out / "manifest.json").exists()
    r2 = _cli(["run", str(wf), "--output", str(out), "--no-report"])
    assert r2.returncode == 0, r2.stderr[-3000:]
    # a normal run logs no Ray error-level line (e.g. ray#53727's warning on actor constructor arguments)
    ray_errors = [ln for ln in r2.stderr.splitlines() if re.match(r"^\[[^\]]* E \d+ \d+\]", ln) or " ERROR " in ln]
    assert ray_errors == [], ray_errors
    m = json.loads((out / "manifest.json").read_text())
    assert m["resumed"] is True and m["total_rows"] == 400 and m["status_counts"] == {"ok": 400}
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done, "shards completed before are kept"


@pytest.mark.integration
def test_row_errors_under_the_limit_finish_with_exit_0_and_are_in_the_manifest(tmp_path):
    urls = _url_list(tmp_path / "urls.parquet", 100)
    wf = _workflow(tmp_path, urls, [{"tests.plugins:Broken": {"fail_every": 20, "max_error_fraction": 0.1}}],
                   per_shard=50)  # fmt: skip
    out = tmp_path / "out"
    r = _cli(["run", str(wf), "--output", str(out), "--no-report"], env={"CLIPCURATE_TEST_BROKEN": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status_counts"] == {"ok": 94, "stage_error": 6}  # keys 0000000, 0000020, 0000040, 0000100, ...
    assert m["stage_errors"]["broken"] == {"reached": 100, "stage_error": 6, "fraction": 0.06}
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    bad = [r for r in rows if r["status"] == "stage_error"]
    assert len(bad) == 6 and all(r["reason"].startswith("broken: KeyError") for r in bad)


# ---- without Ray ---------------------------------------------------------------------------------


def test_error_fraction_over_the_limit_fails():
    from pipeline.manifest import check_error_fractions, stage_errors
    from stages.base import StageFailed

    data = {"stage_errors": stage_errors(["a", "b"], {"a": {"filtered_basic": 50}, "b": {"stage_error": 6}}, 100)}
    assert data["stage_errors"]["b"] == {"reached": 50, "stage_error": 6, "fraction": 0.12}
    check_error_fractions(data, {"a": 0.1, "b": 0.2})
    with pytest.raises(StageFailed) as e:
        check_error_fractions(data, {"a": 0.1, "b": 0.1})
    assert str(e.value).startswith("stage b: 6 of 50 rows (12.0%) ended in stage_error")


def test_every_row_raising_is_the_stages_failure_not_the_rows(monkeypatch):
    from stages.base import StageFailed
    from tests.plugins import Broken

    monkeypatch.setenv("CLIPCURATE_TEST_BROKEN", "1")
    t = pa.table({"key": ["000", "001", "002"], "caption": ["a", "b", "c"], "status": ["ok"] * 3})
    with pytest.raises(StageFailed, match="every row of a batch of 3 raised: KeyError"):
        Broken()(t)
    out = Broken({"fail_every": 2})(t)  # one row in two: those rows fail, the others pass
    assert out.column("status").to_pylist() == ["stage_error", "ok", "stage_error"]


def test_setup_failure_is_a_stage_failure():
    from stages.base import Stage, StageFailed

    class NoModel(Stage):
        name = "no_model"

        def setup(self):
            raise FileNotFoundError("weights.safetensors")

        def process(self, t):
            return t

    with pytest.raises(StageFailed, match="stage no_model: setup failed: FileNotFoundError"):
        NoModel()(pa.table({"key": ["0"], "status": ["ok"]}))


def test_raising_max_error_fraction_resumes_the_same_run():
    """The limit decides whether a run passes, not what a row becomes: it is not part of the config
    hash, so the rerun that the failure message suggests (``--set ...max_error_fraction=...``) resumes."""
    from pipeline import config

    wf = REPO / "workflows" / "demo.yaml"
    base = config.load(wf).config_hash()
    assert config.load(wf, overrides=["stages.clip_score.max_error_fraction=0.5"]).config_hash() == base
    assert config.load(wf, overrides=["stages.clip_score.min_score=0.5"]).config_hash() != base
