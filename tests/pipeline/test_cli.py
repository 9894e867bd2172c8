"""The command line (pipeline/cli.py) in this process, with no Ray started: ``--version``, plain ``--help``
text with examples, ``plan``'s resource totals (pipeline/capacity.py), ``validate`` checking the files a
workflow names, the output rules for Ray Jobs, and where ``submit`` finds a token (pipeline/ray/jobs.py;
the submissions themselves are in tests/pipeline/test_submit.py)."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import cli
from tests.conftest import REPO

COMMANDS = ["validate", "plan", "run", "report", "submit"]


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch):
    """A local Ray, no GPU, outside any Ray Job, from the repository root."""
    for var in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.chdir(REPO)


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse's --help and --version
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_version(capsys):
    rc, out, _ = _main(capsys, "--version")
    assert rc == 0
    assert out.strip() == f"clipcurate {version('clipcurate')}"


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in COMMANDS]])
def test_help_is_plain_text_with_examples(capsys, argv):
    rc, out, _ = _main(capsys, *argv)
    assert rc == 0
    assert "``" not in out, "no reStructuredText markup"
    assert "example" in out and "clipcurate " in out.split("example", 1)[1]


def test_plan_totals_the_resources(capsys):
    rc, out, _ = _main(capsys, "plan", "workflows/demo.yaml")
    assert rc == 0
    assert "None" not in out
    assert "download      actor pool of 1 (num_cpus=1, num_gpus=0 each)" in out
    assert "download -> clip_score -> rewrite: 3 actors, 2 CPUs, 0 GPUs" in out
    assert "at most: 2 CPUs, 0 GPUs, 3 actors at a time" in out
    assert "local Ray (2 CPUs, 0 GPUs): holds them" in out


def test_plan_warns_when_a_local_ray_cannot_hold_the_pools(capsys, monkeypatch):
    rc, out, _ = _main(capsys, "plan", "workflows/full.yaml", "--set", "ray.num_cpus=8")
    assert rc == 0
    # balance | download + basic_filter | dedup, clip_score (4 GPU actors) | clip_filter, rewrite (4 replicas)
    assert "dedup -> clip_score: 4 actors, 5 CPUs, 4 GPUs, 1 CPU kept free for task stages" in out
    assert "at most: 5 CPUs, 4 GPUs, 4 actors at a time" in out
    warning = [ln for ln in out.splitlines() if "WARNING" in ln]
    assert len(warning) == 1 and "local Ray (8 CPUs, 0 GPUs) cannot hold" in warning[0]
    assert "clip_score 4x1 CPU+1 GPU" in warning[0] and "--set stages.clip_score.concurrency=1" in warning[0]
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    rc, out, _ = _main(capsys, "plan", "workflows/full.yaml")
    assert (
        "WARNING" not in out
        and "cluster ray://head:10001: checked against these totals when the run starts" in out
    )


def _workflow(tmp_path: Path, *middle: dict) -> Path:
    wf = tmp_path / "w.yaml"
    raw = {"name": "t", "stages": [{"read": {"path": "urls.parquet"}}, *middle, {"write": {}}]}
    wf.write_text(yaml.safe_dump(raw))
    return wf


def _one_line_error(rc: int, err: str, *parts: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for p in parts:
        assert p in lines[0]


def test_validate_checks_the_files_the_workflow_names(capsys, tmp_path):
    wf = _workflow(tmp_path, {"balance": {"metadata": "meta.json"}})
    rc, _, err = _main(capsys, "validate", str(wf))
    _one_line_error(rc, err, "stages[0] (read)", "key 'path'", "urls.parquet")
    pq.write_table(
        pa.table({"url": ["http://x/a.jpg"], "caption": ["a red circle"]}), tmp_path / "urls.parquet"
    )
    rc, _, err = _main(capsys, "validate", str(wf))
    _one_line_error(rc, err, "stages[1] (balance)", "key 'metadata'", "meta.json does not exist")
    (tmp_path / "meta.json").write_text('["red"]')
    rc, out, _ = _main(capsys, "validate", str(wf))
    assert rc == 0 and out.startswith(f"{wf}: ok (3 stages")
    wf = _workflow(tmp_path, {"download": {}}, {"clip_score": {"model": "local-dir:models/gone"}})
    rc, _, err = _main(capsys, "validate", str(wf))
    _one_line_error(rc, err, "stages[2] (clip_score)", "key 'model'", "local-dir:models/gone does not exist")


def test_a_relative_output_is_refused_in_a_ray_job_and_made_absolute_elsewhere(capsys, tmp_path, monkeypatch):
    from pipeline import config
    from pipeline.preflight import preflight

    wf = _workflow(tmp_path)
    pq.write_table(
        pa.table({"url": ["http://x/a.jpg"], "caption": ["a red circle"]}), tmp_path / "urls.parquet"
    )
    monkeypatch.chdir(tmp_path)
    pipe = config.load(wf, output="rel/out")
    preflight(pipe)
    assert pipe.config.output == str(tmp_path / "rel" / "out"), (
        "the manifest and summary name an absolute path"
    )
    # `clipcurate submit`: refused here, before contacting any cluster (nothing listens on that port)
    rc, _, err = _main(
        capsys, "submit", str(wf), "--address", "http://127.0.0.1:9", "--", "--output", "rel/out"
    )
    _one_line_error(rc, err, "output 'rel/out' is a relative path", "Ray's temporary copy of the working dir")
    rc, _, err = _main(capsys, "submit", str(wf), "--address", "http://127.0.0.1:9")
    _one_line_error(rc, err, "no output")
    # `pipeline run` inside a Ray Job (how Ray marks a job's driver): refused before Ray starts
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    rc, _, err = _main(capsys, "run", str(wf), "--output", "rel/out")
    _one_line_error(rc, err, "output 'rel/out' is a relative path")
    assert not (tmp_path / "rel").exists()


def test_submit_finds_the_token_where_ray_does(tmp_path, monkeypatch):
    from pipeline.ray.jobs import explain, find_token

    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    assert find_token() == str(tmp_path / ".ray" / "auth_token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert find_token() is None, "Ray reads only RAY_AUTH_TOKEN_PATH when it is set"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    assert find_token() == "$RAY_AUTH_TOKEN"
    # the Job API client's refusals, each in one line that says what to do
    from ray.exceptions import AuthenticationError

    missing = explain(
        AuthenticationError("Authentication required: Unauthorized: Missing token"), "http://h:8265", None
    )
    assert "uses token authentication and no token was found" in missing and "RAY_AUTH_TOKEN_PATH" in missing
    wrong = explain(
        AuthenticationError("Authentication failed: Forbidden: Invalid token"), "http://h:8265", "$X"
    )
    assert "refused the authentication token ($X)" in wrong and "ray get-auth-token" in wrong
    assert "\n" not in missing + wrong
    down = explain(
        ConnectionError("Failed to connect to Ray at address: http://h:8265.\nmore"), "http://h:8265", None
    )
    assert (
        down.startswith("cannot submit to the Ray cluster at http://h:8265: ConnectionError")
        and "\n" not in down
    )
