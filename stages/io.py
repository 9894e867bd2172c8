"""Atomic writes to any fsspec filesystem: write ``NAME.tmp-XXXX`` in the same folder, then rename.
And the one protocol-to-URL rule (``url_of``): local paths as they are, others ``PROTOCOL://path``;
``shown_path`` writes a path as a person reads it.

A reader never sees a partial file. A killed writer leaves only ``*.tmp-*`` files, which the next
run of the same output removes (``pipeline.runs.RunDir.remove_tmp``).
"""

from __future__ import annotations

import os
import posixpath
import uuid

TMP_MARK = ".tmp-"


def atomic_write_bytes(fs, path: str, data: bytes) -> None:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def protocol_of(fs) -> str:
    """The main protocol of an fsspec filesystem (``file``, ``s3``, ``memory`` ...)."""
    return fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol


def is_local(fs) -> bool:
    return protocol_of(fs) in ("file", "local")


def url_of(fs, path: str) -> str:
    """A fully qualified URL of ``path`` on ``fs`` that any worker can open: local paths as they are,
    others as ``PROTOCOL://path``."""
    return path if is_local(fs) else f"{protocol_of(fs)}://{path}"


def shown_path(url: str) -> str:
    """A path as a person wants to read it: relative to the working directory when under it."""
    if "://" in url and not url.startswith("file://"):
        return url
    p = url[len("file://") :] if url.startswith("file://") else url
    cwd = os.getcwd()
    return os.path.relpath(p, cwd) if p.startswith(cwd + os.sep) else p
