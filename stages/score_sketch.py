"""``clip_filter``'s exact DataComp threshold from a bounded state, in two reduce rounds.

Round 1 (``first_partial``/``combine``/``first_merge``): counts (pool size, NaN and missing scores)
and, per ``top_fraction`` column, a histogram of the valid scores over ``2**BITS`` fixed bins of the
float64 order: a score's bin is the top ``BITS`` bits of its order-preserving 64-bit key (sign, the
11 exponent bits and ``BITS - 12`` mantissa bits), so the bins need no range, merge by adding counts
and order like the scores. The threshold is the score at ascending index ``k = V - 1 - int(N *
top_fraction)`` of the V valid scores: the cumulative counts give the bin that holds it and its rank
``k - (scores in lower bins)`` inside that bin (the *bracket*).

Round 2 (``refine_partial``/``combine``/``final_merge``), on workers that loaded round 1's state:
every row is decided by the bracket (a score above the bin passes, below fails) except the rows
whose score falls in the bracket bin; only those scores travel (with, for the joint count, the
scores of rows still undecided). The threshold is the bracket's sorted scores at that rank: exactly
the value ``datacomp_threshold`` picks over every score, so the kept rows are DataComp's.

State: O(non-empty bins) in round 1 (at most ``2**BITS``; a few thousand for scores spanning a few
powers of two), O(rows in the bracket bin) in round 2: about N / (1024 per power of two of the
scores' range) rows, e.g. ~10^4 for 10M CLIP scores. Partials are folded as they arrive, so the
driver holds one of each, not one per shard.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BITS = 22  # 1 sign + 11 exponent + 10 mantissa bits: 1024 bins per power of two
_TOP = np.uint64(1 << 63)


def bins_of(vals: np.ndarray) -> np.ndarray:
    """The histogram bin of each (non-NaN) float64 score (-0.0 is 0.0)."""
    bits = (np.asarray(vals, np.float64) + 0.0).view(np.uint64)
    key = np.where(bits >= _TOP, ~bits, bits | _TOP)
    return (key >> np.uint64(64 - BITS)).astype(np.int64)


def _hist(b: np.ndarray, c: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    u, inv = np.unique(b, return_inverse=True)
    counts = np.zeros(len(u), np.int64)
    np.add.at(counts, inv, 1 if c is None else c)
    return u, counts


def _minmax_ok(vals: np.ndarray, rule: dict[str, Any]) -> np.ndarray:
    ok = ~np.isnan(vals)
    if rule.get("min_score") is not None:
        ok &= np.greater_equal(vals, rule["min_score"], where=ok, out=np.zeros_like(ok))
    if rule.get("max_score") is not None:
        ok &= np.less_equal(vals, rule["max_score"], where=ok, out=np.zeros_like(ok))
    return ok


def _counts(cols: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    n = len(next(iter(cols.values()))[0]) if cols else 0
    return {
        "n": n,
        "missing": {c: int(null.sum()) for c, (v, null) in cols.items()},
        "nan": {c: int(np.isnan(v).sum()) for c, (v, null) in cols.items()},
    }


def first_partial(rules: list[dict], cols: dict, final: bool) -> dict[str, Any]:
    """Round 1 of one batch (``cols``: column -> (float64 scores, null mask), ``as_float``). With no
    ``top_fraction`` rule (``final``), the rules' pass counts are exact already."""
    out = _counts(cols)
    out["hist"] = {}
    for r in rules:
        if r["top_fraction"] is not None and r["column"] not in out["hist"]:
            v = cols[r["column"]][0]
            out["hist"][r["column"]] = _hist(bins_of(v[~np.isnan(v)]))
    if final:
        passes = [_minmax_ok(cols[r["column"]][0], r) for r in rules]
        out["kept_rule"] = [int(p.sum()) for p in passes]
        out["kept"] = int(np.logical_and.reduce(passes).sum()) if passes else out["n"]
    return out


def refine_partial(rules: list[dict], cols: dict) -> dict[str, Any]:
    """Round 2 of one batch; ``rules``: round 1's state (with each rule's ``bin``)."""
    n = len(next(iter(cols.values()))[0]) if cols else 0
    fail = np.zeros(n, bool)
    undecided = np.zeros((n, len(rules)), np.float64)
    undecided[:] = np.nan
    out: dict[str, Any] = {"decided_rule": [], "inbin": [], "inbin_ok": []}
    for i, r in enumerate(rules):
        v = cols[r["column"]][0]
        ok = _minmax_ok(v, r)
        if r.get("bin") is None:  # no cut on this rule (none, or every scored row passes)
            out["decided_rule"].append(int(ok.sum()))
            out["inbin"].append(np.empty(0))
            out["inbin_ok"].append(np.empty(0, bool))
            fail |= ~ok
            continue
        valid = ~np.isnan(v)
        b = np.full(n, -1, np.int64)
        b[valid] = bins_of(v[valid])
        above, inbin = valid & (b > r["bin"]), valid & (b == r["bin"])
        out["decided_rule"].append(int((ok & above).sum()))
        out["inbin"].append(v[inbin])
        out["inbin_ok"].append(ok[inbin])
        fail |= ~(ok & (above | inbin))
        undecided[ok & inbin, i] = v[ok & inbin]
    open_ = ~fail & ~np.isnan(undecided).all(axis=1) if n else np.zeros(0, bool)
    out["joint"] = int((~fail & ~open_).sum())
    out["open"] = undecided[open_]
    return out


def combine(partials: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One partial of a round from several (sums, merged histograms, concatenated bracket scores)."""
    ps = [p for p in partials if p is not None]
    if not ps:
        return None
    if len(ps) == 1:
        return ps[0]
    if "hist" in ps[0]:
        out = {
            "n": sum(p["n"] for p in ps),
            "missing": {c: sum(p["missing"][c] for p in ps) for c in ps[0]["missing"]},
            "nan": {c: sum(p["nan"][c] for p in ps) for c in ps[0]["nan"]},
            "hist": {},
        }
        for c in ps[0]["hist"]:
            out["hist"][c] = _hist(
                np.concatenate([p["hist"][c][0] for p in ps]), np.concatenate([p["hist"][c][1] for p in ps])
            )
        if "kept" in ps[0]:
            out["kept_rule"] = [sum(x) for x in zip(*(p["kept_rule"] for p in ps))]
            out["kept"] = sum(p["kept"] for p in ps)
        return out
    k = len(ps[0]["inbin"])
    return {
        "decided_rule": [sum(x) for x in zip(*(p["decided_rule"] for p in ps))],
        "inbin": [np.concatenate([p["inbin"][i] for p in ps]) for i in range(k)],
        "inbin_ok": [np.concatenate([p["inbin_ok"][i] for p in ps]) for i in range(k)],
        "joint": sum(p["joint"] for p in ps),
        "open": np.concatenate([p["open"] for p in ps]),
    }


def _empty_counts(rules: list[dict]) -> dict[str, Any]:
    cols = list(dict.fromkeys(r["column"] for r in rules))
    return {"n": 0, "missing": dict.fromkeys(cols, 0), "nan": dict.fromkeys(cols, 0), "hist": {}}


def _rule_out(r: dict, p: dict, threshold, kept: int) -> dict[str, Any]:
    col = r["column"]
    base = {k: r[k] for k in ("column", "columns", "top_fraction", "min_score", "max_score") if k in r}
    return {**base, "threshold": threshold, "n_nan": p["nan"][col] - p["missing"][col],
            "n_missing": p["missing"][col], "kept": kept}  # fmt: skip


def plain_merge(rules: list[dict], p: dict | None) -> dict[str, Any]:
    """The final state when no rule has ``top_fraction`` (one round)."""
    if p is None:
        p = {**_empty_counts(rules), "kept_rule": [0] * len(rules), "kept": 0}
    out = [_rule_out(r, p, None, p["kept_rule"][i]) for i, r in enumerate(rules)]
    return {"n": p["n"], "kept": p["kept"], "rules": out}


def first_merge(rules: list[dict], p: dict | None) -> dict[str, Any]:
    """Round 1's state: the counts and each ``top_fraction`` rule's bracket (``bin``, ``rank``)."""
    p = p or _empty_counts(rules)
    out = []
    for r in rules:
        r = {k: r[k] for k in ("column", "top_fraction", "min_score", "max_score")}
        r["bin"] = r["rank"] = None
        if r["top_fraction"] is not None:
            col = r["column"]
            valid = p["n"] - p["nan"][col]
            idx = int(p["n"] * r["top_fraction"])
            if idx < valid:  # else: DataComp keeps nothing / overflows; every scored row is kept here
                k = valid - 1 - idx
                bins, counts = p["hist"][col]
                cum = np.cumsum(counts)
                j = int(np.searchsorted(cum, k, side="right"))
                r["bin"], r["rank"] = int(bins[j]), int(k - (cum[j - 1] if j else 0))
        out.append(r)
    return {"round": 1, "n": p["n"], "missing": p["missing"], "nan": p["nan"], "rules": out}


def final_merge(sketch: dict[str, Any], p: dict | None) -> dict[str, Any]:
    """The final state from round 1's ``sketch`` and round 2's combined partial ``p``."""
    rules = sketch["rules"]
    if p is None:
        p = {"decided_rule": [0] * len(rules), "inbin": [np.empty(0)] * len(rules),
             "inbin_ok": [np.empty(0, bool)] * len(rules), "joint": 0, "open": np.empty((0, len(rules)))}  # fmt: skip
    thr = [None] * len(rules)
    out = []
    for i, r in enumerate(rules):
        kept = p["decided_rule"][i]
        if r["bin"] is not None:
            thr[i] = float(np.sort(p["inbin"][i])[r["rank"]]) + 0.0
            kept += int((p["inbin"][i][p["inbin_ok"][i]] >= thr[i]).sum())
        out.append(_rule_out(r, sketch, thr[i], kept))
    opened = p["open"]
    joint = p["joint"]
    if len(opened):
        t = np.array([-np.inf if x is None else x for x in thr])
        joint += int((np.isnan(opened) | (opened >= t)).all(axis=1).sum())
    return {"n": sketch["n"], "kept": joint, "rules": out}
