"""The report's ``pairs`` section (issue 13): per-tier counts of rows rejected in favour of another row, a few
duplicate pairs side by side, and the semantic tier's cluster-size histogram.

Real parts: the shapes world with near-copies downloaded and scored by the toy CLIP (``copies_pool``), the
``dedup``-tier stages ``near_dedup`` and ``semdedup`` run by ``stages.shuffle.run_local`` (one process; the
executor runs the same methods on Ray), the real ``write`` sink and ``pipeline.html.render``. Written here:
``manifest.json`` (as the executor writes it, with the semdedup state summary).
"""

from __future__ import annotations

import json
import re

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import html as report_html
from pipeline import registry
from schemas.row import SHARD_COL
from stages.roles import SinkContext
from stages.shuffle import run_local

STAGES = [{"read": {}}, {"near_dedup": {}}, {"semdedup": {"n_clusters": 5, "eps": 0.004}}, {"write": {}}]


def test_pairs_counts_equal_the_parquet_and_show_both_images(copies_pool, tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    n = copies_pool.num_rows
    pool = copies_pool.append_column(SHARD_COL, pa.array([i * 2 // n for i in range(n)], pa.int32()))
    shards = [pool.filter(pa.compute.equal(pool[SHARD_COL], s)) for s in (0, 1)]
    near = registry.get("near_dedup")(STAGES[1]["near_dedup"])
    shards = run_local(near, shards, 3)
    sem = registry.get("semdedup")(STAGES[2]["semdedup"])
    shards = run_local(sem, shards, 3)
    sink = registry.get("write")(STAGES[3]["write"])
    stats = [sink.write(t, SinkContext(output=str(out)))[0] for t in shards]
    manifest = {
        "name": "pairs", "output": str(out), "total_rows": n, "total_samples": sum(s["successes"] for s in stats),
        "shard_pattern": f"{out}/{{00000..00001}}.tar", "config": {"stages": STAGES},
        "global_state": {"semdedup": sem.state_summary(sem._state)},
    }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    page = report_html.render(str(out))
    sec = re.search(r'<section id="pairs">(.*?)</section>', page, re.S).group(1)

    df = pl.concat([pl.from_arrow(pq.read_table(p)) for p in sorted(out.glob("*.parquet"))])
    counts = df.filter(pl.col("status") == "duplicate").group_by("rejected_by", "rule").len()
    assert counts.height == 2
    for stage, rule, rows in counts.iter_rows():
        assert f"<td>{stage}</td><td>duplicate</td><td>{rule}</td><td class=n>{rows}</td>" in sec
        assert f"<h3>{stage} &middot; {rule}</h3>" in sec
    pairs = re.findall(r'<div class="grid pair">(.*?</div></div>)(.*?</div></div>)</div>', sec, re.S)
    assert 2 <= len(pairs) <= 8
    for rejected, kept in pairs:
        kept_key = re.search(r"key (\d+)", rejected).group(1)
        assert f"<b>{kept_key}</b>" in kept
        assert rejected.count("data:image/jpeg;base64,") == 1, "the rejected row's thumbnail"
    assert sum(k.count("data:image/jpeg;base64,") for _, k in pairs) >= len(pairs) // 2, "kept images shown"
    hist = manifest["global_state"]["semdedup"]["cluster_size_histogram"]
    assert "semdedup &middot; cluster size histogram" in sec and sum(hist.values()) == 5
