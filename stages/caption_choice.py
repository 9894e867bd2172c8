"""The training caption of each sample (``write.caption_choice``), and the column recording its kind.

* ``original``: the alt-text (``caption``);
* ``recap``: the VLM caption (``caption_recap``);
* ``fused``: the fused caption (``caption_fused``);
* ``mix``: per sample, the generated caption (``caption_fused`` where present, else ``caption_recap``)
  with probability ``mix_p``, else the alt-text, as Recap-DataComp-1B mixes recaptions with the
  originals (its p = 0.8). The draw is seeded by ``mix_seed`` and the sample's key only, so a rerun and
  a resumed run make the same choices whatever the batching.

Where the chosen kind is null or empty (its generation failed), the sample falls back to the next
kind (fused -> recap -> original). ``caption_kind`` records what ``KEY.txt`` holds; every caption
kind stays in the sample's ``.json`` and in the Parquet.
"""

from __future__ import annotations

import pyarrow as pa

from stages.rewrite.prompt import seed_of

KIND_COLUMN = "caption_kind"
COLUMNS = {"original": "caption", "recap": "caption_recap", "fused": "caption_fused"}
FALLBACK = {
    "original": ("original",),
    "recap": ("recap", "original"),
    "fused": ("fused", "recap", "original"),
}


def mix_draw(key: str, seed: int) -> float:
    """A uniform number in [0, 1) from the sample's key and the seed (stable across processes)."""
    return seed_of("caption_mix", seed, key) / 2**31


def choose(rows: pa.Table, choice: str, mix_p: float = 0.8, mix_seed: int = 0) -> list[str]:
    """The caption kind of each row (``original`` | ``recap`` | ``fused``) after fallbacks."""
    n = rows.num_rows
    cols = {
        k: rows.column(c).to_pylist() if c in rows.column_names else [None] * n for k, c in COLUMNS.items()
    }
    keys = [str(k) for k in rows.column("key").to_pylist()]
    kinds = []
    for i in range(n):
        want = choice
        if choice == "mix":
            want = "fused" if mix_draw(keys[i], mix_seed) < mix_p else "original"
        kinds.append(next((k for k in FALLBACK[want] if cols[k][i]), "original"))
    return kinds


def annotate(rows: pa.Table, choice: str | None, mix_p: float = 0.8, mix_seed: int = 0) -> pa.Table:
    """``rows`` with ``caption_kind`` (null on rows that are not ``ok``); unchanged when ``choice`` is None."""
    if choice is None:
        return rows
    status = rows.column("status").to_pylist()
    kinds = [k if st == "ok" else None for k, st in zip(choose(rows, choice, mix_p, mix_seed), status)]
    arr = pa.array(kinds, pa.string())
    if KIND_COLUMN in rows.column_names:
        return rows.set_column(rows.column_names.index(KIND_COLUMN), KIND_COLUMN, arr)
    return rows.append_column(KIND_COLUMN, arr)


def caption_text(meta: dict) -> str:
    """The training caption of one sample's metadata (after ``annotate``)."""
    return meta.get(COLUMNS.get(meta.get(KIND_COLUMN) or "original", "caption")) or meta.get("caption") or ""
