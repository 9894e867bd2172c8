"""``validate``, ``plan`` and ``run --dry-run`` as a user types them (issue #21; README "Using it"):
``python -m pipeline ...`` in a subprocess, on a small local workflow (read -> basic_filter -> dedup
-> write). Exit codes, the lines printed, and that nothing is written and no Ray is started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO, filter_dedup_workflow


def cli(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def workflow(tmp_path) -> Path:
    pq.write_table(
        pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a red bus"]}), tmp_path / "pool.parquet"
    )
    path = tmp_path / "w.yaml"
    pool = str(tmp_path / "pool.parquet")
    path.write_text(yaml.safe_dump(filter_dedup_workflow(pool, samples_per_shard=5, ray={"num_cpus": 2})))
    return path


def test_validate(workflow):
    r = cli("validate", str(workflow))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{workflow}: ok (4 stages: read -> basic_filter -> dedup -> write)"
    assert "Ray" not in r.stdout + r.stderr


def test_validate_refuses_a_bad_key_in_one_line(workflow):
    raw = yaml.safe_load(workflow.read_text())
    raw["stages"][1]["basic_filter"]["min_wrds"] = 3
    workflow.write_text(yaml.safe_dump(raw))
    r = cli("validate", str(workflow))
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {workflow}: ") and "basic_filter" in line and "min_wrds" in line, line
    assert r.stdout == ""


def test_validate_refuses_a_missing_input(workflow, tmp_path):
    (tmp_path / "pool.parquet").unlink()
    r = cli("validate", str(workflow))
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert "stages[0] (read)" in line and "key 'path'" in line and "no such file" in line, line


def _plan_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines()]


def test_plan_and_dry_run_print_the_plan_and_write_nothing(workflow, tmp_path):
    plan = cli("plan", str(workflow))
    assert plan.returncode == 0, plan.stderr
    lines = _plan_lines(plan.stdout)
    assert lines[0] == f"pipeline 'pipeline' from {workflow}"
    assert "output: (set with --output)" in lines
    steps = [ln.split()[:2] for ln in lines if ln[:2] in ("0.", "1.", "2.", "3.")]
    assert steps == [["0.", "read"], ["1.", "basic_filter"], ["2.", "dedup"], ["3.", "write"]]
    assert any(
        ln.startswith("2. dedup") and "[global: fit pass over the whole pool first]" in ln for ln in lines
    )
    assert "requires: caption" in lines and "produces: language" in lines
    assert "local Ray (2 CPUs, 0 GPUs): holds them" in lines
    assert not any(ln.startswith("WARNING") for ln in lines)

    out = tmp_path / "out"
    dry = cli("run", str(workflow), "--output", str(out), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"output: {out}" in _plan_lines(dry.stdout)
    # README: `plan` is the same as `run --dry-run` (but for the output line)
    assert [ln for ln in _plan_lines(dry.stdout) if not ln.startswith("output:")] == [
        ln for ln in lines if not ln.startswith("output:")
    ]
    assert not out.exists(), "a dry run writes nothing"
    assert "Started a local Ray" not in dry.stdout + dry.stderr


def test_dry_run_refuses_a_bad_set_value(workflow, tmp_path):
    r = cli(
        "run", str(workflow), "--output", str(tmp_path / "out"), "--dry-run", "--set", "samples_per_shard=["
    )
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and "samples_per_shard" in line, line
    assert not (tmp_path / "out").exists()
