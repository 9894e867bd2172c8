"""MetaCLIP balancing ("Demystifying CLIP Data", Xu et al. 2023): match captions against the
metadata entries, count the matches of each entry over the whole pool, then keep each row with
probability ``1 - prod_e (1 - p_e)`` over its matched entries, where ``p_e = min(1, t / count_e)``.

Matching (``stages/metaclip_match.py``) follows the reference, ``metaclip1/substr_matching.py``:
an entry matches a caption when ``f" {entry} "`` is a substring of the spaced caption.

Choosing ``t``. An entry seen fewer than ``t`` times is "tail": every row matching it is kept. A
"head" entry seen ``count > t`` times keeps about ``t`` of its rows. So ``t`` sets the trade-off
between a balanced distribution (small ``t``: heads flattened, tail share up, smaller output) and
size (large ``t``: closer to the raw distribution; ``t = inf`` only drops unmatched rows). Counts
grow about linearly with the pool, so to keep the same head/tail split on a bigger pool, scale ``t``
with the pool size; ``state_summary`` reports ``tail_fraction`` (the share of all matches that fall
in tail entries, MetaCLIP's ``t_to_p``) to compare runs. MetaCLIP used t = 20,000 for MetaCLIP-400M
(from a 1.6B pool; "the magic 20k", ``configs/metaclip_data.py``) and t = 170,000 for
MetaCLIP-2.5B, curated from a much larger pool. The reference places balancing after download
(and NSFW/dedup), ``workflows/metaclip_after_download.yaml``; balancing before download saves most
downloads, but rows lost afterwards are not replaced, so raise ``t`` to allow for them (the
reference's advice; ``workflows/metaclip.yaml`` uses t = 30,000). The shapes demo has a few
hundred rows and uses a small ``t`` (tens).

Determinism: a row's uniform draw is derived from ``blake2b(f"{seed}:{key}")``, not from worker
state (the reference uses an unseeded ``random``), so the same seed keeps the same rows whatever
the batch size, worker count or order.

Statuses: a row with no match gets ``filtered_balance`` / ``no metadata match``; a sampled-out row
gets ``filtered_balance`` / ``sampled out: head entry 'photo' (count 123456, row keep p=0.16)``,
naming its most frequent matched entry and the row's keep probability.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from schemas import OK, Status
from stages import metadata as md
from stages.base import Resources, Stage, StageConfig, path_field, replace_column, set_status
from stages.metaclip_match import (  # noqa: F401 - re-exported: stages.balance.Matcher, the reference oracle
    Matcher,
    reference_automaton,
    reference_match,
    reference_spacing,
)

log = logging.getLogger(__name__)


def uniform_draws(keys: list[str], seed: int) -> np.ndarray:
    """One uniform draw in [0, 1) per key, from ``blake2b(f"{seed}:{key}")`` (53-bit mantissa)."""
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
        out[i] = (int.from_bytes(h, "little") >> 11) * (1.0 / (1 << 53))
    return out


def entry_probs(counts: np.ndarray, t: int) -> np.ndarray:
    """``p_e = t / max(count_e, t)`` (the reference raises counts below ``t`` to ``t``)."""
    c = np.asarray(counts, dtype=np.float64)
    return t / np.maximum(c, float(t))


def count_entries(entries: pa.Array | pa.ChunkedArray, num_entries: int) -> np.ndarray:
    """Per-entry counts (uint64) of a ``metaclip_entries`` column, e.g. over the kept rows, to get
    the entry counts after balancing."""
    if isinstance(entries, pa.ChunkedArray):
        entries = entries.combine_chunks()
    flat = pc.list_flatten(entries).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.bincount(flat, minlength=num_entries).astype(np.uint64)


def tail_fraction(counts: np.ndarray, t: int) -> float:
    """Share of all matches that fall in entries with count < t (MetaCLIP's ``t_to_p``)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return float(c[c < t].sum() / total) if total else 0.0


# ---- the stage ----------------------------------------------------------------------------------


class BalanceConfig(StageConfig):
    metadata: str = path_field(
        always=True,
        description="MetaCLIP metadata: a JSON list of entry strings (MetaCLIP's `metadata.json`) or a `.txt` "
        "file with one entry per line."
    )
    t: int = Field(
        20_000, ge=1, description="Per-entry cap: an entry matched count > t times keeps about t of its rows "
        "(20,000 for MetaCLIP-400M; scale with the pool size, see the module docstring)."
    )
    seed: int = Field(0, description="Seeds the per-row draws (derived from seed and key).")
    text_column: str = Field("caption", description="The text column matched against the metadata.")
    entries_column: bool = Field(
        True, description="Add `metaclip_entries` (list<int32>): the matched entry ids per row."
    )
    batch_size: int = Field(
        8192, ge=1, description="Rows per `process` call; each is one matcher (automaton) pass."
    )
    concurrency: int = Field(1, ge=1, description="Matcher actors (each builds the automaton once).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor.")


class Balance(Stage):
    name = "balance"
    Config = BalanceConfig
    requires = ("caption",)
    produces = ("metaclip_entries",)
    is_global = True
    fit_columns = ("caption",)

    def __init__(self, config: BalanceConfig | dict | None = None):
        super().__init__(config)
        self.requires = (self.config.text_column,)
        self.fit_columns = (self.config.text_column,)
        self._entries: list[str] | None = None
        self._fingerprint: str | None = None
        self._matcher: Matcher | None = None
        self._counts: np.ndarray | None = None
        self._probs: np.ndarray | None = None

    # ---- declared behaviour -------------------------------------------------------------------
    def resources(self) -> Resources:
        c = self.config
        return Resources(num_cpus=c.num_cpus, concurrency=c.concurrency, batch_size=c.batch_size, actor=True)

    def output_columns(self) -> dict[str, pa.DataType]:
        return super().output_columns() if self.config.entries_column else {}

    def model_info(self) -> dict[str, Any]:
        entries = self.entries()
        return {
            "metadata": self.config.metadata,
            "metadata_entries": len(entries),
            "metadata_fingerprint": self.fingerprint(),
            "t": self.config.t,
        }

    def entries(self) -> list[str]:
        if self._entries is None:
            self._entries = md.load(self.config.metadata)
            self._fingerprint = md.fingerprint(self._entries)
        return self._entries

    def fingerprint(self) -> str:
        self.entries()
        return self._fingerprint

    def setup(self) -> None:
        self._matcher = Matcher(self.entries())

    # ---- global fit -----------------------------------------------------------------------------
    def fit_partial(self, batch: pa.Table) -> dict[str, Any]:
        """Sparse entry counts of the ``ok`` rows of one batch."""
        self._ensure_setup()
        ok = pc.equal(batch.column("status"), OK).fill_null(False)
        texts = pc.filter(batch.column(self.config.text_column), ok)
        rows, ents = self._matcher.match_pairs(texts)
        ids, counts = np.unique(ents, return_counts=True)
        return {
            "num_entries": self._matcher.num_entries,
            "metadata_fingerprint": self.fingerprint(),
            "pool_rows": len(texts),
            "matched_rows": len(np.unique(rows)),
            "entry_ids": ids.tolist(),
            "entry_counts": counts.tolist(),
        }

    def merge(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """Sum partials (sparse) and states (dense ``counts``) into one JSON state."""
        if states:
            n, fp = states[0]["num_entries"], states[0]["metadata_fingerprint"]
        else:
            n, fp = len(self.entries()), self.fingerprint()
        total = np.zeros(n, dtype=np.uint64)
        pool = matched = 0
        for s in states:
            if s["num_entries"] != n or s["metadata_fingerprint"] != fp:
                raise ValueError("balance: cannot merge entry counts computed with different metadata")
            if "counts" in s:
                total += np.asarray(s["counts"], dtype=np.uint64)
            else:
                np.add.at(
                    total,
                    np.asarray(s["entry_ids"], dtype=np.int64),
                    np.asarray(s["entry_counts"], np.uint64),
                )
            pool += int(s["pool_rows"])
            matched += int(s["matched_rows"])
        return {
            "t": self.config.t,
            "num_entries": n,
            "metadata_fingerprint": fp,
            "pool_rows": pool,
            "matched_rows": matched,
            "counts": total.tolist(),  # Python ints
        }

    def load_state(self, state: dict[str, Any]) -> None:
        entries = self.entries()
        if state["num_entries"] != len(entries) or state["metadata_fingerprint"] != self.fingerprint():
            raise ValueError(
                f"balance: the entry counts were computed with another metadata than {self.config.metadata!r}"
            )
        if state.get("t") != self.config.t:
            log.info("balance: counts fitted with t=%s, applying t=%s", state.get("t"), self.config.t)
        self._counts = np.asarray(state["counts"], dtype=np.uint64)
        self._probs = entry_probs(self._counts, self.config.t)

    def state_summary(self, state: dict[str, Any], top: int = 20) -> dict[str, Any]:
        counts = np.asarray(state["counts"], dtype=np.uint64)
        t = self.config.t
        entries = self.entries() if len(self.entries()) == len(counts) else None
        order = np.argsort(-counts.astype(np.float64), kind="stable")[:top]
        top_entries = [
            {
                "id": int(i),
                "entry": entries[i] if entries is not None else None,
                "count": int(counts[i]),
                "p": round(float(t / max(int(counts[i]), t)), 6),
            }
            for i in order
            if counts[i] > 0
        ]
        return {
            "t": t,
            "num_entries": int(len(counts)),
            "entries_matched": int((counts > 0).sum()),
            "head_entries": int((counts > t).sum()),
            "pool_rows": int(state["pool_rows"]),
            "matched_rows": int(state["matched_rows"]),
            "tail_fraction": round(tail_fraction(counts, t), 6),
            "expected_matches_after": int(np.minimum(counts, np.uint64(t)).sum()),
            "top_entries": top_entries,
        }

    # ---- apply ----------------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        if self._probs is None:  # a wiring error, not a bad row: fail loudly
            raise RuntimeError("balance: load_state() must run before the stage is applied")
        return super().__call__(batch)

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        rows, ents = self._matcher.match_pairs(batch.column(self.config.text_column))
        offsets = np.searchsorted(rows, np.arange(n + 1))
        matched = offsets[1:] > offsets[:-1]
        keep_p = np.zeros(n, dtype=np.float64)
        if len(ents):
            starts = offsets[:-1][matched]
            keep_p[matched] = 1.0 - np.multiply.reduceat(1.0 - self._probs[ents], starts)
        keep = matched.copy()
        maybe = np.flatnonzero(matched & (keep_p < 1.0))
        if len(maybe):
            keys = batch.column("key").take(pa.array(maybe)).to_pylist()
            keep[maybe] = uniform_draws(keys, self.config.seed) < keep_p[maybe]
        reasons = np.full(n, "no metadata match", dtype=object)
        rules = np.where(matched, "balance:sampled_out", "balance:no_match").astype(object)
        out_rows = np.flatnonzero(matched & ~keep)
        if len(out_rows):
            # The most frequent entry of each row: sort pairs by row, count (desc), entry id.
            order = np.lexsort((ents, -self._counts[ents].astype(np.int64), rows))
            heads = ents[order[offsets[out_rows]]]
            entries = self.entries()
            reasons[out_rows] = [
                f"sampled out: head entry {entries[h][:80]!r} (count {int(self._counts[h])}, row keep p={p:.3g})"
                for h, p in zip(heads.tolist(), keep_p[out_rows].tolist())
            ]
        out = set_status(
            batch, pa.array(~keep), Status.FILTERED_BALANCE, reasons.tolist(), rule=rules.tolist()
        )
        if self.config.entries_column:
            list_offsets = pa.array(offsets.astype(np.int32))
            out = replace_column(
                out, "metaclip_entries", pa.ListArray.from_arrays(list_offsets, ents.astype(np.int32))
            )
        return out
