"""Object storage and a two-node Ray cluster (issue #9, acceptance 1).

**S3.** moto's server mode, started on 127.0.0.1 by the ``s3`` fixture, stands in for S3: it speaks
the S3 HTTP API, and s3fs/botocore talk to it exactly as to AWS. Credentials and the endpoint come
from the environment only (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``);
the YAML names nothing but ``s3://`` paths. The demo URL list is uploaded to
``s3://clipcurate/urls.parquet`` and the pipeline writes to ``s3://clipcurate/...``.

* ``test_s3_run_equals_local`` (main suite): ``python -m pipeline run workflows/demo.yaml`` reading
  and writing S3, on a local Ray, gives the same output as the session's local-disk demo run: same
  keys, same status per key, same image bytes and captions per key, same manifest totals.
* ``test_two_node_cluster_on_s3`` (``make test-cluster`` only: it starts its own cluster and takes a
  few minutes): a real two-node cluster on this machine (``ray start --head --num-cpus=1`` plus a
  second ``ray start --address ... --num-cpus=1 --resources={"node2": 1}``), the CLI run as a driver
  with ``RAY_ADDRESS`` from an empty working directory, input and output on S3, and the same
  comparison. The nodes are started *without* the AWS variables, so the run also shows that the
  executor forwards them to the workers. The cluster's GCS actor table shows pipeline actors on both
  nodes. The model folder (``local-dir:demo/assets/toy_clip``) is read by the workers from their own
  disk: the nodes run in the repo, as a cluster image with the project at the same path would.

The cluster runs with token authentication (a fresh token in a temp file) and its own
``--temp-dir``, so other Ray programs on the machine never attach to it. It is stopped by signalling
the two ``ray start --block`` processes this test started; ``ray stop`` is not used, because it would
kill every Ray on the machine, including the test session's own.
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
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from tests.conftest import RAY_CLI, free_port, moto_s3, tar_samples

REPO = Path(__file__).resolve().parents[2]
BUCKET = "clipcurate"
CLUSTER_ENV = "CLIPCURATE_CLUSTER_TESTS"  # "1": run the two-node test (make test-cluster)
PIPELINE_ACTOR = "MapWorker(MapBatches("  # Ray Data's name for a stage's actor: MapWorker(MapBatches(<stage>))


@pytest.fixture(scope="module")
def s3(demo_urls):
    """An S3-compatible server on 127.0.0.1 (moto, standing in for S3) with the demo URL list
    uploaded. Yields (environment for the pipeline's processes, a filesystem for this test)."""
    with moto_s3() as env:
        fs = fsspec.filesystem(
            "s3",
            key=env["AWS_ACCESS_KEY_ID"],
            secret=env["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=env["AWS_ENDPOINT_URL"],
            use_listings_cache=False,
            skip_instance_cache=True,
        )
        fs.mkdir(BUCKET)
        fs.put(str(demo_urls), f"{BUCKET}/urls.parquet")
        yield env, fs


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run_cli(output: str, env: dict[str, str], cwd: Path, timeout: int = 600) -> None:
    cmd = [
        sys.executable, "-m", "pipeline", "run", str(REPO / "workflows" / "demo.yaml"),
        "--output", output, "--set", f"stages.read.path=s3://{BUCKET}/urls.parquet",
        "--set", "ray.show_progress=false",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-4000:]


def snapshot(fs, root: str) -> dict:
    """Everything a run's output says about its rows: status per key, image bytes and caption per
    key (from the tars), and the manifest's totals."""
    root = root.rstrip("/")
    status: dict[str, str] = {}
    reasons: dict[str, str | None] = {}
    for p in sorted(fs.glob(f"{root}/*.parquet")):
        with fs.open(p, "rb") as f:
            t = pq.read_table(f, columns=["key", "status", "reason"])
        keys = t.column("key").to_pylist()
        status.update(zip(keys, t.column("status").to_pylist()))
        reasons.update(zip(keys, t.column("reason").to_pylist()))
    tars = sorted(fs.glob(f"{root}/*.tar"))
    images, captions = tar_samples(fs, tars)
    with fs.open(f"{root}/manifest.json", "rb") as f:
        m = json.loads(f.read())
    totals = {
        k: m[k]
        for k in ("total_rows", "total_samples", "input_rows", "status_counts", "stage_status", "rule_counts")
    }
    totals["shards"] = [(s["name"], s["count"], s["successes"]) for s in m["shards"]]
    return {"status": status, "reasons": reasons, "images": images, "captions": captions, "totals": totals,
            "tars": len(tars)}  # fmt: skip


def _assert_same(got: dict, want: dict) -> None:
    assert got["totals"]["total_rows"] == want["totals"]["total_rows"] > 0
    keys = want["status"].keys() | got["status"].keys()
    diff = [
        (k, [want["status"].get(k), want["reasons"].get(k)], [got["status"].get(k), got["reasons"].get(k)])
        for k in sorted(keys)
        if want["status"].get(k) != got["status"].get(k)
    ]
    assert not diff, f"same keys with the same status; (key, local, this run) differ: {diff[:10]}"
    assert got["images"].keys() == {k for k, s in got["status"].items() if s == "ok"}
    assert got["images"] == want["images"], "same image bytes per key"
    assert got["captions"] == want["captions"]
    assert got["totals"] == want["totals"], "same manifest totals"
    assert got["tars"] == want["tars"] == len(want["totals"]["shards"])


@pytest.fixture(scope="module")
def local_snapshot(demo_run):
    out, _ = demo_run
    return snapshot(fsspec.filesystem("file"), str(out))


def test_s3_run_equals_local(s3, local_snapshot, tmp_path):
    env, fs = s3
    _run_cli(f"s3://{BUCKET}/single", _child_env(env), cwd=REPO)
    got = snapshot(fs, f"{BUCKET}/single")
    _assert_same(got, local_snapshot)
    assert fs.exists(f"{BUCKET}/single/report.html"), "the report is written next to the shards"
    assert not [p for p in fs.find(f"{BUCKET}/single") if ".tmp-" in p], "no temporary objects left"


# ---- two-node cluster ---------------------------------------------------------------------------


def _start_node(args: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - the child holds it; closed when the node is stopped
    try:
        return subprocess.Popen(
            [str(RAY_CLI), "start", "--block", "--disable-usage-stats", *args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    finally:
        log.close()


def _cluster_query(address: str, env: dict, code: str) -> str:
    """Run ``code`` (Python, prints one JSON line) as a Ray client of the cluster."""
    prog = f"import json, ray\nray.init(address={address!r}, log_to_driver=False)\n{code}"
    r = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


NODES_CODE = "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))"
# Pipeline actors per node, from the GCS actor table (dead actors of finished jobs stay listed).
ACTORS_CODE = f"""
from ray._private.state import actors
node2 = {{n['NodeID'] for n in ray.nodes() if 'node2' in n['Resources']}}
count = {{'head': 0, 'node2': 0}}
for a in actors().values():
    if a['ActorClassName'].startswith({PIPELINE_ACTOR!r}):
        count['node2' if a['Address']['NodeID'] in node2 else 'head'] += 1
print(json.dumps(count))
"""


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head node and a second node (1 CPU each) on 127.0.0.1: (GCS address, client env)."""
    logs = tmp_path_factory.mktemp("two_nodes")
    token = logs / "auth_token"
    token.write_text(secrets.token_hex(32))
    temp_dir = tempfile.mkdtemp(prefix="ccr2n", dir="/tmp")  # unix socket paths must stay short
    env = _child_env(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
        }
    )
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", f"--temp-dir={temp_dir}"]
    procs = []
    try:
        procs.append(
            _start_node(
                ["--head", f"--port={port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", *common],
                env, logs / "head.log",
            )
        )  # fmt: skip
        _wait_nodes(address, env, 1, procs, logs)
        procs.append(
            _start_node(
                [f"--address={address}", '--resources={"node2": 1}', f"--dashboard-agent-listen-port={free_port()}",
                 *common],
                env, logs / "node2.log",
            )
        )  # fmt: skip
        nodes = _wait_nodes(address, env, 2, procs, logs)
        assert sorted(n.get("node2", 0) for n in nodes) == [0, 1] and all(n["CPU"] == 1 for n in nodes)
        yield address, env
    finally:
        for p in reversed(procs):  # `ray start --block` stops the processes it started on SIGTERM
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # the process group this fixture created
                p.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_nodes(address: str, env: dict, n: int, procs, logs: Path) -> list[dict]:
    for _ in range(60):
        for p in procs:
            if p.poll() is not None:
                text = "\n".join(f.read_text()[-3000:] for f in sorted(logs.glob("*.log")))
                pytest.fail(f"ray start exited with {p.returncode}:\n{text}")
        try:
            nodes = json.loads(_cluster_query(address, env, NODES_CODE))
        except AssertionError:
            nodes = []
        if len(nodes) >= n:
            return nodes
        time.sleep(2)
    pytest.fail(f"the cluster at {address} did not reach {n} nodes")


@pytest.mark.skipif(
    os.environ.get(CLUSTER_ENV) != "1",
    reason=f"starts a two-node Ray cluster: run `make test-cluster` ({CLUSTER_ENV}=1)",
)
@pytest.mark.skipif(not RAY_CLI.exists(), reason=f"the ray CLI is missing ({RAY_CLI})")
def test_two_node_cluster_on_s3(two_nodes, s3, local_snapshot, tmp_path):
    address, cluster_env = two_nodes
    s3_env, fs = s3
    driver_cwd = tmp_path / "driver"  # nothing on the driver's disk but the workflow file it is given
    driver_cwd.mkdir()
    _run_cli(f"s3://{BUCKET}/cluster", {**cluster_env, **s3_env, "RAY_ADDRESS": address}, cwd=driver_cwd)
    assert not any(driver_cwd.iterdir()), "the driver wrote nothing to its local disk"
    _assert_same(snapshot(fs, f"{BUCKET}/cluster"), local_snapshot)
    placed = json.loads(_cluster_query(address, cluster_env, ACTORS_CODE))
    assert placed["head"] >= 1 and placed["node2"] >= 1, f"pipeline actors on both nodes: {placed}"
