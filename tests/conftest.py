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


def pytest_collection_modifyitems(config, items):
    """Tests that use the shared Ray session (directly or through the demo run) are integration tests;
    tests that start their own Ray (CLI subprocesses, clusters) carry the marker explicitly.
    ``make test-fast`` runs the rest: ``pytest -m "not integration"``."""
    ray_fixtures = {"ray_session", "cluster", "two_nodes", "s3"}
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
def demo_run(ray_session, demo_urls, tmp_path_factory):
    """The demo workflow run once on real local Ray: (output dir, manifest)."""
    from pipeline import ray as executor

    out = tmp_path_factory.mktemp("demo_out") / "output"
    manifest = executor.run(demo_pipeline(demo_urls, out))
    return out, manifest


@pytest.fixture(scope="session")
def demo_evalset(tmp_path_factory) -> Path:
    """Held-out evaluation sets of the shapes world (``demo/evalset.py``), small: 1 image per class
    (80 classes) and 40 captions."""
    from demo.evalset import make_evalset

    return make_evalset(tmp_path_factory.mktemp("evalset"), per_class=1, n_captions=40)
