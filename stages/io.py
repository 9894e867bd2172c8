"""Atomic writes to any fsspec filesystem: write ``NAME.tmp-XXXX`` in the same folder, then rename.

A reader never sees a partial file. A killed writer leaves only ``*.tmp-*`` files, which the next
run of the same output removes (``pipeline.runs.RunDir.remove_tmp``).
"""

from __future__ import annotations

import posixpath
import uuid

TMP_MARK = ".tmp-"


def atomic_write_bytes(fs, path: str, data: bytes) -> None:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)
