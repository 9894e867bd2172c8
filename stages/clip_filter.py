"""Score filter (``clip_filter``), a global stage: keep the rows whose score columns pass every rule
(it requires the columns its rules name: ``clip_score`` by default).

A rule names a score column (``clip_score`` by default; any numeric column an earlier stage
produces or the read stage keeps, e.g. ``clip_l14`` or ``nsfw``) and bounds it with any of
``top_fraction`` (DataComp's top share of the pool), ``min_score`` (keep ``score >= min_score``) and
``max_score`` (keep ``score <= max_score``). The top-level keys are the single-rule form; ``rules:``
is a list of such rules that must all hold, e.g. "top 30% by ``clip_l14`` and ``nsfw`` <= 0.5":

    - clip_filter:
        rules:
          - {column: clip_l14, top_fraction: 0.3}
          - {column: nsfw, max_score: 0.5}

Each rule is judged over the same pool, independently of the others: its ``top_fraction``
threshold is fitted over every row entering the stage, not over the rows the other rules keep, as
DataComp intersects its baselines (``image_based_intersect_clip_score`` computes the CLIP threshold
over the whole pool, then intersects). The pool is every ``ok`` row that reaches this stage.

``top_fraction`` follows DataComp's ``get_threshold`` (``baselines/apply_filter.py``): with the N
scores of the pool sorted in descending order, ``thr = sorted[int(N * top_fraction)]`` and a row is
kept when ``score >= thr``. So ties at the threshold are all kept, and at least
``int(N * top_fraction) + 1`` rows survive (``int`` truncates the float product, as in DataComp).

NaN and missing scores. DataComp reads the scores with pandas (a null is NaN there), so
``N = len(df)`` counts NaN scores, ``np.sort`` puts them last (below every number), and
``NaN >= thr`` is false: a NaN or missing score counts in the pool size and is never kept. Here too:
such a row counts in N and gets ``filtered_clip`` with the rule ``<column>:nan`` or
``<column>:missing``. Where ``int(N * top_fraction)`` reaches past the scored rows, DataComp's
threshold is NaN (it keeps nothing) or its index is out of range (``top_fraction: 1.0``); here every
scored row is kept (``threshold: null``).

The thresholds are fitted before any row is filtered: ``fit_partial`` collects the scores of a
batch, ``merge`` computes the thresholds from all of them, whatever the batch split or order, and the
executor persists the state as JSON in the run directory:

    {"n": 10000, "kept": 2950, "rules": [{"column": "clip_l14", "top_fraction": 0.3, "min_score": null,
      "max_score": null, "threshold": 0.2513, "n_nan": 0, "n_missing": 0, "kept": 3001}, ...]}

(the single-rule form on ``clip_score`` also carries ``threshold``, ``top_fraction`` and
``min_score`` at the top, which the report draws on the ``clip_score`` histogram). A rejected row
gets ``filtered_clip``, the rule tag of the first rule it fails (in list order; within a rule:
missing, nan, top_fraction, min_score, max_score) in ``rule``, and a reason that starts with it:

    clip_l14:top_fraction clip_l14 0.1234 < 0.2500 (top_fraction 0.3 of 10000)
    clip_score:min_score clip_score 0.1234 < min_score 0.2000
    nsfw:max_score nsfw 0.9100 > max_score 0.5000
    clip_score:nan clip_score is NaN
    clip_score:missing clip_score is missing (null)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from schemas import OK, Status
from stages import score_sketch as sketch_mod
from stages.base import RoleConfig, Stage, StageConfig, set_status

DEFAULT_COLUMN = "clip_score"
_TOP = "top_fraction", "min_score", "max_score"


def _check_bounds(cfg) -> None:
    if cfg.top_fraction is None and cfg.min_score is None and cfg.max_score is None:
        raise ValueError("set 'top_fraction' (e.g. 0.3), 'min_score' (e.g. 0.28) and/or 'max_score'")
    if cfg.min_score is not None and cfg.max_score is not None and cfg.min_score > cfg.max_score:
        raise ValueError(f"min_score {cfg.min_score} > max_score {cfg.max_score}: no row could pass")


class ScoreRule(RoleConfig):
    """One rule of ``rules:``: a score column and its bounds (at least one)."""

    column: str = Field(DEFAULT_COLUMN, min_length=1, description="The score column.")
    columns: list[str] | None = Field(
        None,
        min_length=2,
        description="Instead of `column`: the rule's score is the row-wise maximum of these columns (e.g. "
        "`[clip_score, clip_fused]`: the best caption's score; null and NaN count only where all are); its "
        "tag and state name it `max(a,b)`.",
    )
    top_fraction: float | None = Field(None, gt=0, le=1, description="Keep this top share of the pool.")
    min_score: float | None = Field(None, description="Keep `score >= min_score`.")
    max_score: float | None = Field(None, description="Keep `score <= max_score`.")

    @model_validator(mode="after")
    def _bounds(self):
        _check_bounds(self)
        if self.columns is not None:
            if self.column != DEFAULT_COLUMN and self.column != _max_label(self.columns):
                raise ValueError("give 'column' or 'columns', not both")
            self.column = _max_label(self.columns)
        return self


def _max_label(columns: list[str]) -> str:
    return f"max({','.join(columns)})"


def rule_values(table: pa.Table, column: str, columns: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """(values, null mask) of a rule: its column, or the row-wise maximum of its ``columns``."""
    if not columns:
        return as_float(table, column)
    vals, nulls = zip(*(as_float(table, c) for c in columns))
    stacked = np.vstack(vals)
    best = np.full(table.num_rows, np.nan)
    has = ~np.all(np.isnan(stacked), axis=0)
    best[has] = np.nanmax(stacked[:, has], axis=0)
    return best, np.all(np.vstack(nulls), axis=0)


class ClipFilterConfig(StageConfig):
    column: str = Field(
        DEFAULT_COLUMN,
        min_length=1,
        description="The score column the top-level keys filter on (any numeric "
        "column an earlier stage produces, e.g. `clip_l14` or `nsfw`).",
    )
    top_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Keep this top share of the pool (DataComp's rule: keep score >= "
        "the score at index `int(N * top_fraction)` of the descending sort; NaN and missing scores count in N).",
    )
    min_score: float | None = Field(None, description="Absolute threshold: keep `score >= min_score`.")
    max_score: float | None = Field(
        None, description="Absolute ceiling: keep `score <= max_score` (e.g. an NSFW score)."
    )
    rules: list[ScoreRule] | None = Field(
        None,
        description="Several rules that must all hold, instead of the top-level keys: a list of "
        "`{column, top_fraction, min_score, max_score}` (column default `clip_score`, at least one bound each), "
        "each judged over the whole pool entering the stage, e.g. `[{column: clip_l14, top_fraction: 0.3}, "
        "{column: nsfw, max_score: 0.5}]`.",
    )

    @model_validator(mode="after")
    def _one(self):
        if self.rules is not None:
            set_top = [k for k in _TOP if getattr(self, k) is not None]
            set_top += ["column"] if self.column != DEFAULT_COLUMN else []  # (configs round-trip as JSON)
            if set_top:
                raise ValueError(f"'rules' replaces the top-level keys; move {set_top} into a rule")
            if not self.rules:
                raise ValueError(
                    "'rules' is empty: give at least one {column, top_fraction/min_score/max_score}"
                )
            return self
        _check_bounds(self)
        return self

    def rule_list(self) -> list[ScoreRule]:
        if self.rules is not None:
            return list(self.rules)
        return [ScoreRule(column=self.column, **{k: getattr(self, k) for k in _TOP})]


def datacomp_threshold(scores: np.ndarray, fraction: float) -> float | None:
    """DataComp's rule: the score at index ``int(N * fraction)`` of the descending sort of all N
    scores, NaNs (and missing scores, NaN here) last.

    None when that index is past the scored rows (keep every scored row; see the module doc)."""
    scores = np.asarray(scores, dtype=np.float64)
    n = int(len(scores) * fraction)
    valid = scores[~np.isnan(scores)]
    if n >= len(valid):
        return None
    # Index n of the descending order is index V-1-n of the ascending one; partition is O(N).
    k = len(valid) - 1 - n
    return float(np.partition(valid, k)[k])


def as_float(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64 with NaN where null or not a number, null mask) of ``column``.

    Strings (columns kept by the read stage's ``save_additional_columns``) are parsed; a string that
    is not a number is NaN. A column the table lacks is all null."""
    if column not in table.column_names:
        return np.full(table.num_rows, np.nan), np.ones(table.num_rows, dtype=bool)
    arr = table.column(column).combine_chunks()
    null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        try:
            arr = pc.cast(arr, pa.float64())
        except pa.ArrowInvalid:
            arr = pa.array([_parse(v) for v in arr.to_pylist()], pa.float64())
    elif not (pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type) or pa.types.is_null(arr.type)):
        raise TypeError(f"column '{column}' is {arr.type}, not a number")
    vals = pc.cast(arr, pa.float64()).fill_null(float("nan")).to_numpy(zero_copy_only=False)
    return np.asarray(vals, dtype=np.float64), null


def _parse(v: str | None) -> float | None:
    if v is None:
        return None
    try:
        return float(v)
    except ValueError:
        return float("nan")


def _fmt_pair(a: float, b: float) -> tuple[str, str]:
    """Format two numbers with the fewest decimals (4, 6 or 8) that tell them apart."""
    for d in (4, 6, 8):
        sa, sb = f"{a:.{d}f}", f"{b:.{d}f}"
        if sa != sb:
            break
    return sa, sb


def _passes(vals: np.ndarray, rule: dict[str, Any]) -> np.ndarray:
    ok = ~np.isnan(vals)
    for key, cmp in (
        ("threshold", np.greater_equal),
        ("min_score", np.greater_equal),
        ("max_score", np.less_equal),
    ):
        if rule.get(key) is not None:
            ok &= cmp(vals, rule[key], where=ok, out=np.zeros_like(ok))
    return ok


class ClipFilter(Stage):
    name = "clip_filter"
    Config = ClipFilterConfig
    requires = (DEFAULT_COLUMN,)  # the default; required_columns() names the configured columns
    is_global = True

    def required_columns(self) -> tuple[str, ...]:
        """Every column a rule reads (``clip_score`` only when a rule names it)."""
        return tuple(dict.fromkeys(c for r in self.config.rule_list() for c in (r.columns or [r.column])))

    @property
    def fit_columns(self) -> tuple[str, ...]:  # type: ignore[override] - depends on the config
        return self.required_columns()

    # ---- fit (a reduce in two rounds; see ``stages.score_sketch``) ----------------------------
    @property
    def fit_rounds(self) -> int:  # type: ignore[override] - depends on the config
        """Two rounds when a rule has ``top_fraction`` (sketch, then the rows near the cut); else one."""
        return 2 if any(r.top_fraction is not None for r in self.config.rule_list()) else 1

    def _rule_dumps(self) -> list[dict[str, Any]]:
        """The rules as dicts; a one-column rule's state keeps its earlier shape (no ``columns``)."""
        dumps = [r.model_dump() for r in self.config.rule_list()]
        for d in dumps:
            if d["columns"] is None:
                del d["columns"]
        return dumps

    def fit_partial(self, batch: pa.Table) -> dict[str, Any]:
        """Round 1: counts and a histogram per ``top_fraction`` column; round 2 (the sketch loaded):
        counts of the rows decided by the sketch and the scores in each rule's bracket bin."""
        ok = pc.equal(batch.column("status"), OK).fill_null(False)
        rows = batch.filter(ok)
        cols = {r.column: rule_values(rows, r.column, r.columns) for r in self.config.rule_list()}
        sketch = getattr(self, "_state", None)
        if sketch is not None and sketch.get("round") == 1:
            return sketch_mod.refine_partial(sketch["rules"], cols)
        rules = self._rule_dumps()
        return sketch_mod.first_partial(rules, cols, self.fit_rounds == 1)

    def combine(self, partials: list[dict[str, Any]]) -> dict[str, Any]:
        """Partials of one round folded into one (the executor folds them as they arrive)."""
        return sketch_mod.combine(partials)

    def merge(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        rules = self._rule_dumps()
        sketch = getattr(self, "_state", None)
        if self.fit_rounds == 2 and (sketch is None or sketch.get("round") != 1):
            return sketch_mod.first_merge(rules, sketch_mod.combine(states))
        if self.fit_rounds == 2:
            state = sketch_mod.final_merge(sketch, sketch_mod.combine(states))
        else:
            state = sketch_mod.plain_merge(rules, sketch_mod.combine(states))
        if len(state["rules"]) == 1 and state["rules"][0]["column"] in self.requires:
            state.update({k: state["rules"][0][k] for k in ("threshold", "top_fraction", "min_score")})
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_summary(self, state: dict[str, Any]) -> dict[str, Any]:
        return dict(state)

    # ---- apply ---------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        state = getattr(self, "_state", None)
        if state is None:
            raise RuntimeError(
                "clip_filter: no fitted state; call load_state(merge([fit_partial(...)])) first"
            )
        n = state["n"]
        tags: list[str | None] = [None] * batch.num_rows
        reasons: list[str | None] = [None] * batch.num_rows
        for rule in state["rules"]:
            col = rule["column"]
            vals, null = rule_values(batch, col, rule.get("columns"))
            bad = ~_passes(vals, rule)
            for i in np.flatnonzero(bad):
                if tags[i] is None:
                    tags[i], reasons[i] = _why(col, float(vals[i]), bool(null[i]), rule, n)
        mask = [t is not None for t in tags]
        if any(mask):
            batch = set_status(batch, mask, Status.FILTERED_CLIP, reasons, rule=tags)
        return batch


def _why(col: str, s: float, null: bool, rule: dict[str, Any], n: int) -> tuple[str, str]:
    """(rule tag, reason) of a score that fails ``rule``."""
    if null:
        tag, text = f"{col}:missing", f"{col} is missing (null)"
    elif np.isnan(s):
        tag, text = f"{col}:nan", f"{col} is NaN"
    elif rule["threshold"] is not None and s < rule["threshold"]:
        a, b = _fmt_pair(s, rule["threshold"])
        tag, text = f"{col}:top_fraction", f"{col} {a} < {b} (top_fraction {rule['top_fraction']} of {n})"
    elif rule["min_score"] is not None and s < rule["min_score"]:
        a, b = _fmt_pair(s, rule["min_score"])
        tag, text = f"{col}:min_score", f"{col} {a} < min_score {b}"
    else:
        a, b = _fmt_pair(s, rule["max_score"])
        tag, text = f"{col}:max_score", f"{col} {a} > max_score {b}"
    return tag, f"{tag} {text}"
