"""Locate the reference data in ``../shared/data`` (see its README) for tests and benchmarks.

``CLIPCURATE_SHARED_DATA`` overrides the folder. Where a file is absent (a fresh clone without
``shared/``), the calling test is skipped with the reason (fails under ``CI=true``: see
``tests.conftest.missing``).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def shared_data_dir() -> Path:
    return Path(os.environ.get("CLIPCURATE_SHARED_DATA") or DEFAULT_DIR)


def shared_data_path(name: str) -> Path:
    """Path of ``NAME`` in the shared data folder; skips the calling test if it is not there (a failure
    under ``CI=true``)."""
    from tests.conftest import missing

    path = shared_data_dir() / name
    if not path.is_file():
        missing(f"shared data file {name} not found at {path} (set CLIPCURATE_SHARED_DATA to its folder)")
    return path
