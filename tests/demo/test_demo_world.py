"""The shapes world, its loopback server and the committed toy CLIP (all real: PIL files, HTTP on
127.0.0.1, open_clip loading ``local-dir:demo/assets/toy_clip``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter

import pyarrow.parquet as pq
import pytest

from demo.server import serve
from demo.world import COLOURS, SHAPES, generate, make_world, url_list


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), n=200, seed=0)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "files").iterdir())}


def test_make_world_is_deterministic(world, tmp_path):
    again = make_world(tmp_path / "again", n=200, seed=0)
    assert _files(again) == _files(world)
    assert pq.read_table(again / "world.parquet").equals(pq.read_table(world / "world.parquet"))
    seed0 = make_world(tmp_path / "seed0", n=20, seed=0, n_broken=0)
    seed1 = make_world(tmp_path / "seed1", n=20, seed=1, n_broken=0)
    assert _files(seed0) != _files(seed1)


def test_world_rows_and_captions(world):
    t = pq.read_table(world / "world.parquet").to_pylist()
    assert len(t) == 200
    for r in t:
        assert r["colour"] in COLOURS and r["shape"] in SHAPES
        # colour and shape words appear verbatim in the caption
        assert r["colour"] in r["caption"] and r["shape"] in r["caption"]
        if r["is_mismatched"]:
            assert r["colour"] != r["true_colour"] and r["shape"] != r["true_shape"]
        else:
            assert (r["colour"], r["shape"]) == (r["true_colour"], r["true_shape"])
    good = [r for r in t if r["broken"] is None]
    share = sum(r["is_mismatched"] for r in good) / len(good)
    assert share == pytest.approx(0.15, abs=0.01)
    exts = Counter(r["path"].rsplit(".", 1)[1] for r in good)
    assert exts["jpg"] > exts["png"] > 0


def test_concepts_are_skewed():
    counts = Counter((p.true_colour, p.true_shape) for p in generate(1000, seed=3, n_broken=0))
    ranked = sorted(counts.values(), reverse=True)
    median = ranked[len(ranked) // 2]
    assert ranked[0] >= 10 * median
    assert len(counts) >= 40  # and a long tail of rare concepts


def test_broken_entries(world):
    t = pq.read_table(world / "world.parquet").to_pylist()
    broken = {r["broken"]: world / r["path"] for r in t if r["broken"] is not None}
    assert set(broken) == {"missing", "truncated", "html", "empty"}
    assert not broken["missing"].exists()
    assert broken["empty"].read_bytes() == b""
    assert broken["html"].read_bytes().startswith(b"<!doctype html>")
    trunc = broken["truncated"].read_bytes()
    assert trunc.startswith(b"\xff\xd8") and not trunc.endswith(b"\xff\xd9")


def test_server_serves_files_and_404s(world):
    rows = url_list(world, "http://placeholder").to_pylist()
    assert rows[0]["url"].startswith("http://placeholder/files/")
    with serve(world) as base:
        assert base.startswith("http://127.0.0.1:")
        t = url_list(world, base).to_pylist()
        ok = next(r for r in t if r["broken"] is None and r["url"].endswith(".jpg"))
        with urllib.request.urlopen(ok["url"], timeout=10) as resp:
            body = resp.read()
            assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"
        assert body == (world / ok["url"][len(base) + 1 :]).read_bytes()
        html = next(r for r in t if r["broken"] == "html")
        with urllib.request.urlopen(html["url"], timeout=10) as resp:  # the server lies about the type
            assert resp.headers["Content-Type"] == "image/jpeg" and resp.read().startswith(b"<!doctype")
        missing = next(r for r in t if r["broken"] == "missing")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(missing["url"], timeout=10)
        assert e.value.code == 404


def test_toy_clip_loads_and_separates():
    from demo.train_clip import (
        ASSET_DIR,
        THRESHOLD_NAME,
        cosine_scores,
        encode_images,
        load,
        pipeline_resizer,
    )

    model, preprocess, tokenizer = load(ASSET_DIR)
    pairs = [p for p in generate(24, seed=7, mismatch_rate=0.0, n_broken=0)][:6]
    images = encode_images(pairs, preprocess, pipeline_resizer())
    matched = cosine_scores(model, tokenizer, images, [p.caption for p in pairs])
    # The same images with clearly wrong captions: another colour and another shape.
    wrong = []
    for p in pairs:
        colour = next(c for c in COLOURS if c not in (p.true_colour, "white", "black"))
        shape = next(s for s in SHAPES if s != p.true_shape)
        wrong.append(f"{colour} {shape}")
    mismatched = cosine_scores(model, tokenizer, images, wrong)
    assert (matched > mismatched).all(), (matched, mismatched)
    threshold = json.loads((ASSET_DIR / THRESHOLD_NAME).read_text())["min_score"]
    assert (matched >= threshold).mean() >= 5 / 6
    assert (mismatched < threshold).mean() >= 5 / 6


def test_degraded_images_are_seeded_and_leave_other_pairs_alone(world, tmp_path):
    """A known share of the matched pairs has a blurred or noisy image (truth in is_degraded/degraded);
    the draw has its own stream, so every other pair keeps the bytes of a world without degraded images."""
    from demo.world import DEGRADE_RATE

    t = pq.read_table(world / "world.parquet").to_pylist()
    good = [r for r in t if r["broken"] is None]
    deg = [r for r in good if r["is_degraded"]]
    assert len(deg) == round(DEGRADE_RATE * len(good))
    assert {r["degraded"] for r in deg} == {"blur", "noise"}
    assert not any(r["is_mismatched"] for r in deg), "degraded images keep their matching caption"
    assert all(r["degraded"] is None for r in t if not r["is_degraded"])
    clean = make_world(tmp_path / "clean", n=200, seed=0, degrade_rate=0.0)
    a, b = _files(world), _files(clean)
    deg_paths = {r["path"] for r in deg}
    assert all(a[p] != b[p] for p in deg_paths)
    assert all(a[p] == b[p] for p in a if p not in deg_paths)
    ct = pq.read_table(clean / "world.parquet")
    assert ct.drop_columns(["is_degraded", "degraded"]).equals(
        pq.read_table(world / "world.parquet").drop_columns(["is_degraded", "degraded"])
    )


def test_near_copies_are_appended_with_their_ground_truth(world, tmp_path):
    """``n_copies`` (demo/copies.py): the first ``n`` pairs keep their bytes and truth; the copies are new
    files of undegraded good pairs, every kind, with a fresh caption naming the same concept."""
    import io

    from PIL import Image

    from demo.copies import COPY_KINDS

    cp = make_world(tmp_path / "copies", n=200, seed=0, n_copies=24)
    base, t = pq.read_table(world / "world.parquet"), pq.read_table(cp / "world.parquet")
    assert t.slice(0, 200).select(base.column_names).equals(base)
    assert {k: v for k, v in _files(cp).items() if k in _files(world)} == _files(world)
    rows = t.to_pylist()
    copies = rows[200:]
    assert len(copies) == 24 and Counter(r["copy_kind"] for r in copies) == {k: 6 for k in COPY_KINDS}
    assert len({r["copy_of"] for r in copies}) == 24
    for r in copies:
        src = rows[r["copy_of"]]
        assert src["broken"] is None and src["degraded"] is None and src["copy_of"] is None
        assert (r["true_colour"], r["true_shape"], r["background"]) == (
            src["true_colour"], src["true_shape"], src["background"],
        )  # fmt: skip
        assert r["url" if "url" in r else "path"] != src["path"] and not r["is_mismatched"]
        data = (cp / r["path"]).read_bytes()
        assert data != (cp / src["path"]).read_bytes()
        Image.open(io.BytesIO(data)).verify()
    concept = Counter((r["true_colour"], r["true_shape"], r["background"]) for r in rows)
    assert [r["concept_rows"] for r in rows] == [
        concept[(r["true_colour"], r["true_shape"], r["background"])] for r in rows
    ]
    assert any(r["concept_rows"] == 1 for r in rows) and all(r["concept_rows"] >= 2 for r in copies)
