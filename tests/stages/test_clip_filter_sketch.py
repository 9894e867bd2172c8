"""clip_filter's two-round reduce (``stages/score_sketch.py``: a histogram, then the scores in the bin
of the cut) against DataComp's rule computed over every score at once, on awkward pools (ties at the
cut, negative scores, -0.0 and 0.0, infinities, scores spread over many powers of two, NaN and
missing), several rules, and several random splits into partials."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from schemas import conform
from stages import score_sketch
from stages.clip_filter import ClipFilter, ClipFilterConfig, datacomp_threshold
from stages.reduce import fit_local


def _pools(rng) -> dict[str, np.ndarray]:
    n = 2000
    spread = rng.normal(0, 1, n) * 10.0 ** rng.integers(-30, 30, n)
    ties = rng.integers(0, 5, n) / 4.0  # five distinct values: the cut sits in a block of ties
    zeros = rng.choice([-0.0, 0.0, 1e-300, -1e-300, np.inf, -np.inf, 0.5], n)
    clip = np.round(rng.normal(0.3, 0.05, n), 4)
    for a in (spread, ties, zeros, clip):
        a[rng.choice(n, 40, replace=False)] = np.nan
    return {"spread": spread, "ties": ties, "zeros": zeros, "clip": clip}


def _table(cols: dict[str, np.ndarray], rng) -> pa.Table:
    n = len(next(iter(cols.values())))
    data = {"key": [f"{i:06d}" for i in range(n)], "status": ["ok"] * n}
    for c, v in cols.items():
        nulls = rng.random(n) < 0.01
        data[c] = pa.array([None if m else float(x) for m, x in zip(nulls, v)], pa.float64())
    return conform(pa.table(data))


def _splits(table: pa.Table, k: int, rng) -> list[pa.Table]:
    order = rng.permutation(table.num_rows)
    cuts = np.sort(rng.choice(np.arange(1, table.num_rows), k - 1, replace=False))
    return [table.take(pa.array(p)) for p in np.split(order, cuts)] + [table.slice(0, 0)]


def _floats(table: pa.Table, col: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in table.column(col).to_pylist()], np.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("col", ["spread", "ties", "zeros", "clip"])
def test_threshold_and_kept_rows_are_datacomps(seed, col):
    rng = np.random.default_rng(seed)
    table = _table(_pools(rng), rng)
    vals = _floats(table, col)
    for fraction in (0.01, 0.3, 0.5, 0.97):
        stage = ClipFilter(ClipFilterConfig(column=col, top_fraction=fraction))
        state = fit_local(stage, _splits(table, 1 + seed * 4, rng), shuffle_seed=seed)
        thr = datacomp_threshold(vals, fraction)
        assert state["rules"][0]["threshold"] == thr, (col, fraction)
        kept = np.array(stage(table).column("status").to_pylist()) == "ok"
        want = ~np.isnan(vals) & (vals >= thr) if thr is not None else ~np.isnan(vals)
        assert np.array_equal(kept, want) and state["kept"] == int(want.sum())


def test_several_rules_joint_count_matches_the_rows(seed=3):
    rng = np.random.default_rng(seed)
    table = _table(_pools(rng), rng)
    rules = [
        {"column": "clip", "top_fraction": 0.4, "min_score": 0.29},
        {"column": "ties", "top_fraction": 0.5},
        {"column": "spread", "max_score": 1.0},
    ]
    stage = ClipFilter(ClipFilterConfig(rules=rules))
    assert stage.fit_rounds == 2
    state = fit_local(stage, _splits(table, 6, rng), shuffle_seed=1)
    out = stage(table)
    kept = np.array(out.column("status").to_pylist()) == "ok"
    assert state["kept"] == int(kept.sum()) and state["n"] == table.num_rows
    for r, s in zip(rules, state["rules"]):
        v = _floats(table, r["column"])
        ok = ~np.isnan(v)
        if r.get("top_fraction"):
            assert s["threshold"] == datacomp_threshold(v, r["top_fraction"])
            ok &= v >= s["threshold"]
        if r.get("min_score") is not None:
            ok &= v >= r["min_score"]
        if r.get("max_score") is not None:
            ok &= v <= r["max_score"]
        assert s["kept"] == int(ok.sum()), r


def test_bins_follow_the_float_order():
    v = np.array([-np.inf, -1e300, -2.0, -1.0, -1e-300, -0.0, 0.0, 1e-300, 0.25, 0.2501, 1.0, 1e300, np.inf])
    b = score_sketch.bins_of(v)
    assert np.all(np.diff(b) >= 0) and b[5] == b[6]  # -0.0 and 0.0 share a bin
    assert score_sketch.bins_of(np.array([0.3]))[0] != score_sketch.bins_of(np.array([0.301]))[0]
