"""MetaCLIP metadata: the list of entry strings that captions are matched against.

The id of an entry is its position in the list. Two sources here (the shapes demo builds its own,
``demo/metadata.py``):

* ``load(path)``: MetaCLIP's released ``metadata.json`` (a JSON list of strings), or a plain text
  file with one entry per line (``.txt``; trailing newlines stripped, nothing else).
* ``build(...)``: a MetaCLIP-style metadata from offline sources, following the recipe of
  MetaCLIP's ``metaclip1/build_metadata.py``: the numbers ``"0"``..``"99"``, the WordNet synset
  names (Debian package ``wordnet-base``, WordNet 3.0 under ``/usr/share/wordnet``), then frequent
  English unigrams (the ``wordfreq`` package stands in for the Wikipedia unigram counts). Empty
  entries and single punctuation characters are left out, as in the reference. CLI:
  ``python -m stages.metadata build OUT.json [--unigrams 100000]``.

The reference builds a ``set`` and dumps it, so its entry order is arbitrary; ours is
deterministic (first occurrence wins, in the order of the sources above).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import string
from collections.abc import Iterable
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")

_SYNTACTIC_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # adjective markers in WordNet's data.adj


def load(path: str | Path) -> list[str]:
    """Entries of a metadata file: a JSON list of strings, or one entry per line (``.txt``).
    A relative ``path`` is relative to the working directory (workflow loading resolves it first)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json" or text.lstrip().startswith("["):
        entries = json.loads(text)
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError(f"{path}: metadata JSON must be a list of strings")
        return entries
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def fingerprint(entries: list[str]) -> str:
    """A short hash of the entry list (ids included), to check that counts belong to it."""
    h = hashlib.sha256()
    for e in entries:
        h.update(e.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def wordnet_synset_names(wordnet_dir: Path = WORDNET_DIR) -> list[str]:
    """One name per WordNet synset, as MetaCLIP derives it from NLTK's ``Synset.name()``:
    the synset's first lemma, lower-cased, cut at its first ``.`` (``name[:name.find('.')]``),
    with ``_`` turned into a space. Read straight from WordNet's ``data.*`` files."""
    files = [wordnet_dir / f for f in WORDNET_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet data files missing ({', '.join(missing)}): install the Debian package wordnet-base"
        )
    names = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("  "):  # licence header
                    continue
                # synset_offset lex_filenum ss_type w_cnt word lex_id ...
                lemma = _SYNTACTIC_MARKER.sub("", line.split(" ", 5)[4]).lower()
                names.append(lemma.split(".", 1)[0].replace("_", " "))
    return names


def frequent_unigrams(n: int, lang: str = "en") -> list[str]:
    """The ``n`` most frequent ``lang`` words of ``wordfreq`` (its stand-in for Wikipedia unigrams)."""
    try:
        import wordfreq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the metadata builder needs the 'wordfreq' package: pip install wordfreq") from e
    return list(wordfreq.top_n_list(lang, n))


def unique_entries(sources: Iterable[Iterable[str]]) -> list[str]:
    """Concatenate sources, keep the first occurrence, drop empty and single-punctuation entries."""
    forbidden = set(string.punctuation)
    seen: set[str] = set()
    out = []
    for src in sources:
        for e in src:
            if not e or e in forbidden or e in seen:
                continue
            seen.add(e)
            out.append(e)
    return out


def build(unigrams: int = 100_000, wordnet_dir: Path = WORDNET_DIR) -> list[str]:
    """A MetaCLIP-style metadata from offline sources (numbers, WordNet, frequent unigrams)."""
    numbers = [str(i) for i in range(100)]
    return unique_entries([numbers, wordnet_synset_names(wordnet_dir), frequent_unigrams(unigrams)])


def save(entries: list[str], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(entries, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    return p


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.metadata", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a MetaCLIP-style metadata from WordNet + wordfreq")
    b.add_argument("out")
    b.add_argument("--unigrams", type=int, default=100_000, help="how many frequent unigrams to add")
    args = ap.parse_args(argv)
    entries = build(args.unigrams)
    print(f"{save(entries, args.out)}: {len(entries)} entries")


if __name__ == "__main__":
    main()
