"""MetaCLIP balancing ("Demystifying CLIP Data", Xu et al. 2023): match captions against the
metadata entries, count the matches of each entry over the whole pool, then keep each row with
probability ``1 - prod_e (1 - p_e)`` over its matched entries, where ``p_e = min(1, t / count_e)``.

Matching follows the reference (facebookresearch/MetaCLIP ``metaclip/metaclip1/substr_matching.py``):
the text is padded as ``f" {text} "``, each of ``, . ; : ? ! ``` gets a space on both sides, tab,
CR and LF become spaces, and entry ``e`` matches when ``f" {e} "`` is a substring of the result.
Case-sensitive, no other normalisation. An entry counts at most once per text; overlapping and
nested matches all count ("a red car" matches "red", "car" and "red car").

``Matcher`` does this for a whole Arrow column at once: the punctuation is spaced by one
``pyarrow.compute.replace_substring_regex`` over the column and tab/CR/LF by a byte table lookup,
then ONE Aho-Corasick pass (``ahocorasick_rs``, built once per worker) runs over the bytes of all
texts of the batch joined with ``"\\n"``, and numpy maps match offsets back to rows. Entries that
can never match a spaced text (one holding tab/CR/LF, or punctuation without a space on both sides,
such as "St. Louis") are left out of the automaton; so no pattern holds the ``"\\n"`` separator. ``reference_match`` is a
faithful per-text implementation of the reference, kept as the oracle of the tests and of
``bench/match.py``.

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

import gc
import hashlib
import logging
import operator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from schemas import OK, Status
from stages import metadata as md
from stages.base import Resources, Stage, StageConfig, path_field, replace_column, set_status

log = logging.getLogger(__name__)

PUNCT_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
CHARS_TO_SPACE = ("\t", "\n", "\r")
_PUNCT_RE = r"([,.;:?!`])"
_SEP = b"\n"  # joins texts in one haystack; never inside a pattern that can match
_SPACE_LUT = np.arange(256, dtype=np.uint8)  # byte -> byte: tab, LF, CR -> space
_SPACE_LUT[[ord(c) for c in CHARS_TO_SPACE]] = ord(" ")
_first = operator.itemgetter(0)
_second = operator.itemgetter(1)


# ---- the reference, per text (oracle for tests and bench) ------------------------------------


def reference_spacing(text: str) -> str:
    """The reference's ``spacing``: pad, wrap punctuation in spaces, turn tab/CR/LF into spaces."""
    spaced = f" {text} "
    for p in PUNCT_TO_WRAP:
        spaced = spaced.replace(p, f" {p} ")
    for c in CHARS_TO_SPACE:
        spaced = spaced.replace(c, " ")
    return spaced


def reference_automaton(entries: list[str]):
    """A pyahocorasick automaton of the spaced entries, as the reference builds it."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for idx, entry in enumerate(entries):
        automaton.add_word(f" {entry} ", (idx, entry))
    automaton.make_automaton()
    return automaton


def reference_match(texts: list[str | None], automaton) -> list[list[int]]:
    """Per text: spacing, ``automaton.iter``, a set of entry ids (sorted here, for comparison)."""
    out = []
    for text in texts:
        ids: set[int] = set()
        if text is not None:
            for _end, (entry_id, _entry) in automaton.iter(reference_spacing(text)):
                ids.add(entry_id)
        out.append(sorted(ids))
    return out


# ---- the column matcher ------------------------------------------------------------------------


def can_match(pattern: str) -> bool:
    """Whether the spaced entry ``pattern`` (``f" {entry} "``) can be a substring of any spaced
    text: a spaced text has no tab/CR/LF, and each of its punctuation marks has a space on both
    sides (it was wrapped, and the text is padded)."""
    if any(c in pattern for c in CHARS_TO_SPACE):
        return False
    for i, ch in enumerate(pattern):
        if ch in PUNCT_TO_WRAP and (pattern[i - 1] != " " or pattern[i + 1] != " "):
            return False
    return True


class Matcher:
    """Match whole Arrow string columns against metadata entries (ids = list positions).

    Entries that appear more than once in the list all match (the definition is "``f' {e} '`` is
    a substring"); pyahocorasick's ``add_word`` would keep only the last id of a repeated string.
    """

    def __init__(self, entries: list[str]):
        import ahocorasick_rs

        self.num_entries = len(entries)
        by_pattern: dict[bytes, list[int]] = {}
        for idx, entry in enumerate(entries):
            spaced = f" {entry} "
            if not can_match(spaced):
                continue
            try:
                pat = spaced.encode()
            except UnicodeEncodeError:  # lone surrogates: not in any Arrow (UTF-8) text
                continue
            by_pattern.setdefault(pat, []).append(idx)
        patterns = list(by_pattern)
        ids = list(by_pattern.values())
        self._ptr = np.zeros(len(ids) + 1, dtype=np.int64)
        self._ptr[1:] = np.cumsum([len(v) for v in ids])
        self._ids = np.fromiter((i for v in ids for i in v), dtype=np.int64, count=int(self._ptr[-1]))
        self._unique = len(self._ids) == len(ids)
        self._ac = (
            ahocorasick_rs.BytesAhoCorasick(
                patterns,
                matchkind=ahocorasick_rs.MatchKind.Standard,
                implementation=ahocorasick_rs.Implementation.ContiguousNFA,
            )
            if patterns
            else None
        )

    def match_pairs(self, column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """All (row, entry id) matches of ``column``: two int64 arrays, sorted by row then entry,
        each pair once. Null texts match nothing."""
        empty = np.zeros(0, dtype=np.int64)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        if len(column) == 0 or self._ac is None:
            return empty, empty
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = column.cast(pa.string())
        spaced = _space_controls(pc.replace_substring_regex(column, _PUNCT_RE, r" \1 "))
        # Each text becomes " {spaced} \n"; one haystack holds them all.
        typ = spaced.type
        joined = pc.binary_join_element_wise(
            pa.scalar(" ", typ), spaced, pa.scalar(" " + _SEP.decode(), typ), pa.scalar("", typ)
        )
        offsets, haystack = _offsets_and_data(joined)
        if haystack is None:
            return empty, empty
        # The automaton returns one (pattern, start, end) tuple per match. They are acyclic and
        # freed right away: pausing the cyclic GC saves collections of the whole heap that the
        # burst of allocations would otherwise trigger.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            found = self._ac.find_matches_as_indexes(haystack, overlapping=True)
            pat = np.fromiter(map(_first, found), dtype=np.int64, count=len(found))
            start = np.fromiter(map(_second, found), dtype=np.int64, count=len(found))
            del found
        finally:
            if gc_was_enabled:
                gc.enable()
        if len(pat) == 0:
            return empty, empty
        rows = np.searchsorted(offsets, start + offsets[0], side="right") - 1
        if self._unique:
            ents = self._ids[pat]
        else:  # a repeated entry string: every id of it matches
            reps = self._ptr[pat + 1] - self._ptr[pat]
            rows = np.repeat(rows, reps)
            first = np.repeat(self._ptr[pat], reps)
            within = np.arange(len(first)) - np.repeat(np.cumsum(reps) - reps, reps)
            ents = self._ids[first + within]
        flat = np.sort(rows * self.num_entries + ents)
        flat = flat[np.concatenate(([True], flat[1:] != flat[:-1]))]  # each (row, entry) once
        return flat // self.num_entries, flat % self.num_entries

    def match(self, column: pa.Array | pa.ChunkedArray) -> pa.ListArray:
        """Entry ids per row, as ``list<int32>`` (sorted; empty list for no match or null text)."""
        rows, ents = self.match_pairs(column)
        offsets = np.searchsorted(rows, np.arange(len(column) + 1)).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ents.astype(np.int32)))


# ---- helpers ------------------------------------------------------------------------------------


def _offsets_and_data(arr: pa.Array) -> tuple[np.ndarray, memoryview | None]:
    """The offsets (numpy) and the bytes they index (a memoryview from offsets[0] to offsets[-1],
    None when empty) of a string / large_string array."""
    off_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, dtype=off_type)[arr.offset : arr.offset + len(arr) + 1]
    if data_buf is None or offsets[-1] == offsets[0]:
        return offsets, None
    return offsets, memoryview(data_buf).cast("B")[int(offsets[0]) : int(offsets[-1])]


def _space_controls(arr: pa.Array) -> pa.Array:
    """Tab, LF and CR -> space, as one byte-for-byte table lookup over the values buffer (they are
    ASCII, so UTF-8 stays valid and offsets do not move). ``arr`` is a fresh kernel output, so
    its buffer holds no bytes of other rows."""
    validity, off_buf, data_buf = arr.buffers()
    if data_buf is None:
        return arr
    spaced = _SPACE_LUT[np.frombuffer(data_buf, dtype=np.uint8)]
    return pa.Array.from_buffers(
        arr.type, len(arr), [validity, off_buf, pa.py_buffer(spaced)], arr.null_count, arr.offset
    )


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

    def required_columns(self) -> tuple[str, ...]:
        return (self.config.text_column,)

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
        out = set_status(batch, pa.array(~keep), Status.FILTERED_BALANCE, reasons.tolist())
        if self.config.entries_column:
            list_offsets = pa.array(offsets.astype(np.int32))
            out = replace_column(
                out, "metaclip_entries", pa.ListArray.from_arrays(list_offsets, ents.astype(np.int32))
            )
        return out
