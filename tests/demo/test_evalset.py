"""The demo's held-out evaluation sets (``demo/evalset.py``) are never part of the curated pool: their
keys and image hashes are disjoint from the demo world's files and from the demo run's output tars."""

from __future__ import annotations

import hashlib

import fsspec
import pyarrow.parquet as pq

from demo.evalset import CAPTIONS_NAME, CLASSES_NAME, class_names, make_evalset
from tests.conftest import tar_samples


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_evalset_is_disjoint_from_the_demo_pool(demo_evalset, demo_world, demo_run):
    out, _ = demo_run
    classes = pq.read_table(demo_evalset / CLASSES_NAME).to_pydict()
    captions = pq.read_table(demo_evalset / CAPTIONS_NAME).to_pydict()
    assert sorted(set(classes["label"])) == sorted(class_names()) and len(class_names()) == 80
    eval_keys = set(classes["key"]) | set(captions["key"])
    eval_hashes = {_sha(b) for b in classes["image"] + captions["image"]}
    assert len(eval_hashes) == len(classes["image"]) + len(captions["image"])  # no image twice

    fs = fsspec.filesystem("file")
    images, _ = tar_samples(fs, fs.glob(f"{out}/*.tar"))
    world_files = [p.read_bytes() for p in (demo_world / "files").iterdir()]
    assert images and world_files
    assert eval_keys.isdisjoint(images)  # the pool's keys (the tars')
    assert eval_hashes.isdisjoint({_sha(b) for b in images.values()})  # as curated (resized)
    assert eval_hashes.isdisjoint({_sha(b) for b in world_files})  # as served


def test_evalset_is_deterministic(tmp_path):
    a = make_evalset(tmp_path / "a", per_class=1, n_captions=3, seed=5)
    b = make_evalset(tmp_path / "b", per_class=1, n_captions=3, seed=5)
    for name in (CLASSES_NAME, CAPTIONS_NAME):
        assert pq.read_table(a / name).equals(pq.read_table(b / name))
    caps = pq.read_table(a / CAPTIONS_NAME).column("caption").to_pylist()
    assert all(c.strip() for c in caps)
