"""clip_filter with a combined rule through the executor on real Ray (issue #14): "top 30% of the
pool by ``clip_l14`` and ``nsfw`` <= 0.5", on score columns that the read stage keeps from the input
Parquet (as DataComp's metadata carries its precomputed scores), NaN and missing scores included.

The scores are made up here (seeded): they stand in for a scoring stage's output, which is all the
filter reads. The rows are never downloaded (no stage before the filter needs their images)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq


def _pool(path, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(14)
    clip = np.round(rng.normal(0.3, 0.05, n), 3).astype(np.float32)
    clip[rng.choice(n, 9, replace=False)] = np.nan
    clip_col = [None if i % 50 == 7 else float(v) for i, v in enumerate(clip)]  # 6 missing
    nsfw = np.round(rng.random(n), 2)
    table = pa.table(
        {
            "url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)],
            "text": [f"a photo number {i}" for i in range(n)],
            "clip_l14": pa.array(clip_col, pa.float32()),
            "nsfw": pa.array(nsfw, pa.float64()),
        }
    )
    pq.write_table(table, path)
    clip_seen = np.array([np.nan if v is None else v for v in clip_col], np.float32)
    return clip_seen, nsfw


def test_combined_rule_through_the_executor(ray_session, tmp_path):
    from pipeline import config, plan
    from pipeline import ray as executor

    n = 300
    clip, nsfw = _pool(tmp_path / "pool.parquet", n)
    rules = [{"column": "clip_l14", "top_fraction": 0.3}, {"column": "nsfw", "max_score": 0.5}]
    pipe = config.from_dict(
        {
            "name": "score_rules",
            "samples_per_shard": 50,
            "ray": {"show_progress": False},
            "stages": [
                {"read": {"path": str(tmp_path / "pool.parquet"), "caption_col": "text",
                          "save_additional_columns": ["clip_l14", "nsfw"]}},
                {"clip_filter": {"rules": rules}},
                {"write": {}},
            ],
        },
        output=str(tmp_path / "out"),
    )  # fmt: skip
    plan.check(pipe)
    manifest = executor.run(pipe)

    # DataComp's rule over the whole pool of 300 (NaN and missing scores sort last and count in N)
    thr = float(-np.sort(-clip)[int(n * 0.3)])
    want = (clip >= thr) & (nsfw <= 0.5)
    df = pl.concat([pl.from_arrow(pq.read_table(p)) for p in sorted((tmp_path / "out").glob("*.parquet"))])
    df = df.sort("key")
    assert df.height == n
    assert np.array_equal(df["status"].to_numpy() == "ok", want)
    tags = [r.split(" ", 1)[0] if r else None for r in df["reason"].to_list()]
    expect = []
    for c, s in zip(clip, nsfw):
        if np.isnan(c):
            expect.append("clip_l14:nan")
        elif c < thr:
            expect.append("clip_l14:top_fraction")
        elif s > 0.5:
            expect.append("nsfw:max_score")
        else:
            expect.append(None)
    missing = df["clip_l14"].is_null().to_numpy()
    expect = ["clip_l14:missing" if m else e for m, e in zip(missing, expect)]
    assert tags == expect and missing.sum() == 6
    assert set(df.filter(pl.col("status") != "ok")["status"].to_list()) == {"filtered_clip"}

    state = json.loads((tmp_path / "out" / "_clipcurate" / "state" / "01_clip_filter.json").read_text())
    assert state["n"] == n and state["kept"] == int(want.sum())
    assert state["rules"][0]["threshold"] == thr
    n_nan = int(np.isnan(clip).sum()) - 6  # the injected NaNs not overwritten by a missing score
    assert (state["rules"][0]["n_nan"], state["rules"][0]["n_missing"]) == (n_nan, 6) and n_nan > 0
    assert manifest["global_state"]["clip_filter"]["kept"] == int(want.sum())
    assert manifest["stage_status"]["clip_filter"]["filtered_clip"] == n - int(want.sum())
