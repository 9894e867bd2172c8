"""The CI rule of ``tests/conftest.py``: a dependency CI is meant to have (chromium, wordnet-base,
wordfreq, the shared data) that is missing skips the test locally, with the reason, and fails it
under ``CI=true``."""

from __future__ import annotations

import pytest

from tests.conftest import in_ci, missing, require_module
from tests.shared_data import shared_data_path

SKIPPED, FAILED = pytest.skip.Exception, pytest.fail.Exception


def outcome(fn, *args) -> tuple[type, str]:
    """(the pytest outcome ``fn(*args)`` raised, its message): caught here, so that a skip where a
    failure is due fails this test instead of skipping it."""
    try:
        fn(*args)
    except (SKIPPED, FAILED) as e:
        return type(e), str(e)
    raise AssertionError(f"{fn.__name__}{args} neither skipped nor failed")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_a_missing_dependency_skips_outside_ci(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    kind, msg = outcome(missing, "WordNet data not found: apt-get install wordnet-base")
    assert kind is SKIPPED and msg == "WordNet data not found: apt-get install wordnet-base"


@pytest.mark.parametrize("value", ["true", "True", "TRUE"])
def test_a_missing_dependency_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert in_ci()
    kind, msg = outcome(missing, "chromium is not installed: apt-get install chromium")
    assert kind is FAILED and msg.startswith("CI=true") and msg.endswith("apt-get install chromium")


def test_require_module_and_shared_data_go_through_the_rule(monkeypatch, tmp_path):
    assert require_module("json", "stdlib").dumps([]) == "[]"
    monkeypatch.setenv("CLIPCURATE_SHARED_DATA", str(tmp_path))
    (tmp_path / "here.parquet").write_bytes(b"x")
    monkeypatch.delenv("CI", raising=False)
    assert shared_data_path("here.parquet") == tmp_path / "here.parquet"
    no_module = ("no_such_module_clipcurate", "no_such_module_clipcurate is missing")
    assert outcome(require_module, *no_module) == (SKIPPED, "no_such_module_clipcurate is missing")
    kind, msg = outcome(shared_data_path, "absent.parquet")
    assert kind is SKIPPED and "absent.parquet not found" in msg
    monkeypatch.setenv("CI", "true")
    assert outcome(require_module, *no_module)[0] is FAILED
    kind, msg = outcome(shared_data_path, "absent.parquet")
    assert kind is FAILED and "absent.parquet not found" in msg
