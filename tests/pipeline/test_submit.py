"""Submission to a Ray cluster (issue #8, acceptance 2; issue #19, acceptance 2): a real local cluster
started with ``ray start --head`` on 127.0.0.1 (dashboard and Job API included), the demo workflow
submitted with ``clipcurate submit`` and with plain ``ray job submit --working-dir .``; both jobs SUCCEED
and write the same output as a local run (same keys per status, same image bytes per key).

Token authentication, set up only as README.md ("Running on a Ray cluster") says: the head is started
as a user starts it, with a token where Ray looks for one (``RAY_AUTH_TOKEN_PATH``) and no
``RAY_AUTH_MODE``, which turns token authentication on (Ray >= 2.60). ``ray job submit`` gets
``RAY_AUTH_MODE=token`` and the token in ``RAY_AUTH_TOKEN``; ``clipcurate submit`` gets only the token
file and sets the mode itself. Without the token, or with another one, ``clipcurate submit`` fails in one
line, and ``ray job submit`` without ``RAY_AUTH_MODE=token`` is refused, as the README says.

The cluster shares this venv, so the jobs install nothing (``CLIPCURATE_SUBMIT_PIP=0``), and the
working dir is uploaded without ``.venv``/outputs/``.git`` (pyproject's runtime_env excludes and
``.rayignore``). Its ports come from the OS's ephemeral range (``free_port``), outside Ray's worker
ports (10002-19999), and it has its own ``--temp-dir``, so it never becomes the "current cluster" of
other Ray programs on the machine. It is stopped by signalling the ``ray start --block`` process this
test started (it stops the processes it launched); ``ray stop`` is not used because it kills every Ray
process of the machine, including the test session's own local Ray.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
import polars as pl
import pyarrow.parquet as pq
import pytest

from tests.conftest import RAY_CLI, demo_pipeline, free_port, tar_samples

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not RAY_CLI.exists(), reason=f"the ray CLI is missing ({RAY_CLI})")
WORLD_N = 60  # a small world: three shards of 20
# One rewrite per caption (time). A 30 s read timeout instead of the demo's 5 s: the demo server runs in this
# pytest process, on 2 cores shared with the cluster's job starting its workers; one clean-clone CI run saw
# 5 s read timeouts there (then the host breaker), which are the loaded machine's, not the code's. The
# statuses must still equal the local run's, key by key.
SETS = ["samples_per_shard=20", "ray.show_progress=false", "stages.rewrite.n_rewrites=1", "stages.download.timeout=30"]
RAY_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture(scope="module")
def small_urls(tmp_path_factory):
    from demo.run_demo import write_url_list
    from demo.server import serve
    from demo.world import make_world

    world = make_world(tmp_path_factory.mktemp("submit_world"), n=WORLD_N, seed=3)
    with serve(world) as base_url:
        yield write_url_list(world, base_url)


@dataclass
class Cluster:
    address: str  # the dashboard (Job API)
    token: str
    token_file: Path
    base_env: dict  # this venv first on PATH, no Ray address or auth variables (this process's Ray sets some)

    def env(self, **extra: str) -> dict:
        return {**self.base_env, **extra}

    @property
    def ray_cli_env(self) -> dict:
        """README: `export RAY_AUTH_MODE=token` and the token (here in RAY_AUTH_TOKEN) for `ray job submit`."""
        return self.env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real single-node cluster with token authentication on, started as README.md says."""
    logs = tmp_path_factory.mktemp("cluster")
    token = secrets.token_hex(32)
    token_file = logs / "auth_token"
    token_file.write_text(token)
    # Ray's unix socket paths live under --temp-dir and must stay short: use /tmp directly.
    temp_dir = tempfile.mkdtemp(prefix="ccray", dir="/tmp")
    base = {k: v for k, v in os.environ.items() if k not in RAY_VARS}
    base.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}",  # the jobs' `python` is this venv's
        RAY_USAGE_STATS_ENABLED="0",
        CLIPCURATE_SUBMIT_PIP="0",
    )
    dash = free_port()
    cmd = [
        str(RAY_CLI), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    log = open(logs / "ray_start.log", "wb")  # noqa: SIM115 - closed in the finally below
    head_env = {**base, "RAY_AUTH_TOKEN_PATH": str(token_file)}  # a token, no RAY_AUTH_MODE
    proc = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    c = Cluster(f"http://127.0.0.1:{dash}", token, token_file, base)
    try:
        _wait_ready(c.address, c.ray_cli_env, proc, logs / "ray_start.log")
        assert "Token authentication is enabled" in (logs / "ray_start.log").read_text()
        yield c
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=10)  # then the hard way: the cluster's processes are this test's session
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session (process group) this test created
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_ready(address: str, env: dict, proc: subprocess.Popen, log: Path) -> None:
    """Wait until the Job API answers (the cluster starts in seconds to a minute on a busy machine)."""
    check = [
        sys.executable,
        "-c",
        f"from ray.job_submission import JobSubmissionClient as C; C({address!r}).list_jobs()",
    ]
    for _ in range(120):
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if subprocess.run(check, env=env, capture_output=True, timeout=120).returncode == 0:
            return
        time.sleep(2)
    pytest.fail(f"the Ray dashboard at {address} did not come up:\n{log.read_text()[-4000:]}")


def _job_statuses(cluster: Cluster) -> dict[str, str]:
    code = (
        "import json; from ray.job_submission import JobSubmissionClient as C; "
        f"print(json.dumps({{j.submission_id: j.status.value for j in C({cluster.address!r}).list_jobs()}}))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=cluster.ray_cli_env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def snapshot(out: Path) -> tuple[dict[str, str], dict[str, bytes], dict[str, str]]:
    """(status per key, image bytes per key, caption per key) of an output folder."""
    df = pl.concat(
        [pl.from_arrow(pq.read_table(p)) for p in sorted(out.glob("*.parquet"))], how="diagonal_relaxed"
    )
    status = dict(zip(df["key"].to_list(), df["status"].to_list()))
    images, captions = tar_samples(fsspec.filesystem("file"), out.glob("*.tar"))
    return status, images, captions


@pytest.fixture(scope="module")
def local_out(ray_session, small_urls, tmp_path_factory):
    from pipeline import ray as executor

    out = tmp_path_factory.mktemp("submit_local") / "output"
    executor.run(demo_pipeline(small_urls, out, SETS))
    return snapshot(out)


def _same_as_local(out: Path, local) -> None:
    status, images, captions = snapshot(out)
    l_status, l_images, l_captions = local
    assert len(status) == WORLD_N
    assert status == l_status, "same keys with the same status"
    assert images.keys() == {k for k, s in status.items() if s == "ok"}
    assert images == l_images, "same image bytes per key"
    assert captions == l_captions
    assert len(list(out.glob("*.tar"))) == WORLD_N // 20
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_rows"] == WORLD_N
    assert (out / "report.html").exists(), "`pipeline run` builds the report at the end"


def test_clipcurate_submit(cluster, small_urls, local_out, tmp_path):
    """README: the token where Ray looks for it (here RAY_AUTH_TOKEN_PATH); no RAY_AUTH_MODE needed."""
    out = tmp_path / "submitted"
    env = cluster.env(RAY_AUTH_TOKEN_PATH=str(cluster.token_file))
    cmd = [sys.executable, "-m", "pipeline", "submit", "workflows/demo.yaml", "--address", cluster.address,
           "--working-dir", str(REPO), "--set", f"stages.read.path={small_urls}",
           "--", "--output", str(out), *[a for s in SETS for a in ("--set", s)]]  # fmt: skip
    before = _job_statuses(cluster)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-4000:]
    assert ": SUCCEEDED" in r.stdout
    assert "rows:" in r.stdout, "the job's logs (the run summary) are streamed back"
    assert f"output:   {out}" in r.stdout, "the summary names the output's absolute path"
    assert "logging_progress" not in r.stdout, "a job's log is not a terminal: no Ray Data progress blocks"
    new = {k: v for k, v in _job_statuses(cluster).items() if k not in before}
    assert list(new.values()) == ["SUCCEEDED"]
    _same_as_local(out, local_out)


def test_plain_ray_job_submit(cluster, small_urls, local_out, tmp_path):
    """README: `export RAY_AUTH_MODE=token` and the token (here RAY_AUTH_TOKEN) for `ray job submit`."""
    out = tmp_path / "ray_job_submit"
    cmd = [str(RAY_CLI), "job", "submit", "--address", cluster.address, "--working-dir", ".", "--",
           "python", "-m", "pipeline", "run", "workflows/demo.yaml", "--output", str(out),
           "--set", f"stages.read.path={small_urls}", *[a for s in SETS for a in ("--set", s)]]  # fmt: skip
    before = _job_statuses(cluster)
    r = subprocess.run(cmd, cwd=REPO, env=cluster.ray_cli_env, capture_output=True, text=True, timeout=800)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-4000:]
    new = {k: v for k, v in _job_statuses(cluster).items() if k not in before}
    assert list(new.values()) == ["SUCCEEDED"]
    _same_as_local(out, local_out)


def test_without_the_token_submit_fails_in_one_line(cluster, small_urls, tmp_path):
    """No token anywhere (an empty home, no RAY_AUTH_* variables), or another token: `clipcurate submit`
    ends in one line saying what to do, no traceback, and no job is created. `ray job submit` without
    RAY_AUTH_MODE=token is refused even with the token (what the README warns about)."""
    home = tmp_path / "home"
    home.mkdir()
    cmd = [sys.executable, "-m", "pipeline", "submit", "workflows/demo.yaml", "--address", cluster.address,
           "--set", f"stages.read.path={small_urls}", "--", "--output", str(tmp_path / "never")]  # fmt: skip
    before = _job_statuses(cluster)
    cases = {
        "uses token authentication and no token was found": cluster.env(HOME=str(home)),
        "refused the authentication token ($RAY_AUTH_TOKEN)": cluster.env(
            HOME=str(home), RAY_AUTH_TOKEN="0" * 64
        ),
    }
    for expected, env in cases.items():
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr
        assert "Traceback" not in r.stdout + r.stderr
    plain = [str(RAY_CLI), "job", "list", "--address", cluster.address]
    r = subprocess.run(
        plain, env=cluster.env(RAY_AUTH_TOKEN=cluster.token), capture_output=True, text=True, timeout=300
    )
    assert r.returncode != 0 and "Missing authentication token" in r.stdout + r.stderr
    assert _job_statuses(cluster) == before, "no job was created"


def test_runtime_env_from_pyproject(monkeypatch):
    """What `clipcurate submit` sends: pyproject's dependencies (minus the preinstalled ones) unless
    CLIPCURATE_SUBMIT_PIP=0, its excludes (the same as .rayignore), and its env vars."""
    import tomllib

    from packaging.requirements import Requirement

    from pipeline.cli import _runtime_env

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    table = data["tool"]["clipcurate"]["runtime_env"]
    monkeypatch.setenv("CLIPCURATE_SUBMIT_PIP", "1")
    env = _runtime_env(str(REPO))
    names = {Requirement(d).name for d in env["pip"]}
    assert "ray" not in names and "torch" not in names and "polars" in names
    assert len(env["pip"]) == len(data["project"]["dependencies"]) - len(
        [d for d in data["project"]["dependencies"] if Requirement(d).name in table["preinstalled"]]
    )
    rayignore = [ln.strip() for ln in (REPO / ".rayignore").read_text().splitlines()]
    assert env["excludes"] == [ln for ln in rayignore if ln and not ln.startswith("#")]
    assert {".venv/", ".git/", "demo_out/"} <= set(env["excludes"])
    assert env["env_vars"]["NO_ALBUMENTATIONS_UPDATE"] == "1"
    monkeypatch.setenv("CLIPCURATE_SUBMIT_PIP", "0")
    assert "pip" not in _runtime_env(str(REPO))


def test_working_dir_upload_is_small(tmp_path):
    """The package Ray uploads for `--working-dir .` (with .gitignore/.rayignore and our excludes)
    holds the code and the demo assets, and nothing from .venv, .git or outputs."""
    from ray._private.runtime_env.packaging import create_package

    from pipeline.cli import _runtime_env

    zip_path = tmp_path / "pkg.zip"
    create_package(str(REPO), zip_path, include_gitignore=True, excludes=_runtime_env(str(REPO))["excludes"])

    names = zipfile.ZipFile(zip_path).namelist()
    assert "pipeline/cli.py" in names and "workflows/demo.yaml" in names and "pyproject.toml" in names
    bad = [n for n in names if n.split("/")[0] in (".venv", ".git", "demo_out", "out") or "__pycache__" in n]
    assert bad == []
    assert zip_path.stat().st_size < 50 * 1024 * 1024


def test_submit_exits_non_zero_when_the_job_fails(cluster, tmp_path):
    """README: `submit` returns the job's outcome. A job whose run fails (here its input does not exist
    on the cluster: `clipcurate submit` leaves the input checks to the job) ends FAILED, and `clipcurate
    submit` says so and exits 1."""
    missing = tmp_path / "nowhere" / "pool.parquet"
    cmd = [sys.executable, "-m", "pipeline", "submit", "workflows/demo.yaml", "--address", cluster.address,
           "--working-dir", str(REPO), "--set", f"stages.read.path={missing}",
           "--", "--output", str(tmp_path / "out")]  # fmt: skip
    before = _job_statuses(cluster)
    env = cluster.env(RAY_AUTH_TOKEN_PATH=str(cluster.token_file))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].endswith(": FAILED")
    assert "no such file or folder" in r.stdout, "the job's one-line error is streamed back"
    new = {k: v for k, v in _job_statuses(cluster).items() if k not in before}
    assert list(new.values()) == ["FAILED"]
