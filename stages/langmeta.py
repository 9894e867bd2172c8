"""Per-language MetaCLIP metadata for worldwide balancing (MetaCLIP 2, ``stages.worldwide``).

Layout. Either a folder with one entry list per metadata language, ``<lang>.json`` (a JSON list of
strings, as MetaCLIP 2's ``data/metadata/<lang>.json``) or ``<lang>.txt`` (one entry per line),
or one Parquet file with the columns ``language`` and ``entry`` (row order = entry ids within each
language). The id of an entry is its position in its language's list; ``metaclip_entries`` holds
these per-language ids and ``metaclip_lang`` says which list they index.

Spacing (MetaCLIP 2, ``metaclip/curation/substr_matching.py:get_spaced_metadata``): an entry gets a
space before it unless its first character is CJK or similar (Han, Thai, Lao, Burmese, Khmer,
Tibetan) or punctuation, and a space after it unless its last character is; so words of languages
written without spaces match inside a text ("猫" in "一只猫在睡觉"). The text is spaced as in
MetaCLIP 1 (``stages.metaclip_match``). Languages listed in the stage's ``metaclip1_spacing`` (default
``en``) keep MetaCLIP 1's rule, both sides always padded, so English gives exactly ``balance``'s
matches; the two rules differ only for entries that start or end with punctuation or a CJK
character (MetaCLIP 2's English metadata is MetaCLIP 1's).

Builder (a small offline stand-in for MetaCLIP 2's Wikipedia/WordNet metadata):
``python -m stages.langmeta build OUT_DIR [--languages en,de,zh,ja,ar,he] [--unigrams 20000]``
writes ``<lang>.json`` per language: English as ``stages.metadata.build`` (numbers, WordNet, wordfreq
unigrams), every other language the ``--unigrams`` most frequent words of ``wordfreq``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import string
from pathlib import Path

from stages import metadata as md

# MetaCLIP 2's additional (full-width / CJK) punctuation, substr_matching.py
ADDITIONAL_PUNCTUATION = frozenset("，。、；：？！“”‘’（）【】《》〈〉「」『』～—")
_PUNCT = frozenset(string.punctuation) | ADDITIONAL_PUNCTUATION
_NO_SPACE_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF), (0x2E80, 0x2EFF), (0x2F00, 0x2FDF),
    (0x2FF0, 0x2FFF),  # CJK
    (0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x0F00, 0x0FFF),  # Thai..Tibetan
)  # fmt: skip

# Languages written without spaces (MetaCLIP 2's ``no_space_languages``; documentation only: the
# spacing rule works per character, whatever the language).
NO_SPACE_LANGUAGES = frozenset({"bo", "dz", "ja", "km", "lo", "my", "ryu", "th", "zh"})

# Language-ID label -> metadata language, for labels that differ (fastText lid.176 and py3langid
# codes). Labels not listed map to themselves. The stage's ``language_map`` extends or overrides it.
DEFAULT_LANGUAGE_MAP: dict[str, str] = {
    "wuu": "zh", "yue": "zh", "lzh": "zh", "zh-cn": "zh", "zh-tw": "zh", "zh-hans": "zh", "zh-hant": "zh",
    "nb": "no", "iw": "he", "ji": "yi", "in": "id", "hbs": "sh",
}  # fmt: skip


def is_cjk_or_similar(char: str) -> bool:
    """MetaCLIP 2's ``is_cjk_or_similar``: a CJK, Thai, Lao, Burmese, Khmer or Tibetan character,
    or punctuation (ASCII or ``ADDITIONAL_PUNCTUATION``)."""
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in _NO_SPACE_RANGES) or char in _PUNCT


def spaced_entry(entry: str, metaclip1: bool = False) -> str:
    """The pattern of ``entry``: MetaCLIP 1's ``f" {entry} "``, or MetaCLIP 2's partial padding."""
    if metaclip1:
        return f" {entry} "
    out = entry if is_cjk_or_similar(entry[0]) else f" {entry}"
    return out if is_cjk_or_similar(entry[-1]) else f"{out} "


class LangMetadata:
    """Entry lists per language from a folder or a Parquet file (see the module docstring); each
    language is read on first use, so a worker loads only the languages its rows have."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._files: dict[str, Path] = {}
        self._entries: dict[str, list[str]] = {}
        self._fp: dict[str, str] = {}
        if self.path.is_dir():
            for f in sorted(self.path.iterdir()):
                if f.suffix.lower() in (".json", ".txt") and f.is_file():
                    if f.stem in self._files:
                        raise ValueError(f"{path}: two entry lists for language {f.stem!r}")
                    self._files[f.stem] = f
        elif self.path.is_file() and self.path.suffix.lower() == ".parquet":
            import pyarrow.compute as pc
            import pyarrow.parquet as pq

            table = pq.read_table(self.path, columns=["language", "entry"])
            for lang in sorted(set(table.column("language").to_pylist()) - {None}):
                rows = table.filter(pc.equal(table.column("language"), lang))
                self._entries[lang] = [e for e in rows.column("entry").to_pylist() if e]
        else:
            raise FileNotFoundError(f"metadata folder or .parquet file not found: {path}")
        if not self.languages():
            raise ValueError(f"{path}: no per-language entry lists (<lang>.json / <lang>.txt, or a Parquet)")

    def languages(self) -> list[str]:
        return sorted(set(self._files) | set(self._entries))

    def entries(self, lang: str) -> list[str]:
        """The entries of ``lang`` (empty strings dropped: they have no spacing); KeyError if none."""
        if lang not in self._entries:
            if lang not in self._files:
                raise KeyError(lang)
            self._entries[lang] = [e for e in md.load(self._files[lang]) if e]
        return self._entries[lang]

    def fingerprint(self, lang: str) -> str:
        if lang not in self._fp:
            self._fp[lang] = md.fingerprint(self.entries(lang))
        return self._fp[lang]

    def digest(self) -> str:
        """A short hash of every language's file bytes (or entries), for ``model_info``."""
        h = hashlib.sha256()
        for lang in self.languages():
            h.update(lang.encode() + b"\x00")
            if lang in self._files:
                h.update(self._files[lang].read_bytes())
            else:
                h.update(self.fingerprint(lang).encode())
        return h.hexdigest()[:16]


def map_language(code: str | None, table: dict[str, str]) -> str | None:
    """A language-ID label as a metadata language: lower-cased, through ``table`` (the defaults
    updated with the stage's map), else itself. None stays None."""
    if code is None or not code.strip():
        return None
    c = code.strip().lower().replace("_", "-")
    if c in table:
        return table[c]
    base = c.split("-")[0]
    return table.get(base, base)


# ---- the offline builder ------------------------------------------------------------------------

BUILD_LANGUAGES = ("en", "de", "fr", "es", "zh", "ja", "ar", "he")


def build(
    languages: list[str], unigrams: int = 20_000, wordnet_dir: Path = md.WORDNET_DIR
) -> dict[str, list[str]]:
    """Entry lists per language: English as ``stages.metadata.build`` (its ``unigrams`` count
    capped by ``unigrams``), others ``wordfreq``'s top words, punctuation-only words dropped."""
    out = {}
    for lang in languages:
        if lang == "en":
            out[lang] = md.build(unigrams, wordnet_dir)
        else:
            words = md.frequent_unigrams(unigrams, lang)
            out[lang] = md.unique_entries([[w for w in words if not all(c in _PUNCT for c in w)]])
    return out


def save(per_lang: dict[str, list[str]], out_dir: str | Path) -> Path:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    for lang, entries in per_lang.items():
        (d / f"{lang}.json").write_text(
            json.dumps(entries, ensure_ascii=False, indent=0) + "\n", encoding="utf-8"
        )
    return d


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.langmeta", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="per-language metadata from wordfreq (+ WordNet for English)")
    b.add_argument("out")
    b.add_argument("--languages", default=",".join(BUILD_LANGUAGES), help="comma-separated wordfreq codes")
    b.add_argument("--unigrams", type=int, default=20_000, help="most frequent words per language")
    args = ap.parse_args(argv)
    per_lang = build([x for x in args.languages.split(",") if x], args.unigrams)
    out = save(per_lang, args.out)
    for lang, entries in per_lang.items():
        print(f"{out / (lang + '.json')}: {len(entries)} entries")


if __name__ == "__main__":
    main()
