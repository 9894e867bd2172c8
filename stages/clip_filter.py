"""CLIP score filter (``clip_filter``), a global stage: DataComp's top fraction of the whole pool,
and/or an absolute minimum score.

``top_fraction`` follows DataComp's ``get_threshold`` (``baselines/apply_filter.py``): with the N
scores of the pool sorted in descending order, ``thr = sorted[int(N * top_fraction)]`` and a row is
kept when ``score >= thr``. So ties at the threshold are all kept, and at least
``int(N * top_fraction) + 1`` rows survive (``int`` truncates the float product, as in DataComp).
Where ``int(N * top_fraction) >= N`` (``top_fraction: 1.0``), DataComp's indexing fails; here every
row is kept. The pool is every ``ok`` row that reaches this stage with a non-null, non-NaN score.

The threshold is fitted before any row is filtered: ``fit_partial`` collects the scores of a
batch, ``merge`` computes the threshold from all of them, whatever the batch split or order, and the
executor persists the state as JSON in the run directory:

    {"threshold": 0.2513, "n": 10000, "top_fraction": 0.3, "min_score": null, "kept": 3001}

``min_score`` is an absolute threshold (keep ``score >= min_score``); with both set, a row must pass
both. Rejected rows get ``filtered_clip`` and a reason with a stable rule tag:

    clip:top_fraction clip_score 0.1234 < 0.2500 (top_fraction 0.3 of 10000)
    clip:min_score clip_score 0.1234 < min_score 0.2000
    clip:nan clip_score is NaN

Rows whose score is null are left as they are (the scoring stage has already given them a status).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from schemas import OK, Status
from stages.base import Stage, StageConfig, set_status


class ClipFilterConfig(StageConfig):
    top_fraction: float | None = Field(
        None, gt=0, le=1, description="Keep this top share of the pool (DataComp's rule: keep score >= "
        "the score at index `int(N * top_fraction)` of the descending sort)."
    )
    min_score: float | None = Field(None, description="Absolute threshold: keep `clip_score >= min_score`.")

    @model_validator(mode="after")
    def _one(self):
        if self.top_fraction is None and self.min_score is None:
            raise ValueError("set 'top_fraction' (e.g. 0.3) and/or 'min_score' (e.g. 0.28)")
        return self


def datacomp_threshold(scores: np.ndarray, fraction: float) -> float | None:
    """DataComp's rule: the score at index ``int(N * fraction)`` of the descending sort.

    None when that index is past the end (keep everything)."""
    n_all = len(scores)
    n = int(n_all * fraction)
    if n >= n_all:
        return None
    # Index n of the descending order is index N-1-n of the ascending one; partition is O(N).
    k = n_all - 1 - n
    return float(np.partition(scores, k)[k])


def _fmt_pair(a: float, b: float) -> tuple[str, str]:
    """Format two numbers with the fewest decimals (4, 6 or 8) that tell them apart."""
    for d in (4, 6, 8):
        sa, sb = f"{a:.{d}f}", f"{b:.{d}f}"
        if sa != sb:
            break
    return sa, sb


class ClipFilter(Stage):
    name = "clip_filter"
    Config = ClipFilterConfig
    requires = ("clip_score",)
    is_global = True
    fit_columns = ("clip_score",)

    # ---- fit -----------------------------------------------------------------------------
    def fit_partial(self, batch: pa.Table) -> np.ndarray:
        """The scores of the batch's ``ok`` rows (float32, nulls and NaNs dropped)."""
        ok = pc.equal(batch.column("status"), OK).fill_null(False)
        scores = pc.drop_null(pc.filter(batch.column("clip_score"), ok)).to_numpy()
        scores = np.asarray(scores, dtype=np.float32)
        return scores[~np.isnan(scores)]

    def merge(self, states: list[np.ndarray]) -> dict[str, Any]:
        cfg = self.config
        parts = [np.asarray(s, dtype=np.float32) for s in states]
        scores = np.concatenate(parts) if parts else np.empty(0, np.float32)
        thr = datacomp_threshold(scores, cfg.top_fraction) if cfg.top_fraction is not None else None
        bars = [x for x in (thr, cfg.min_score) if x is not None]
        # Compare in float64, as ``process`` does (a float32 compare would round min_score).
        kept = int(np.count_nonzero(scores.astype(np.float64) >= max(bars))) if bars else len(scores)
        return {
            "threshold": thr,
            "n": len(scores),
            "top_fraction": cfg.top_fraction,
            "min_score": cfg.min_score,
            "kept": kept,
        }

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
        thr, n, frac = state["threshold"], state["n"], state["top_fraction"]
        min_score = self.config.min_score
        scores = batch.column("clip_score").to_pylist()
        reasons: list[str | None] = []
        rules: list[str | None] = []
        for s in scores:
            reason = rule = None
            if s is None:
                pass
            elif math.isnan(s):
                reason, rule = "clip:nan clip_score is NaN", "clip_score:nan"
            elif thr is not None and s < thr:
                a, b = _fmt_pair(s, thr)
                reason = f"clip:top_fraction clip_score {a} < {b} (top_fraction {frac} of {n})"
                rule = "clip_score:top_fraction"
            elif min_score is not None and s < min_score:
                a, b = _fmt_pair(s, min_score)
                reason = f"clip:min_score clip_score {a} < min_score {b}"
                rule = "clip_score:min_score"
            reasons.append(reason)
            rules.append(rule)
        mask = [r is not None for r in reasons]
        if any(mask):
            batch = set_status(batch, mask, Status.FILTERED_CLIP, reasons, rule=rules)
        return batch
