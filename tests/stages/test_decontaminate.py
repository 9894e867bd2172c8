"""``decontaminate`` (issue 13, acceptance 4): pool rows within the cosine threshold of a small eval set drawn
from the demo world are removed, and nothing else, against an independent numpy brute force.

Real parts: the shapes world with near-copies downloaded and scored by the dedup workflow's toy CLIP
(``copies_pool``), faiss, the same toy CLIP loaded by open_clip for the eval images.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.base import StageFailed
from stages.decontaminate import Decontaminate
from tests.conftest import DEDUP_CLIP, REPO

THRESHOLD = 0.996  # workflows/dedup.yaml
TOY = f"local-dir:{REPO / DEDUP_CLIP}"  # the model copies_pool embeds with (workflows/dedup.yaml)


def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def eval_rows(pool: pa.Table) -> pa.Table:
    """Every 40th original of the pool (13 images), as an eval set would hold them."""
    originals = [i for i, k in enumerate(pool.column("copy_kind").to_pylist()) if k is None][::40]
    t = pool.take(pa.array(originals, pa.int64()))
    return pa.table({"key": [f"eval-{k}" for k in t.column("key").to_pylist()], "image": t.column("image"),
                     "image_embedding": t.column("image_embedding")})  # fmt: skip


def oracle(pool: pa.Table, eval_emb: np.ndarray, threshold: float) -> tuple[set[str], np.ndarray]:
    """Keys of the pool rows whose best cosine to an eval embedding is >= threshold; and every best cosine."""
    best = (unit(pool.column("image_embedding").to_pylist()) @ unit(eval_emb).T).max(1)
    keys = pool.column("key").to_pylist()
    return {k for k, b in zip(keys, best) if b >= threshold}, best


def removed(stage: Decontaminate, pool: pa.Table) -> dict[str, tuple[str, str, str]]:
    out = stage(pool)
    cols = (out.column(c).to_pylist() for c in ("key", "status", "reason", "rule"))
    return {k: (s, r, ru) for k, s, r, ru in zip(*cols) if s != "ok"}


def test_parquet_of_embeddings_removes_exactly_the_rows_within_the_threshold(copies_pool, tmp_path):
    ev = eval_rows(copies_pool)
    pq.write_table(ev.select(["key", "image_embedding"]), tmp_path / "eval.parquet")
    want, best = oracle(copies_pool, ev.column("image_embedding").to_pylist(), THRESHOLD)
    assert not np.any(np.abs(best - THRESHOLD) < 1e-5), "no row sits on the threshold (float rounding)"
    got = removed(
        Decontaminate({"eval_path": str(tmp_path / "eval.parquet"), "min_similarity": THRESHOLD}), copies_pool
    )
    assert set(got) == want
    assert len(want) > ev.num_rows, "the eval images' own rows and some neighbours"
    assert {s for s, _, _ in got.values()} == {"contaminated"}
    assert {ru for _, _, ru in got.values()} == {"contaminated:eval"}
    eval_ids = set(ev.column("key").to_pylist())
    for _, reason, _ in got.values():
        assert reason.split()[-1] in eval_ids and reason.startswith("decontaminate: cosine ")
    for k in ev.column("key").to_pylist():  # each eval image's own pool row names it
        assert got[k.removeprefix("eval-")][1].endswith(k)


def test_eval_images_are_embedded_with_the_model(copies_pool, tmp_path):
    """Eval images (a Parquet of bytes, or a folder of files) embedded by the toy CLIP in fp32: the rows
    removed equal the brute force on the pool's embeddings, away from the threshold (the pool's are fp16)."""
    ev = eval_rows(copies_pool)
    pq.write_table(ev.select(["key", "image"]), tmp_path / "eval.parquet")
    folder = tmp_path / "eval"
    folder.mkdir()
    for k, b in zip(ev.column("key").to_pylist(), ev.column("image").to_pylist()):
        (folder / f"{k}.jpg").write_bytes(b)
    want, best = oracle(copies_pool, ev.column("image_embedding").to_pylist(), THRESHOLD)
    near = {k for k, b in zip(copies_pool.column("key").to_pylist(), best) if abs(b - THRESHOLD) < 2e-3}
    for path in (tmp_path / "eval.parquet", folder):
        got = removed(
            Decontaminate({"eval_path": str(path), "min_similarity": THRESHOLD, "model": TOY}), copies_pool
        )
        assert set(got) - near == want - near, path
    assert len(want - near) >= ev.num_rows, "at least the eval images' own rows are judged"


def test_a_bad_eval_set_fails_the_run_not_the_rows(copies_pool, tmp_path):
    pq.write_table(pa.table({"id": ["a"], "image_embedding": [[1.0, 0.0]]}), tmp_path / "e.parquet")
    with pytest.raises(StageFailed, match="no id column 'key'"):
        Decontaminate({"eval_path": str(tmp_path / "e.parquet")})(copies_pool.slice(0, 4))
    with pytest.raises(StageFailed, match="eval embeddings have 2 dims, the pool's 64"):
        Decontaminate({"eval_path": str(tmp_path / "e.parquet"), "id_column": "id"})(copies_pool.slice(0, 4))


def test_eval_images_are_resized_as_the_pool_was_downloaded(tmp_path):
    """``image_size`` and the other download settings: raw (some non-square) shapes images as the eval set, and their pool copies as
    the download stage stores them (img2dataset's resizer, 64 px, ``border``, JPEG q90). Resized first, each eval
    image finds its own pool row at cosine >= the workflow's threshold; embedded as it is (centre-cropped by the
    model's transform, never JPEG-compressed) the cosines drop, below the threshold for some."""
    from img2dataset.resizer import Resizer

    from demo.world import generate

    raw = [p.data for p in generate(16, seed=5, mismatch_rate=0.0) if p.broken is None][:12]
    sizes = []
    for b in raw:
        with Image.open(io.BytesIO(b)) as im:
            sizes.append(im.size)
    assert any(w != h for w, h in sizes), "some eval images are not square"
    rz = Resizer(64, "border", False, encode_format="jpg", encode_quality=90)
    stored = [rz(io.BytesIO(b))[0] for b in raw]
    keys = [f"{i:04d}" for i in range(len(raw))]
    pool_emb = Decontaminate({"eval_path": str(tmp_path), "model": TOY})._embed(stored)
    pool = pa.table({"key": keys, "status": ["ok"] * len(keys), "reason": pa.nulls(len(keys), pa.string()),
                     "rule": pa.nulls(len(keys), pa.string()),
                     "image_embedding": pa.array(pool_emb.tolist(), pa.list_(pa.float32()))})  # fmt: skip
    pq.write_table(pa.table({"key": [f"eval-{k}" for k in keys], "image": raw}), tmp_path / "eval.parquet")
    cfg = {"eval_path": str(tmp_path / "eval.parquet"), "min_similarity": THRESHOLD, "model": TOY}
    as_download = {"image_size": 64, "resize_mode": "border", "encode_format": "jpg", "encode_quality": 90}
    got = removed(Decontaminate({**cfg, **as_download}), pool)
    assert set(got) == set(keys), "every pool copy of an eval image is found"
    for k, (status, reason, _) in got.items():
        assert status == "contaminated" and reason.endswith(f"eval-{k}")
    as_is = Decontaminate(cfg)._embed(raw)
    resized = Decontaminate({**cfg, **as_download})._embed(raw)
    cos_as_is, cos_resized = (np.sum(e * pool_emb, axis=1) for e in (as_is, resized))
    assert cos_resized.min() >= THRESHOLD and cos_as_is.min() < cos_resized.min()
    assert len(removed(Decontaminate(cfg), pool)) < len(keys)
