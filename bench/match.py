"""MetaCLIP matching speed: our column matcher vs a faithful implementation of the reference.

    .venv/bin/python bench/match.py [--metadata metadata.json] [--captions PATH] [--copies 4]

The reference (facebookresearch/MetaCLIP ``metaclip1/substr_matching_ahocorasick.py``) spaces each
text in Python and runs ``automaton.iter`` over it with pyahocorasick, collecting a set of entry
ids per text. Ours (``stages.metaclip_match.Matcher``) spaces the whole Arrow column with
pyarrow.compute and runs one ahocorasick_rs pass per batch. Both get the same captions (the real
alt-texts of ../shared/data/alt_texts_8k.parquet, repeated ``--copies`` times) and the same
metadata (default: the offline WordNet + wordfreq build, >= 100k entries). The outputs are
asserted identical; the figures are texts/s, the median of ``--rounds`` interleaved rounds.
Run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages import metadata as md  # noqa: E402
from stages.metaclip_match import Matcher, reference_automaton, reference_match  # noqa: E402
from tests.shared_data import shared_data_dir  # noqa: E402


def shared_data(name: str) -> Path:
    path = shared_data_dir() / name
    if not path.is_file():
        sys.exit(f"{path} not found (set CLIPCURATE_SHARED_DATA to the folder holding {name})")
    return path


def ours(matcher: Matcher, column: pa.Array, batch_size: int) -> list[pa.ListArray]:
    return [matcher.match(column.slice(s, batch_size)) for s in range(0, len(column), batch_size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--metadata", help="metadata.json / .txt (default: build from WordNet + wordfreq)")
    ap.add_argument("--captions", help="parquet with a 'caption' column (default: alt_texts_8k)")
    ap.add_argument("--copies", type=int, default=4, help="repeat the captions this many times")
    ap.add_argument("--batch-size", type=int, default=8192, help="rows per matcher call (the stage's)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    entries = md.load(args.metadata) if args.metadata else md.build()
    captions_path = Path(args.captions) if args.captions else shared_data("alt_texts_8k.parquet")
    column = pq.read_table(captions_path, columns=["caption"]).column("caption").combine_chunks()
    column = pa.concat_arrays([column] * args.copies)
    texts = column.to_pylist()
    print(f"{len(entries):,} metadata entries, {len(texts):,} captions, batch size {args.batch_size}")

    t0 = time.perf_counter()
    automaton = reference_automaton(entries)
    t1 = time.perf_counter()
    matcher = Matcher(entries)
    t2 = time.perf_counter()
    print(f"build: reference (pyahocorasick) {t1 - t0:.2f} s, ours (ahocorasick_rs) {t2 - t1:.2f} s")

    expected = reference_match(texts, automaton)
    got = [ids for part in ours(matcher, column, args.batch_size) for ids in part.to_pylist()]
    assert got == expected, "matchers disagree"
    n_matches = sum(map(len, expected))
    print(f"identical outputs: {len(texts):,} texts, {n_matches:,} (text, entry) matches")
    # Give the reference its best case: no bench leftovers for the cyclic GC to walk.
    del expected, got, texts
    gc.collect()
    gc.freeze()

    # Both start from the same Arrow column (the reference converts it to Python strings).
    timings: dict[str, dict[str, list[float]]] = {
        "reference": {"cpu": [], "wall": []},
        "ours": {"cpu": [], "wall": []},
    }
    runs = {
        "reference": lambda: reference_match(column.to_pylist(), automaton),
        "ours": lambda: ours(matcher, column, args.batch_size),
    }
    for _ in range(args.rounds):
        for name, fn in runs.items():
            c, w = time.process_time(), time.perf_counter()
            fn()
            timings[name]["cpu"].append(time.process_time() - c)
            timings[name]["wall"].append(time.perf_counter() - w)
    for clock in ("cpu", "wall"):
        ref = len(column) / statistics.median(timings["reference"][clock])
        our = len(column) / statistics.median(timings["ours"][clock])
        print(
            f"{clock:>4} time: reference {ref:,.0f} texts/s, ours {our:,.0f} texts/s, speed-up {our / ref:.2f}x"
        )


if __name__ == "__main__":
    main()
