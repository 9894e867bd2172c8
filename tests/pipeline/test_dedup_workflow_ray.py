"""``workflows/dedup.yaml`` as a user runs it (README "Dedup in tiers", issue #13): exact -> perceptual ->
semantic -> decontamination through the CLI and the Ray executor (the shuffle stages partitioned, decided
and applied by ``pipeline/ray/shuffle.py``), on a small shapes world with near-copies served on 127.0.0.1.

Only ``--set`` changes the committed workflow: the pool, ``samples_per_shard``, the eval set (three of the
world's own images, so that decontamination has something to find) and the output. Checks: every row comes
back once with a status from its tier; every reason's kept key is a row of the pool; the two shard sizes give
the same status and reason per key (the shuffle does not depend on the partitioning); the tiers find the
generator's copies; the report shows the pairs side by side."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import REPO

pytestmark = pytest.mark.integration

N, K = 80, 24  # 80 pairs + 24 near-copies (6 per kind)


def _run(pool: Path, evalset: Path, out: Path, per_shard: int) -> dict:
    from pipeline import cli

    argv = ["run", str(REPO / "workflows" / "dedup.yaml"), "--output", str(out), "--progress", "quiet",
            "--set", f"stages.read.path={pool}", "--set", f"samples_per_shard={per_shard}",
            "--set", f"stages.decontaminate.eval_path={evalset}", "--set", "ray.show_progress=false"]  # fmt: skip
    assert cli.main(argv) == 0
    return json.loads((out / "manifest.json").read_text())


def _rows(out: Path) -> dict[str, dict]:
    t = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])
    return {r["key"]: r for r in t.to_pylist()}


def _by_position(rows: dict[str, dict]) -> list[tuple]:
    """(status, reason with the kept key replaced by its position in the pool) per row, in pool order:
    keys name (shard, index), so they change with ``samples_per_shard``; positions do not."""
    keys = sorted(rows)
    pos = {k: str(i) for i, k in enumerate(keys)}
    out = []
    for k in keys:
        reason = rows[k]["reason"]
        if reason and " key " in reason:
            head, tail = reason.split(" key ", 1)
            kept, _, rest = tail.partition(" ")
            reason = f"{head} key #{pos[kept]} {rest}"
        out.append((rows[k]["status"], reason))
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory, ray_session):
    from demo.run_demo import write_url_list
    from demo.server import serve
    from demo.world import make_world

    tmp = tmp_path_factory.mktemp("dedup_wf")
    world = make_world(tmp / "world", n=N, seed=0, n_copies=K)
    truth = pq.read_table(world / "world.parquet")
    with serve(world) as base:
        urls = pq.read_table(write_url_list(world, base))
        # an exact repeat of row 3's URL under another caption: the exact tier's case
        extra = urls.slice(3, 1).set_column(urls.column_names.index("caption"), "caption", pa.array(["again"]))
        path = tmp / "pool.parquet"
        pq.write_table(pa.concat_tables([urls, extra]), path)
        # the eval set: three originals' images as id + image bytes (decontaminate embeds them)
        good = zip(truth.column("copy_of").to_pylist(), truth.column("broken").to_pylist())
        picks = [i for i, (c, broken) in enumerate(good) if c is None and not broken][10:13]
        imgs = []
        for i in picks:
            buf = io.BytesIO()
            Image.open(world / "files" / Path(truth.column("path")[i].as_py()).name).convert("RGB").save(buf, "PNG")
            imgs.append(buf.getvalue())
        evalset = tmp / "eval.parquet"
        pq.write_table(pa.table({"key": [f"eval-{i}" for i in picks], "image": imgs}), evalset)
        runs = {s: _run(path, evalset, tmp / f"out{s}", s) for s in (25, 60)}
        return tmp, truth, picks, runs


def test_each_tier_flags_through_ray_and_the_partitioning_does_not_matter(pool):
    tmp, truth, picks, runs = pool
    a, b = _rows(tmp / "out25"), _rows(tmp / "out60")
    assert len(a) == len(b) == N + K + 1
    assert _by_position(a) == _by_position(b)
    keys = sorted(a)
    # exact: the repeated URL (the last key) loses to row 3
    last = a[keys[-1]]
    assert last["status"] == "duplicate" and last["rule"] == "duplicate:url" and keys[3] in last["reason"]
    # every reason that names a kept key names a row of the pool
    for r in a.values():
        if r["status"] == "duplicate":
            kept = r["reason"].split(" key ")[1].split()[0]
            assert kept in a and kept < r["key"] or r["rule"] == "semantic_duplicate", r["reason"]
    # perceptual: the re-encoded and resized copies (whose source downloaded) are flagged by some tier
    kinds = truth.column("copy_kind").to_pylist()
    copies = [i for i, k in enumerate(kinds) if k in ("reencode", "resize")]
    flagged = [a[keys[i]]["status"] != "ok" for i in copies]
    assert sum(flagged) >= 0.9 * len(copies), (sum(flagged), len(copies))
    rules = {r["rule"] for r in a.values()}
    assert "near_duplicate:phash" in rules
    # decontamination: the eval items' own rows are removed, and each reason names its eval item
    for i in picks:
        r = a[keys[i]]
        if r["status"] == "contaminated":
            assert f"eval-{i}" in r["reason"]
    assert sum(a[keys[i]]["status"] == "contaminated" for i in picks) >= 1
    # the manifest carries every tier's counts
    m = runs[25]
    for stage in ("dedup", "near_dedup", "semdedup", "decontaminate"):
        assert stage in json.dumps(m["stages"] if "stages" in m else m), stage


def test_the_report_shows_duplicate_pairs(pool):
    tmp = pool[0]
    html = (tmp / "out25" / "report.html").read_text()
    assert 'id="pairs"' in html and "Duplicates side by side" in html
