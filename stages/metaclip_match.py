"""MetaCLIP's substring matching of captions against metadata entries (used by ``stages.balance``).

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
"""

from __future__ import annotations

import gc
import operator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    """Whether the spaced entry ``pattern`` (``f" {entry} "``, or MetaCLIP 2's partly padded
    form, ``stages.langmeta``) can be a substring of any spaced text: a spaced text has no
    tab/CR/LF, and each of its punctuation marks has a space on both sides (it was wrapped, and
    the text is padded); at the pattern's own ends the neighbour lies outside it."""
    if not pattern or any(c in pattern for c in CHARS_TO_SPACE):
        return False
    last = len(pattern) - 1
    for i, ch in enumerate(pattern):
        if ch in PUNCT_TO_WRAP and (
            (i > 0 and pattern[i - 1] != " ") or (i < last and pattern[i + 1] != " ")
        ):
            return False
    return True


class Matcher:
    """Match whole Arrow string columns against metadata entries (ids = list positions).

    Entries that appear more than once in the list all match (the definition is "``f' {e} '`` is
    a substring"); pyahocorasick's ``add_word`` would keep only the last id of a repeated string.
    """

    def __init__(self, entries: list[str], spaced: list[str] | None = None):
        """``spaced``: the pattern of each entry (default ``f" {entry} "``, MetaCLIP 1's)."""
        import ahocorasick_rs

        self.num_entries = len(entries)
        if spaced is None:
            spaced = [f" {entry} " for entry in entries]
        elif len(spaced) != len(entries):
            raise ValueError("Matcher: one spaced pattern per entry")
        by_pattern: dict[bytes, list[int]] = {}
        for idx, pattern in enumerate(spaced):
            if not can_match(pattern):
                continue
            try:
                pat = pattern.encode()
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
