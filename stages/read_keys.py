"""Sample keys taken from an input column (``read.key_col``, e.g. DataComp's ``uid``), and the types of
the columns ``save_additional_columns`` carries. No Ray.

A key names a sample's members in its tar (``KEY.jpg``, ``KEY.txt``, ``KEY.json``) and joins rows
between stages, so each key must be present (not null, not empty), free of dots (webdataset cuts a
member name at its first dot: ``a.b.jpg`` is key ``a``), of slashes and backslashes (folders in the
tar), at most ``MAX_KEY_BYTES`` bytes in UTF-8 (a USTAR member name holds 100 bytes, suffix included),
and unique within the run.

``KeyCheck`` checks a stream of key batches keeping 8 bytes per key (a 64-bit hash); when two hashes
are equal it reads the keys again to name the duplicate and the rows and files where it appears (or
to find that two different keys merely share a hash).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_KEY_BYTES = 80  # + ".rewrite12.txt" stays under USTAR's 100-byte member name


class BadKey(ValueError):
    """A bad key: ``str(err)`` is the problem in one line (without the read key it concerns)."""


class TypeConflict(ValueError):
    """A carried column whose values in a later file do not convert to its type: one line."""


def _hash(keys: pa.Array) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(np.asarray(keys.to_numpy(zero_copy_only=False), dtype=object), categorize=False)


def _row(first_row: int, i: int) -> int:
    return first_row + i + 1  # rows are counted from 1, data rows only (a header is not a row)


class KeyCheck:
    """Feed it ``add(keys, file, first_row)`` for every batch of keys of the input, in order, then
    ``finish(rescan)``; each raises ``BadKey`` naming the key, its column, the file and the row."""

    def __init__(self, col: str, shown: Callable[[str], str] = str):
        self.col = col
        self.shown = shown  # how a file is named in messages
        self._hashes: list[np.ndarray] = []

    def add(self, keys: pa.Array, path: str, first_row: int) -> None:
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        if not len(keys):
            return
        problems = (
            (pc.is_null(keys), "is null"),
            (pc.equal(pc.utf8_length(keys), 0), "is empty"),
            (pc.match_substring(keys, "."), "has a dot (webdataset splits member names at the first dot)"),
            (pc.or_(pc.match_substring(keys, "/"), pc.match_substring(keys, "\\")), "has a slash"),
            (pc.greater(pc.binary_length(keys), MAX_KEY_BYTES), f"is longer than {MAX_KEY_BYTES} bytes"),
        )
        for mask, what in problems:
            hit = pc.index(mask.fill_null(False), True).as_py()
            if hit >= 0:
                raise BadKey(
                    f"the key in column '{self.col}' {what}: {keys[hit].as_py()!r} "
                    f"(row {_row(first_row, hit)} of {self.shown(path)})"
                )
        self._hashes.append(_hash(keys))

    def finish(self, rescan: Callable[[], Iterable[tuple[pa.Array, str, int]]]) -> None:
        """Check that the keys added are unique; ``rescan()`` yields the same batches again (only
        called when two keys share a hash)."""
        if not self._hashes:
            return
        h = np.sort(np.concatenate(self._hashes))
        self._hashes = []
        suspects = np.unique(h[1:][h[1:] == h[:-1]])
        if not suspects.size:
            return
        seen: dict[str, tuple[str, int]] = {}
        for keys, path, first_row in rescan():
            if isinstance(keys, pa.ChunkedArray):
                keys = keys.combine_chunks()
            for i in np.nonzero(np.isin(_hash(keys), suspects))[0].tolist():
                k = keys[i].as_py()
                where = (path, _row(first_row, i))
                if k in seen:
                    (p0, r0), (p1, r1) = seen[k], where
                    at = (
                        f"rows {r0} and {r1} of {self.shown(p1)}"
                        if p0 == p1
                        else f"row {r0} of {self.shown(p0)} and row {r1} of {self.shown(p1)}"
                    )
                    raise BadKey(
                        f"duplicate key {k!r} in column '{self.col}': {at}; keys must be unique within the run"
                    )
                seen[k] = where
        # only different keys that share a 64-bit hash: the keys are unique


class ColumnTypes:
    """The Arrow type of each column carried by ``save_additional_columns``, fixed by the first batch in
    which it is not all null; later batches are cast to it (an input shard's Parquet, the output's and
    the tar json then agree from shard to shard). A batch whose values do not convert raises
    ``TypeConflict`` naming the column, both types and the file."""

    def __init__(self, columns: list[str], shown: Callable[[str], str] = str):
        self.columns = columns
        self.shown = shown
        self.types: dict[str, pa.DataType] = {}

    def fix(self, t: pa.Table, path: str) -> pa.Table:
        for name in self.columns:
            if name not in t.column_names:
                continue
            col = t.column(name)
            want = self.types.get(name)
            if want is None:
                if not pa.types.is_null(col.type):
                    self.types[name] = col.type
                continue
            if col.type == want:
                continue
            try:
                col = col.cast(want)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise TypeConflict(
                    f"column '{name}' is {want} in the rows read first but {col.type} in "
                    f"{self.shown(path)}, whose values do not convert to {want}; give it one type in every file"
                ) from None
            t = t.set_column(t.column_names.index(name), name, col)
        return t
