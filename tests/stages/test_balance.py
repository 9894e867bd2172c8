"""MetaCLIP matching and balancing (issue #5): the reference's matching, exactly; global counts;
balancing statistics; determinism.

The metadata of >= 100k entries is built offline from WordNet (Debian package wordnet-base) and
wordfreq, once per machine (cached in pytest's cache dir); the real captions are the 8,000
alt-texts of ../shared/data. Tests that need either skip with the reason when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from schemas import OK
from stages import metadata as md
from stages.balance import (
    Balance,
    Matcher,
    count_entries,
    entry_probs,
    reference_automaton,
    reference_match,
    reference_spacing,
)
from tests.conftest import missing, require_module
from tests.shared_data import shared_data_path

REPO = Path(__file__).resolve().parents[2]


def literal_match(text: str | None, entries: list[str]) -> list[int]:
    """The definition, as ``metaclip1/substr_matching.py`` states it: ``f" {e} " in spacing(text)``."""
    if text is None:
        return []
    spaced = reference_spacing(text)
    return [i for i, e in enumerate(entries) if f" {e} " in spaced]


def names(ids: list[int], entries: list[str]) -> set[str]:
    return {entries[i] for i in ids}


@pytest.fixture(scope="session")
def offline_metadata(pytestconfig, tmp_path_factory) -> list[str]:
    """The offline MetaCLIP-style metadata (WordNet + wordfreq), built once and cached."""
    if not all((md.WORDNET_DIR / f).is_file() for f in md.WORDNET_FILES):
        missing(f"WordNet data not found in {md.WORDNET_DIR}: apt-get install wordnet-base")
    require_module("wordfreq", "the metadata builder needs wordfreq (pip install wordfreq)")
    version = hashlib.sha256((REPO / "stages" / "metadata.py").read_bytes()).hexdigest()[:12]
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    folder = cache.mkdir("clipcurate_metadata") if cache else tmp_path_factory.mktemp("metadata")
    path = Path(folder) / f"offline_{version}.json"
    if not path.is_file():
        md.save(md.build(), path)
    return md.load(path)


@pytest.fixture(scope="session")
def captions() -> pa.Array:
    path = shared_data_path("alt_texts_8k.parquet")
    return pq.read_table(path, columns=["caption"]).column("caption").combine_chunks()


# ---- Acceptance 1: the reference's matching -----------------------------------------------------

EDGE_CASES = [
    # (text, entries, the entries that match)
    ("A dog.", ["a", "A", "dog", "dog.", "."], {"A", "dog", "."}),  # case-sensitive; "." is wrapped
    ("(dog)", ["dog", "(dog)", "(dog", "dog)"], {"(dog)"}),  # brackets are not spaced
    ("dog-house", ["dog", "house", "dog-house"], {"dog-house"}),
    ("dog's bone", ["dog", "dog's", "s", "bone"], {"dog's", "bone"}),
    ("e.g. St. Louis", ["e.g.", "e", "g", ".", "St. Louis", "St", "Louis"], {"e", "g", ".", "St", "Louis"}),
    ("red  car", ["red car", "red", "car", " car", ""], {"red", "car", " car", ""}),  # double space
    (
        "version 1.0",
        ["1", "1.0", "0", "version", "version 1", "1 . 0"],
        {"1", "0", "version", "version 1", "1 . 0"},
    ),
    (
        "a red car",
        ["red", "car", "red car", "a red car", "a", "red ca"],
        {"red", "car", "red car", "a red car", "a"},
    ),
    ("a a a", ["a", "a a", "a a a a"], {"a", "a a"}),  # overlapping: each entry once
    (
        "red\tcar\nblue\rsky",
        ["red car", "car blue", "blue sky", "red"],
        {"red car", "car blue", "blue sky", "red"},
    ),
    (
        "it`s ok; fine: yes? no! x,y",
        ["it", "s", "it`s", "ok", "fine", "yes", "no", "x", "y", "x,y"],
        {"it", "s", "ok", "fine", "yes", "no", "x", "y"},
    ),  # fmt: skip
    ("Dog DOG dog", ["dog", "Dog", "DOG", "Dog DOG"], {"dog", "Dog", "DOG", "Dog DOG"}),
    ("café crème", ["café", "crème", "cafe", "café crème"], {"café", "crème", "café crème"}),
    (
        "non\u00a0breaking",
        ["non", "breaking", "non\u00a0breaking"],
        {"non\u00a0breaking"},
    ),  # only \t\r\n spaced
    ("", ["", "a"], {""}),  # the reference pads "" to "  ", which holds " " + "" + " "
    ("tab\tinside", ["tab\tinside", "tab inside"], {"tab inside"}),  # an entry with a tab never matches
]


@pytest.mark.parametrize(("text", "entries", "expected"), EDGE_CASES, ids=[repr(c[0]) for c in EDGE_CASES])
def test_reference_edge_cases(text, entries, expected):
    ours = Matcher(entries).match(pa.array([text], pa.string())).to_pylist()[0]
    assert names(ours, entries) == expected
    assert ours == literal_match(text, entries)
    assert ours == reference_match([text], reference_automaton(entries))[0]


def test_batch_of_edge_cases_with_nulls_matches_row_by_row():
    """All edge cases in one column (one automaton pass), with nulls and a sliced array."""
    entries = sorted({e for _, es, _ in EDGE_CASES for e in es})
    texts = [None] + [c[0] for c in EDGE_CASES] + [None, "plain words only"]
    col = pa.array(["padding", *texts], pa.string()).slice(1)
    got = Matcher(entries).match(col).to_pylist()
    assert got == [literal_match(t, entries) for t in texts]
    assert got[0] == [] and got[-2] == []


def test_random_texts_and_entries_match_the_definition():
    """Random strings over an alphabet dense in the characters the spacing touches (punctuation,
    spaces, tab/CR/LF, a non-ASCII letter): the column matcher agrees with the literal definition,
    including for the entries it leaves out of the automaton because they can never match."""
    rng = random.Random(5)
    alphabet = "ab  .,;:?!`\t\n\ré-"
    entries = sorted({"".join(rng.choices(alphabet, k=rng.randint(0, 4))) for _ in range(400)})
    texts = ["".join(rng.choices(alphabet, k=rng.randint(0, 12))) for _ in range(1500)]
    got = Matcher(entries).match(pa.array(texts)).to_pylist()
    assert got == [literal_match(t, entries) for t in texts]
    assert sum(map(len, got)) > 1500


def test_repeated_entry_strings_all_match():
    """The definition matches every id of a repeated string (pyahocorasick's add_word would keep
    only the last id: MetaCLIP's metadata has no repeats, so the reference never meets this)."""
    entries = ["dog", "cat", "dog"]
    assert (
        Matcher(entries).match(pa.array(["a dog"])).to_pylist()
        == [[0, 2]]
        == [literal_match("a dog", entries)]
    )


def test_matcher_accepts_large_string_and_chunked_columns():
    entries = ["red", "car"]
    col = pa.chunked_array(
        [pa.array(["red car"], pa.large_string()), pa.array([None, "car"], pa.large_string())]
    )
    assert Matcher(entries).match(col).to_pylist() == [[0, 1], [], [1]]


def test_reference_oracle_is_the_literal_definition(offline_metadata, captions):
    """The pyahocorasick oracle equals the literal ``in`` loop (on a sample: that loop is slow)."""
    texts = captions.slice(0, 40).to_pylist()
    automaton = reference_automaton(offline_metadata)
    assert reference_match(texts, automaton) == [literal_match(t, offline_metadata) for t in texts]


def test_same_matches_as_reference_on_8k_real_captions(offline_metadata, captions):
    assert len(offline_metadata) >= 100_000
    assert len(set(offline_metadata)) == len(offline_metadata)
    expected = reference_match(captions.to_pylist(), reference_automaton(offline_metadata))
    matcher = Matcher(offline_metadata)
    for batch_size in (len(captions), 1000):
        got = []
        for start in range(0, len(captions), batch_size):
            got.extend(matcher.match(captions.slice(start, batch_size)).to_pylist())
        assert got == expected
    assert len(captions) == 8000
    assert sum(map(len, expected)) > 10_000  # the comparison is not vacuous
    assert sum(1 for ids in expected if ids) > 4000


# ---- the metadata ---------------------------------------------------------------------------------


def test_offline_metadata_follows_the_reference_recipe(offline_metadata):
    entries = offline_metadata
    assert entries[:100] == [str(i) for i in range(100)]
    assert "" not in entries and not set(string.punctuation) & set(entries)
    index = set(entries)
    # WordNet synset names: first lemma, lower-cased, "_" -> " " (physical_entity.n.01, Paris)
    for word in ("entity", "physical entity", "dog", "paris", "ice cream", "new york"):
        assert word in index
    # ...cut at the first "." as the reference's name[:name.find(".")] does on NLTK's
    # "wrangell-st._elias_national_park.n.01"
    assert "wrangell-st" in index and not any("wrangell-st." in e for e in entries)
    assert "Paris" not in index  # synset names are lower-cased, and wordfreq words too
    assert "the" in index  # frequent unigrams


def test_load_json_and_text(tmp_path):
    entries = ["red", "red car", "1.0", "café"]
    assert md.load(md.save(entries, tmp_path / "m.json")) == entries
    (tmp_path / "m.txt").write_bytes("red\r\nred car\n1.0\ncafé\n".encode())
    assert md.load(tmp_path / "m.txt") == entries
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="list of strings"):
        md.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        md.load(tmp_path / "missing.json")


def test_shapes_demo_metadata_is_current_and_matches_the_captions():
    from demo.metadata import shapes_metadata
    from demo.world import CONCEPTS, generate

    committed = md.load(REPO / "demo" / "assets" / "shapes_metadata.json")
    assert committed == shapes_metadata()
    assert md.load("demo/assets/shapes_metadata.json") == committed  # relative to the working directory (the repo root)
    pairs = list(generate(200, seed=3))
    matched = Matcher(committed).match(pa.array([p.caption for p in pairs])).to_pylist()
    for p, ids in zip(pairs, matched):
        got = names(ids, committed)
        assert {p.colour, p.shape, f"{p.colour} {p.shape}"} <= got, p.caption
    assert all(f"{c} {s}" in committed for c, s in CONCEPTS)


# ---- the stage: fit, merge, state -----------------------------------------------------------------


def table(
    captions: list[str | None], keys: list[str] | None = None, status: list[str] | None = None
) -> pa.Table:
    keys = keys or [f"{i:09d}" for i in range(len(captions))]
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "status": pa.array(status or [OK] * len(captions), pa.string()),
        }
    )


def write_metadata(tmp_path: Path, entries: list[str]) -> str:
    return str(md.save(entries, tmp_path / "metadata.json"))


def fitted(stage: Balance, tab: pa.Table, chunk: int | None = None) -> Balance:
    chunk = chunk or tab.num_rows
    parts = [stage.fit_partial(tab.slice(s, chunk)) for s in range(0, tab.num_rows, chunk)]
    stage.load_state(json.loads(json.dumps(stage.merge(parts))))  # the state goes through JSON
    return stage


def test_fit_counts_ok_rows_once_per_text(tmp_path):
    meta = write_metadata(tmp_path, ["a", "red", "car", "red car", "blue"])
    tab = table(["a red car, a red car", "a blue car", "red", None, "nothing here", "red red"],
                status=[OK, OK, OK, OK, OK, "download_failed"])  # fmt: skip
    stage = Balance({"metadata": meta, "t": 1})
    state = stage.merge([stage.fit_partial(tab)])
    assert state["counts"] == [2, 2, 2, 1, 1]  # "red red" is not ok: not counted
    assert (state["pool_rows"], state["matched_rows"]) == (5, 3)
    assert all(type(c) is int for c in state["counts"])
    # merge is associative over partials and merged states, whatever the order
    parts = [stage.fit_partial(tab.slice(i, 1)) for i in range(tab.num_rows)]
    assert stage.merge([stage.merge(parts[:2]), stage.merge(parts[2:][::-1])]) == state
    assert stage.merge(parts[::-1]) == state


def test_counts_beyond_32_bits_survive_json(tmp_path):
    meta = write_metadata(tmp_path, ["a", "b"])
    stage = Balance({"metadata": meta, "t": 20_000})
    big = {"num_entries": 2, "metadata_fingerprint": stage.fingerprint(), "pool_rows": 1, "matched_rows": 1,
           "counts": [2**40, 3]}  # fmt: skip
    state = json.loads(json.dumps(stage.merge([big, big])))
    assert state["counts"] == [2**41, 6]
    stage.load_state(state)
    summary = stage.state_summary(state)
    assert summary["top_entries"][0] == {"id": 0, "entry": "a", "count": 2**41, "p": round(20_000 / 2**41, 6)}
    assert summary["head_entries"] == 1 and summary["entries_matched"] == 2


def test_state_from_other_metadata_is_refused(tmp_path):
    a = Balance({"metadata": write_metadata(tmp_path / "a", ["red", "car"])})
    b = Balance({"metadata": write_metadata(tmp_path / "b", ["car", "red"])})
    state = a.merge([a.fit_partial(table(["red car"]))])
    with pytest.raises(ValueError, match="another metadata"):
        b.load_state(state)
    with pytest.raises(ValueError, match="different metadata"):
        a.merge([state, b.fit_partial(table(["red car"]))])


def test_state_summary(tmp_path):
    meta = write_metadata(tmp_path, ["photo", "red", "car", "never"])
    stage = Balance({"metadata": meta, "t": 2})
    state = stage.merge([stage.fit_partial(table(["photo red"] * 5 + ["photo car"] * 2 + ["x"]))])
    s = stage.state_summary(state)
    assert (s["t"], s["num_entries"], s["entries_matched"], s["head_entries"]) == (2, 4, 3, 2)
    assert (s["pool_rows"], s["matched_rows"]) == (8, 7)
    assert [(e["entry"], e["count"]) for e in s["top_entries"]] == [("photo", 7), ("red", 5), ("car", 2)]
    assert s["top_entries"][0]["p"] == round(2 / 7, 6)
    assert s["tail_fraction"] == 0.0  # car has count 2 = t: not below t
    assert s["expected_matches_after"] == 6


# ---- the stage: apply ---------------------------------------------------------------------------


def test_statuses_reasons_and_entries_column(tmp_path):
    meta = write_metadata(tmp_path, ["photo", "rare thing"])
    caps = ["photo"] * 400 + ["a photo of a rare thing", "unrelated words", None]
    tab = table(caps)
    stage = fitted(Balance({"metadata": meta, "t": 10, "seed": 1}), tab)
    out = stage(tab)
    status, reason = out.column("status").to_pylist(), out.column("reason").to_pylist()
    assert status[-2:] == ["filtered_balance"] * 2 and reason[-2:] == ["no metadata match"] * 2
    assert status[400] == OK  # the tail entry keeps its row
    sampled = [r for s, r in zip(status[:400], reason[:400]) if s != OK]
    assert 300 < len(sampled) < 400
    assert set(sampled) == {"sampled out: head entry 'photo' (count 401, row keep p=0.0249)"}
    assert out.column("rejected_by").to_pylist()[-1] == "balance"
    entries = out.column("metaclip_entries")
    assert entries.type == pa.list_(pa.int32())
    assert entries.to_pylist()[399:] == [[0], [0, 1], [], []]
    kept = out.filter(pc.equal(out.column("status"), OK))
    counts_after = count_entries(kept.column("metaclip_entries"), 2)
    assert counts_after.dtype == np.uint64 and counts_after[1] == 1 and counts_after[0] == kept.num_rows


def test_options_text_column_entries_column_and_non_ok_rows(tmp_path):
    meta = write_metadata(tmp_path, ["red"])
    tab = table(["x", "x", "x"], status=[OK, "download_failed", OK]).append_column(
        "alt", pa.array(["red", "red", "no"])
    )
    stage = Balance({"metadata": meta, "t": 5, "text_column": "alt", "entries_column": False})
    assert stage.requires == ("alt",) and stage.fit_columns == ("alt",) and stage.output_columns() == {}
    out = fitted(stage, tab)(tab)
    assert out.column("status").to_pylist() == [OK, "download_failed", "filtered_balance"]
    assert "metaclip_entries" not in out.column_names
    with pytest.raises(Exception, match="extra"):
        Balance({"metadata": meta, "tt": 5})


def test_unfitted_stage_fails_loudly(tmp_path):
    stage = Balance({"metadata": write_metadata(tmp_path, ["red"])})
    with pytest.raises(RuntimeError, match="load_state"):
        stage(table(["red"]))


# ---- Acceptance 2: balancing statistics ----------------------------------------------------------


def synthetic_pool(rng: random.Random) -> tuple[list[str], list[str], dict[str, int]]:
    """Captions built from known entries: three heads (20k, 8k, 3k rows alone), rows with two heads,
    and tail entries (count < t) alone or beside a head."""
    entries = ["head zero", "head one", "head two"] + [f"tail{i}" for i in range(40)]
    caps = ["photo of head zero"] * 20_000 + ["head one!"] * 8_000 + ["head two, outdoors"] * 3_000
    caps += ["head one and head two"] * 2_000
    caps += [f"tail{i % 40}" for i in range(400)]  # 10 rows per tail entry, alone
    caps += [f"head zero with tail{i % 40}" for i in range(200)]  # tail entry beside a head
    caps += ["no entry at all"] * 100
    rng.shuffle(caps)
    counts = {"head zero": 20_200, "head one": 10_000, "head two": 5_000}
    return entries, caps, counts


def test_head_entries_keep_t_over_count_and_tail_rows_are_all_kept(tmp_path):
    entries, caps, counts = synthetic_pool(random.Random(0))
    t = 1_000
    tab = table(caps)
    stage = fitted(
        Balance({"metadata": write_metadata(tmp_path, entries), "t": t, "seed": 7}), tab, chunk=5_000
    )
    assert stage._counts[:3].tolist() == [counts["head zero"], counts["head one"], counts["head two"]]
    assert stage._counts[3:].tolist() == [15] * 40
    out = stage(tab)
    kept = np.array(pc.equal(out.column("status"), OK).to_pylist())
    caps_arr = np.array(caps, dtype=object)

    def check(mask: np.ndarray, p: float) -> None:
        n = int(mask.sum())
        frac = kept[mask].mean()
        se = (p * (1 - p) / n) ** 0.5
        assert abs(frac - p) <= 3 * se, (n, frac, p, se)

    p = {e: t / c for e, c in counts.items()}
    check(caps_arr == "photo of head zero", p["head zero"])
    check(caps_arr == "head one!", p["head one"])
    check(caps_arr == "head two, outdoors", p["head two"])
    check(caps_arr == "head one and head two", 1 - (1 - p["head one"]) * (1 - p["head two"]))
    reasons = np.array(out.column("reason").to_pylist(), dtype=object)
    both = (caps_arr == "head one and head two") & ~kept
    p_both = 1 - (1 - p["head one"]) * (1 - p["head two"])
    assert set(reasons[both]) == {
        f"sampled out: head entry 'head one' (count 10000, row keep p={p_both:.3g})"
    }
    tail_rows = np.array(["tail" in c for c in caps])
    assert kept[tail_rows].all() and tail_rows.sum() == 600
    no_match = caps_arr == "no entry at all"
    assert not kept[no_match].any()
    assert set(reasons[no_match]) == {"no metadata match"}


def test_entry_probs_follow_the_reference():
    counts = np.array([0, 5, 20_000, 20_001, 10**9], dtype=np.uint64)
    assert entry_probs(counts, 20_000).tolist() == [1.0, 1.0, 1.0, 20_000 / 20_001, 20_000 / 10**9]


# ---- Acceptance 3: determinism -------------------------------------------------------------------


def run_stage(meta: str, tab: pa.Table, batch_size: int, fit_chunk: int, seed: int = 0) -> pa.Table:
    stage = fitted(
        Balance({"metadata": meta, "t": 50, "seed": seed, "batch_size": batch_size}), tab, fit_chunk
    )
    out = stage(tab)
    return out.take(pc.sort_indices(out, [("key", "ascending")]))


def test_kept_rows_do_not_depend_on_batch_size_chunking_or_order(tmp_path):
    entries, caps, _ = synthetic_pool(random.Random(1))
    caps = caps[:6_000]
    meta = write_metadata(tmp_path, entries)
    tab = table(caps)
    shuffled = tab.take(pa.array(random.Random(2).sample(range(tab.num_rows), tab.num_rows)))
    a = run_stage(meta, tab, batch_size=8192, fit_chunk=6_000)
    b = run_stage(meta, shuffled, batch_size=7, fit_chunk=333)
    assert a.equals(b)
    kept = pc.equal(a.column("status"), OK)
    assert 0 < pc.sum(kept).as_py() < tab.num_rows
    other_seed = run_stage(meta, tab, batch_size=8192, fit_chunk=6_000, seed=1)
    assert not other_seed.column("status").equals(a.column("status"))


# ---- workflows ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "order"),
    [("metaclip.yaml", ["read", "balance", "download", "write"]),
     ("metaclip_after_download.yaml", ["read", "download", "balance", "write"])],
)  # fmt: skip
def test_metaclip_workflows_validate(name, order):
    from pipeline import config, plan

    pipe = config.load(REPO / "workflows" / name)
    steps = plan.check(pipe)
    assert [s.name for s in steps] == order
    balance = next(s for s in steps if s.name == "balance")
    assert balance.is_global and balance.produces == ("metaclip_entries",)
