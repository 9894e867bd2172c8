"""ClipFilter, a global stage, called directly without Ray.

Acceptance 2: the rows kept are those DataComp's rule keeps on the full list of scores
(``baselines/apply_filter.py``: ``n = int(len(scores) * fraction)``,
``threshold = -np.sort(-scores)[n]``, keep ``score >= threshold``), whatever the batch split, the
order of the partial states, and the apply batch size.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import ConfigError, from_dict
from schemas import conform
from stages.clip_filter import ClipFilter, ClipFilterConfig


def datacomp_kept(scores: np.ndarray, fraction: float) -> np.ndarray:
    """DataComp's rule, written out from its definition, on the full pool."""
    n = int(len(scores) * fraction)
    threshold = -np.sort(-scores)[n]
    return scores >= threshold


def pool(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.25, 0.05, n).astype(np.float32)
    scores[rng.random(n) < 0.2] = np.float32(0.25)  # many exact ties, some at the threshold
    return np.round(scores, 3).astype(np.float32)


def table_of(keys, scores, status=None):
    return conform(
        pa.table(
            {
                "key": keys,
                "clip_score": pa.array(scores, pa.float32()),
                "status": status or ["ok"] * len(keys),
            }
        )
    )


def fit(stage: ClipFilter, tables, seed=0):
    parts = [stage.fit_partial(t) for t in tables]
    random.Random(seed).shuffle(parts)
    state = json.loads(json.dumps(stage.merge(parts)))  # persisted as JSON by the executor
    stage.load_state(state)
    return state


def random_partitions(table: pa.Table, k: int, seed: int) -> list[pa.Table]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(table.num_rows)
    cuts = np.sort(rng.choice(np.arange(1, table.num_rows), k - 1, replace=False))
    return [table.take(pa.array(part)) for part in np.split(order, cuts)] + [table.slice(0, 0)]


@pytest.mark.parametrize("fraction", [0.3, 0.25, 0.001, 0.29, 0.5])
@pytest.mark.parametrize("split", [(1, 0), (7, 1), (40, 2)])
def test_acceptance_2_same_rows_as_datacomp(fraction, split):
    n_parts, seed = split
    scores = pool(10_000, seed=1)
    keys = [f"{i:09d}" for i in range(len(scores))]
    table = table_of(keys, scores)
    stage = ClipFilter(ClipFilterConfig(top_fraction=fraction))
    state = fit(stage, random_partitions(table, n_parts, seed) if n_parts > 1 else [table], seed)
    want = datacomp_kept(scores, fraction)
    assert state["n"] == len(scores)
    assert state["threshold"] == float(-np.sort(-scores)[int(len(scores) * fraction)])
    assert state["rules"][0]["threshold"] == state["threshold"]
    assert state["kept"] == int(want.sum())
    out = pa.concat_tables([stage(table.slice(i, 999)) for i in range(0, table.num_rows, 999)])
    kept = np.array(out.column("status").to_pylist()) == "ok"
    assert np.array_equal(kept, want)
    assert set(out.column("status").to_pylist()) <= {"ok", "filtered_clip"}


def test_pool_is_ok_rows_only_and_null_scores_are_missing():
    scores = pool(1000, seed=3)
    keys = [f"{i:09d}" for i in range(1000)]
    status = ["ok"] * 1000
    for i in range(0, 1000, 10):
        status[i] = "download_failed"  # not in the pool; their scores must not count
    with_nulls = pa.array([None if i % 10 == 5 else float(s) for i, s in enumerate(scores)], pa.float32())
    table = conform(pa.table({"key": keys, "clip_score": with_nulls, "status": status}))
    stage = ClipFilter(ClipFilterConfig(top_fraction=0.3))
    state = fit(stage, [table.slice(0, 500), table.slice(500)])
    # DataComp's pool is every row (pandas reads a null as NaN): the null scores count in N, sort last
    # and are never kept.
    in_pool = np.array([s == "ok" for s in status])
    pool_scores = np.where([i % 10 == 5 for i in range(1000)], np.nan, scores)[in_pool]
    want = datacomp_kept(pool_scores, 0.3)
    assert state["n"] == int(in_pool.sum()) == 900
    assert state["rules"][0]["n_missing"] == 100 and state["rules"][0]["n_nan"] == 0
    out = stage(table).to_pylist()
    assert np.array_equal(np.array([r["status"] == "ok" for r in out])[in_pool], want)
    for i, r in enumerate(out):
        if status[i] != "ok":
            assert r["status"] == "download_failed" and r["reason"] is None
        elif i % 10 == 5:
            assert (r["status"], r["reason"]) == ("filtered_clip", "clip_score:missing clip_score is missing (null)")


def test_reason_names_score_threshold_and_rule():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], np.float32)
    table = table_of([f"{i}" for i in range(10)], scores)
    stage = ClipFilter(ClipFilterConfig(top_fraction=0.3, min_score=0.2))
    state = fit(stage, [table])
    # int(10 * 0.3) == 3: the 4th highest score (0.7) is the threshold; 4 rows kept, not 3.
    assert state["threshold"] == pytest.approx(0.7) and state["kept"] == 4
    out = stage(table).to_pylist()
    assert [r["status"] for r in out] == ["filtered_clip"] * 6 + ["ok"] * 4
    assert out[0]["reason"] == "clip_score:top_fraction clip_score 0.1000 < 0.7000 (top_fraction 0.3 of 10)"
    assert out[0]["rejected_by"] == "clip_filter"
    assert stage.state_summary(state)["threshold"] == state["threshold"]


def test_min_score_alone_and_display_digits():
    scores = np.array([0.27999, 0.28, 0.3, float("nan")], np.float32)
    table = table_of(["0", "1", "2", "3"], scores)
    stage = ClipFilter(ClipFilterConfig(min_score=0.28))
    state = fit(stage, [table])
    assert state["threshold"] is None and state["n"] == 4  # the NaN counts in the pool
    out = stage(table).to_pylist()
    # 0.28 as float32 is 0.2800000012 >= 0.28: kept, as a float64 compare says.
    assert [r["status"] for r in out] == ["filtered_clip", "ok", "ok", "filtered_clip"]
    assert out[0]["reason"] == "clip_score:min_score clip_score 0.279990 < min_score 0.280000"
    assert out[3]["reason"] == "clip_score:nan clip_score is NaN"
    assert state["kept"] == 2


def test_edge_cases_of_the_fraction():
    scores = pool(101, seed=5)
    table = table_of([f"{i:03d}" for i in range(101)], scores)
    stage = ClipFilter(ClipFilterConfig(top_fraction=1.0))  # DataComp's index would be out of range
    state = fit(stage, [table])
    assert state["threshold"] is None and state["kept"] == 101
    assert stage(table).column("status").to_pylist() == ["ok"] * 101
    one = table_of(["0"], np.array([0.5], np.float32))
    stage = ClipFilter(ClipFilterConfig(top_fraction=0.5))  # int(1 * 0.5) == 0: the max is the bar
    assert fit(stage, [one])["threshold"] == 0.5
    assert stage(one).column("status").to_pylist() == ["ok"]
    empty = fit(ClipFilter(ClipFilterConfig(top_fraction=0.3)), [])
    assert empty == {
        "n": 0,
        "kept": 0,
        "threshold": None,
        "top_fraction": 0.3,
        "min_score": None,
        "rules": [
            {
                "column": "clip_score",
                "top_fraction": 0.3,
                "min_score": None,
                "max_score": None,
                "threshold": None,
                "n_nan": 0,
                "n_missing": 0,
                "kept": 0,
            }
        ],
    }


def test_config_errors():
    def load(body):
        return from_dict(
            {"stages": [{"read": {"path": "x.parquet"}}, {"clip_filter": body}]}, source="w.yaml"
        )

    with pytest.raises(ConfigError, match=r"w.yaml: stages\[1\] \(clip_filter\): .*top_fraction.*min_score"):
        load({})
    with pytest.raises(ConfigError, match="top_fraction"):
        load({"top_fraction": 1.5})
    with pytest.raises(RuntimeError, match="no fitted state"):
        ClipFilter(ClipFilterConfig(min_score=0.1)).process(table_of(["0"], np.array([0.5], np.float32)))


def test_datacomp_workflow_validates():
    pytest.importorskip("stages.clip_score")
    pytest.importorskip("stages.download")
    path = Path(__file__).resolve().parents[2] / "workflows" / "datacomp_clip.yaml"
    from pipeline.config import load

    p = load(path)
    names = [s.name for s in p.stages]
    assert names == ["read", "download", "basic_filter", "dedup", "clip_score", "clip_filter", "write"]
    cs = p.stages[4].config
    assert (cs.model, cs.pretrained, cs.num_gpus, cs.batch_size) == (
        "ViT-L-14",
        "datacomp_xl_s13b_b90k",
        1,
        256,
    )
    assert p.stages[5].config.top_fraction == 0.3
