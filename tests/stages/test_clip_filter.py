"""ClipFilter, a global stage, called directly without Ray.

Acceptance 2: the rows kept are those DataComp's rule keeps on the full list of scores
(``baselines/apply_filter.py``: ``n = int(len(scores) * fraction)``,
``threshold = -np.sort(-scores)[n]``, keep ``score >= threshold``), whatever the batch split, the
order of the partial states, and the apply batch size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import ConfigError, from_dict
from schemas import conform
from stages.clip_filter import ClipFilter, ClipFilterConfig, ScoreRule
from stages.reduce import fit_local


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
    # both rounds (sketch, then the rows near the cut), partials in a shuffled order, the states
    # through JSON as the executor persists them
    return fit_local(stage, tables, shuffle_seed=seed)


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
            assert (r["status"], r["reason"]) == (
                "filtered_clip",
                "clip_score:missing clip_score is missing (null)",
            )


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


def _workflow(name: str):
    from pipeline import plan
    from pipeline.config import load

    pipe = load(Path(__file__).resolve().parents[2] / "workflows" / name)
    plan.check(pipe)  # validates and plans without the weights (nothing is loaded)
    return pipe, [s.name for s in pipe.stages]


def test_datacomp_workflows_are_the_published_baselines():
    """Acceptance 5: "CLIP score (L/14 30%)" is OpenAI's ViT-L/14, top 30% of the whole pool, no filter
    before it; "Basic ∩ CLIP" fits the CLIP threshold on the whole pool, then the basic filter; the
    metadata form filters DataComp's stored L/14 scores before any download."""
    pytest.importorskip("stages.clip_score")
    pytest.importorskip("stages.download")
    p, names = _workflow("datacomp_clip.yaml")
    assert names == ["read", "download", "clip_score", "clip_filter", "write"]
    cs, cf = p.stages[2].config, p.stages[3].config
    assert (cs.model, cs.pretrained, cs.num_gpus, cs.batch_size, cs.min_score) == (
        "ViT-L-14",
        "openai",
        1,
        256,
        None,
    )
    assert cf.rule_list() == [ScoreRule(column="clip_score", top_fraction=0.3)]

    p, names = _workflow("datacomp_basic_clip.yaml")
    assert names == ["read", "download", "clip_score", "clip_filter", "basic_filter", "write"]
    assert (p.stages[2].config.model, p.stages[2].config.pretrained) == ("ViT-L-14", "openai")
    assert p.stages[3].config.rule_list() == [ScoreRule(top_fraction=0.3)]
    bf = p.stages[4].config
    assert (bf.lang_id, bf.min_words, bf.min_chars, bf.min_image_side, bf.max_aspect_ratio, bf.missing_size) == (
        "fasttext", 3, 6, 200, 3.0, "reject",
    )  # fmt: skip

    p, names = _workflow("datacomp_clip_metadata.yaml")
    assert names == ["read", "clip_filter", "download", "write"]
    assert p.stages[1].config.rule_list() == [ScoreRule(column="clip_l14_similarity_score", top_fraction=0.3)]


# ---- NaN and missing scores, any column, combined rules (issue #14) -----------------------------


def datacomp_pool_threshold(values: np.ndarray, fraction: float) -> float:
    """DataComp's ``get_threshold`` as written, on a pool whose scores hold NaN (pandas reads a null
    as NaN): ``n = int(len(df) * fraction)``; ``-np.sort(-df[key].values)[n]``."""
    n = int(len(values) * fraction)
    return float(-np.sort(-values)[n])


def with_rule_column(table: pa.Table) -> pa.Table:
    """The lead's shared ``rule`` column (added to the base schema by another branch); set_status
    writes it where the table has one."""
    if "rule" in table.column_names:
        return table
    return table.append_column("rule", pa.nulls(table.num_rows, pa.string()))


def test_injected_nan_and_missing_scores_count_in_the_pool_and_are_rejected():
    """Acceptance 4: NaN scores are never ok; they count in N as DataComp counts them."""
    rng = np.random.default_rng(11)
    scores = pool(1000, seed=4).astype(np.float64)
    nan_at = rng.choice(1000, 50, replace=False)
    null_at = rng.choice(np.setdiff1d(np.arange(1000), nan_at), 30, replace=False)
    scores[nan_at] = np.nan
    col = pa.array([None if i in set(null_at) else float(s) for i, s in enumerate(scores)], pa.float32())
    table = with_rule_column(
        conform(
            pa.table({"key": [f"{i:04d}" for i in range(1000)], "clip_score": col, "status": ["ok"] * 1000})
        )
    )
    stage = ClipFilter(ClipFilterConfig(top_fraction=0.3))
    state = fit(stage, [table.slice(0, 333), table.slice(333)])
    pandas_view = np.where(np.isin(np.arange(1000), null_at), np.nan, scores.astype(np.float32)).astype(
        np.float32
    )
    thr = datacomp_pool_threshold(pandas_view, 0.3)
    assert state["n"] == 1000  # NaN and missing scores are in the pool size
    assert (state["rules"][0]["n_nan"], state["rules"][0]["n_missing"]) == (50, 30)
    assert state["threshold"] == thr  # index int(1000 * 0.3) = 300 of the descending sort, NaNs last
    want = pandas_view >= thr  # NaN >= thr is False: DataComp never keeps them
    assert state["kept"] == int(want.sum()) >= 301  # int(0.3 * 1000) + 1, plus ties at the bar
    out = stage(table).to_pylist()
    assert np.array_equal(np.array([r["status"] == "ok" for r in out]), want)
    for i in nan_at:
        r = out[i]
        assert (r["status"], r["reason"], r["rule"]) == (
            "filtered_clip",
            "clip_score:nan clip_score is NaN",
            "clip_score:nan",
        )
    for i in null_at:
        assert (out[i]["status"], out[i]["rule"]) == ("filtered_clip", "clip_score:missing")
        assert out[i]["reason"] == "clip_score:missing clip_score is missing (null)"
    low = next(r for r in out if r["rule"] == "clip_score:top_fraction")
    assert low["reason"].endswith("(top_fraction 0.3 of 1000)")  # the pool size, NaN and missing included
    # min_score alone: a NaN fails it too (NaN >= x is false)
    stage = ClipFilter(ClipFilterConfig(min_score=-1.0))
    fit(stage, [table])
    out = stage(table).to_pylist()
    assert [i for i, r in enumerate(out) if r["status"] != "ok"] == sorted([*nan_at, *null_at])


def test_threshold_past_the_scored_rows_keeps_every_scored_row():
    """int(N * f) lands on a NaN: DataComp's threshold would be NaN (keeping nothing); here every
    scored row is kept and the NaN ones are still rejected."""
    scores = np.array([0.5, 0.4, np.nan, 0.3, np.nan, np.nan, 0.2, np.nan, 0.1, np.nan], np.float32)
    table = table_of([str(i) for i in range(10)], scores)
    stage = ClipFilter(ClipFilterConfig(top_fraction=0.6))
    state = fit(stage, [table])
    assert np.isnan(datacomp_pool_threshold(scores, 0.6))  # what DataComp computes
    assert state["threshold"] is None and state["kept"] == 5 and state["n"] == 10
    assert [r["status"] == "ok" for r in stage(table).to_pylist()] == list(~np.isnan(scores))


def two_scores(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    clip = np.round(rng.normal(0.3, 0.05, n), 3).astype(np.float32)
    clip[rng.random(n) < 0.02] = np.nan
    nsfw = np.round(rng.random(n), 2)
    return with_rule_column(
        conform(
            pa.table(
                {
                    "key": [f"{i:05d}" for i in range(n)],
                    "clip_l14": pa.array(clip, pa.float32()),
                    "nsfw": pa.array(
                        [None if i % 97 == 0 else float(v) for i, v in enumerate(nsfw)], pa.float64()
                    ),
                    "status": ["ok"] * n,
                }
            )
        )
    )


def test_combined_rules_all_must_hold_each_over_the_whole_pool():
    table = two_scores(5000, seed=2)
    cfg = ClipFilterConfig(
        rules=[{"column": "clip_l14", "top_fraction": 0.3}, {"column": "nsfw", "max_score": 0.5}]
    )
    stage = ClipFilter(cfg)
    assert stage.required_columns() == ("clip_l14", "nsfw") and stage.fit_columns == ("clip_l14", "nsfw")
    state = fit(stage, random_partitions(table, 9, seed=3), seed=3)
    clip = table.column("clip_l14").to_numpy(zero_copy_only=False)
    nsfw = np.array([np.nan if v is None else v for v in table.column("nsfw").to_pylist()])
    thr = datacomp_pool_threshold(clip, 0.3)  # over the whole pool, not over the nsfw-passing rows
    want = (clip >= thr) & (nsfw <= 0.5)
    assert state["rules"][0]["threshold"] == thr and "threshold" not in state  # no flat key: two columns
    assert state["kept"] == int(want.sum()) and state["n"] == 5000
    assert state["rules"][1] == {
        "column": "nsfw", "top_fraction": None, "min_score": None, "max_score": 0.5, "threshold": None,
        "n_nan": 0, "n_missing": 52, "kept": int((nsfw <= 0.5).sum()),
    }  # fmt: skip
    out = pa.concat_tables([stage(table.slice(i, 700)) for i in range(0, 5000, 700)]).to_pylist()
    assert np.array_equal(np.array([r["status"] == "ok" for r in out]), want)
    for r, c, s in zip(out, clip, nsfw):
        # the first failing rule in list order names the row
        if np.isnan(c):
            assert r["rule"] == "clip_l14:nan"
        elif c < thr:
            assert r["rule"] == "clip_l14:top_fraction"
        elif np.isnan(s):
            assert r["rule"] == "nsfw:missing"
        elif s > 0.5:
            assert r["rule"] == "nsfw:max_score" and r["reason"].startswith("nsfw:max_score nsfw ")
            assert " > max_score 0.5000" in r["reason"]
        else:
            assert r["status"] == "ok" and r["rule"] is None and r["reason"] is None
    assert {r["rule"] for r in out} == {
        None,
        "clip_l14:nan",
        "clip_l14:top_fraction",
        "nsfw:missing",
        "nsfw:max_score",
    }


def test_single_rule_on_another_column_and_bounds_are_inclusive():
    table = two_scores(200, seed=5)
    stage = ClipFilter(ClipFilterConfig(column="nsfw", min_score=0.1, max_score=0.5))
    assert stage.required_columns() == ("nsfw",)
    state = fit(stage, [table])
    assert "threshold" not in state  # the report's flat keys are for clip_score only
    out = stage(table).to_pylist()
    for r in out:
        v = r["nsfw"]
        assert (r["status"] == "ok") == (v is not None and 0.1 <= v <= 0.5)


def test_string_scores_from_the_read_stage_are_parsed():
    """``save_additional_columns`` keeps input columns as strings (JSON numbers, ``NaN``)."""
    vals = ["0.9", "0.1", "NaN", None, "abc", "0.5"]
    table = with_rule_column(
        conform(pa.table({"key": list("abcdef"), "status": ["ok"] * 6, "clip_l14_similarity_score": vals}))
    )
    stage = ClipFilter(ClipFilterConfig(column="clip_l14_similarity_score", top_fraction=0.3))
    state = fit(stage, [table])
    assert state["n"] == 6 and state["rules"][0]["threshold"] == 0.5  # int(6 * 0.3) = 1: the second highest
    out = stage(table).to_pylist()
    assert [r["status"] for r in out] == [
        "ok",
        "filtered_clip",
        "filtered_clip",
        "filtered_clip",
        "filtered_clip",
        "ok",
    ]
    assert [r["rule"] for r in out][2:5] == [
        f"clip_l14_similarity_score:{t}" for t in ("nan", "missing", "nan")
    ]


def test_rule_config_errors_and_the_plan_checks_rule_columns():
    def load(body, read=None):
        return from_dict(
            {
                "stages": [
                    {"read": {"path": "x.parquet", **(read or {})}},
                    {"clip_filter": body},
                    {"write": {}},
                ]
            },
            source="w.yaml",
        )

    with pytest.raises(
        ConfigError, match=r"stages\[1\] \(clip_filter\): .*'rules' replaces the top-level keys.*top_fraction"
    ):
        load({"top_fraction": 0.3, "rules": [{"column": "a", "min_score": 0}]})
    with pytest.raises(ConfigError, match="'rules' is empty"):
        load({"rules": []})
    with pytest.raises(ConfigError, match="min_score 0.6 > max_score 0.5"):
        load({"rules": [{"column": "nsfw", "min_score": 0.6, "max_score": 0.5}]})
    with pytest.raises(ConfigError, match="set 'top_fraction'"):
        load({"rules": [{"column": "nsfw"}]})
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'rules.0.min' — allowed keys: column, columns, max_score, min_score, top_fraction",
    ):
        load({"rules": [{"column": "nsfw", "min": 0.5}]})

    from pipeline import plan

    rules = {"rules": [{"column": "clip_l14", "top_fraction": 0.3}, {"column": "nsfw", "max_score": 0.5}]}
    with pytest.raises(ConfigError, match=r"stages\[1\] \(clip_filter\): requires column 'clip_l14'"):
        plan.check(load(rules))
    steps = plan.check(load(rules, {"save_additional_columns": ["clip_l14", "nsfw"]}))
    assert steps[1].requires == ("clip_l14", "nsfw")
