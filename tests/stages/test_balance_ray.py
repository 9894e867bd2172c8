"""MetaCLIP balancing through the executor on real Ray: the fitted counts are persisted in the run
dir, and kept sets are identical across runs with different batch sizes and concurrency (#5, 3)."""

from __future__ import annotations

import json

import polars as pl
import pyarrow.parquet as pq

from tests.conftest import REPO


def _run(urls, out, batch_size: int, concurrency: int, samples_per_shard: int):
    from pipeline import config, plan
    from pipeline import ray as executor

    pipe = config.from_dict(
        {
            "name": "balance",
            "samples_per_shard": samples_per_shard,
            "ray": {"show_progress": False},
            "stages": [
                {"read": {"path": str(urls)}},
                {
                    "balance": {
                        "metadata": str(REPO / "demo" / "assets" / "shapes_metadata.json"),
                        "t": 10,
                        "seed": 7,
                        "batch_size": batch_size,
                        "concurrency": concurrency,
                        "num_cpus": 0.5,
                    }
                },
                {"write": {}},
            ],
        },
        output=str(out),
    )
    plan.check(pipe)
    return executor.run(pipe)


def _kept(out) -> list[str]:
    df = pl.concat([pl.from_arrow(pq.read_table(p)) for p in sorted(out.glob("*.parquet"))])
    return sorted(df.filter(pl.col("status") == "ok")["key"].to_list())


def test_balance_is_deterministic_across_batch_size_and_concurrency(ray_session, demo_urls, tmp_path):
    a = _run(demo_urls, tmp_path / "a", batch_size=7, concurrency=1, samples_per_shard=100)
    b = _run(demo_urls, tmp_path / "b", batch_size=64, concurrency=2, samples_per_shard=100)
    ka, kb = _kept(tmp_path / "a"), _kept(tmp_path / "b")
    n = pq.read_metadata(demo_urls).num_rows
    assert a["total_rows"] == b["total_rows"] == n
    assert 0 < len(ka) < n, "balancing kept some rows and dropped some"
    assert ka == kb
    # the fitted counts themselves, not only the rows they keep, are the same bytes either way
    sa, sb = (tmp_path / d / "_clipcurate" / "state" / "01_balance.json" for d in ("a", "b"))
    assert sa.read_bytes() == sb.read_bytes()
    # the fitted counts are persisted in the run dir and summarised in the manifest
    state = json.loads((tmp_path / "a" / "_clipcurate" / "state" / "01_balance.json").read_text())
    assert sum(state["counts"]) > 0 and state["t"] == 10
    assert a["global_state"]["balance"]["t"] == 10
    assert a["stage_status"]["balance"]["filtered_balance"] == n - len(ka)
