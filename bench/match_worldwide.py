"""Worldwide (MetaCLIP 2) balancing speed on a multilingual pool, one process, no Ray.

    .venv/bin/python bench/match_worldwide.py [--rows-per-lang 20000] [--unigrams 20000] [--rounds 3]

Pool: the 8,000 real English alt-texts of ../shared/data/alt_texts_8k.parquet (repeated to
``--rows-per-lang``) plus, for de, fr, es, zh, ja, ar and he, synthetic captions of 2-12 of the
language's 3,000 most frequent wordfreq words with punctuation (zh and ja without spaces).
Metadata: ``stages.langmeta.build`` (English: numbers + WordNet + ``--unigrams`` wordfreq words;
other languages: ``--unigrams`` wordfreq words). Timed, each the median of ``--rounds`` rounds,
as texts/s of process CPU time and of wall time:

* ``match``: ``balance_worldwide``'s per-language matching with a ``language`` column (automata
  already built);
* ``lid``: fastText lid.176 language ID of every caption (what the stage does without the column);
* ``fit`` and ``apply``: the stage's ``fit_partial`` and ``__call__`` over the pool in 8,192-row
  batches with the language column (merge and thresholds included in fit).

Run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages import langmeta  # noqa: E402
from stages.worldwide import WorldwideBalance  # noqa: E402
from tests.shared_data import shared_data_dir  # noqa: E402

OTHER = ("de", "fr", "es", "zh", "ja", "ar", "he")
SEPS = [" ", " ", " ", ", ", ". ", "! ", "? ", ": "]
CJK_SEPS = ["", "", "", "，", "。", "、", "！"]


def pool(per_lang: dict[str, list[str]], rows: int, seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    en = (
        pq.read_table(shared_data_dir() / "alt_texts_8k.parquet", columns=["caption"])
        .column("caption")
        .to_pylist()
    )
    texts, langs = (en * (rows // len(en) + 1))[:rows], ["en"] * rows
    for lang in OTHER:
        vocab = per_lang[lang][:3000]
        seps = CJK_SEPS if lang in ("zh", "ja") else SEPS
        for _ in range(rows):
            words = rng.choices(vocab, k=rng.randint(2, 12))
            texts.append("".join(w + rng.choice(seps) for w in words).strip())
            langs.append(lang)
    n = len(texts)
    return pa.table({"key": [f"{i:09d}" for i in range(n)], "caption": texts, "language": langs,
                     "status": ["ok"] * n})  # fmt: skip


def timed(fn) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def batches(table: pa.Table, size: int):
    return [table.slice(s, size) for s in range(0, table.num_rows, size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows-per-lang", type=int, default=20_000)
    ap.add_argument("--unigrams", type=int, default=20_000)
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--t", type=int, default=200, help="t_en (small: the pool is small)")
    ap.add_argument("--lid-rows", type=int, default=20_000, help="captions timed for language ID")
    args = ap.parse_args()

    per_lang = langmeta.build(["en", *OTHER], args.unigrams)
    tmp = Path(tempfile.mkdtemp(prefix="ww_bench_"))
    langmeta.save(per_lang, tmp)
    table = pool(per_lang, args.rows_per_lang)
    n = table.num_rows
    sizes = ", ".join(f"{k} {len(v):,}" for k, v in per_lang.items())
    print(f"{n:,} captions ({args.rows_per_lang:,} per language, 8 languages); metadata entries: {sizes}")

    stage = WorldwideBalance({"metadata": str(tmp), "language_column": "language", "t": args.t, "seed": 0})
    parts = batches(table, args.batch_size)
    c, w = timed(lambda: [stage.match(b, stage.languages(b)[0]) for b in parts[:8]])  # builds every automaton
    print(
        f"automata of 8 languages built (+ a first pass over {min(n, 8 * args.batch_size):,} rows): {w:.1f} s wall"
    )

    results: dict[str, list[tuple[float, float]]] = {"match": [], "fit": [], "apply": [], "lid": []}
    state = None
    for _ in range(args.rounds):
        results["match"].append(timed(lambda: [stage.match(b, stage.languages(b)[0]) for b in parts]))

        def fit():
            nonlocal state
            state = stage.merge([stage.fit_partial(b) for b in parts])
            stage.load_state(state)

        results["fit"].append(timed(fit))
        results["apply"].append(timed(lambda: [stage(b) for b in parts]))
    lid_stage = WorldwideBalance({"metadata": str(tmp), "lang_id": "fasttext"})
    lid_table = table.take(pa.array(random.Random(1).sample(range(n), min(args.lid_rows, n))))
    lid_stage.languages(lid_table.slice(0, 10))  # loads the model
    for _ in range(args.rounds):
        results["lid"].append(timed(lambda: lid_stage.languages(lid_table)))
    got = lid_stage.languages(lid_table)[0]
    agree = sum(a == b for a, b in zip(got, lid_table.column("language").to_pylist())) / lid_table.num_rows

    print(f"{'step':<8}{'texts/s (CPU)':>16}{'texts/s (wall)':>16}")
    for name, rs in results.items():
        rows = lid_table.num_rows if name == "lid" else n
        cpu = statistics.median(r[0] for r in rs)
        wall = statistics.median(r[1] for r in rs)
        print(f"{name:<8}{rows / cpu:>16,.0f}{rows / wall:>16,.0f}")
    print(f"lid agrees with the pool's language on {agree:.1%} of the timed captions")
    summ = stage.state_summary(state)
    print("t per language:", {x["language"]: x["t"] for x in summ["languages"]}, "p =", summ["tail_p"])


if __name__ == "__main__":
    main()
