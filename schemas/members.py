"""The tar member codec of a WebDataset sample: ``KEY.EXT`` members, one sample per key.

Written by the sink (``stages/write.py``) and read back by the ``read`` source, the report and the tests:

    KEY.jpg | KEY.png | KEY.webp     the image (``image_ext`` of its bytes)
    KEY.txt                           the caption
    KEY.json                          the row's metadata
    KEY.rewrite0.txt, ...             optional rewrites
"""

from __future__ import annotations

import io
import posixpath
import tarfile

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # member extensions that hold an image, in preference order


def image_ext(data: bytes) -> str:
    """The member extension of image bytes, from their magic number (``img`` when unknown)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "img"


def split_member(name: str) -> tuple[str, str]:
    """``(key, ext)`` of a member name: the base name split at its first dot (``a/K.rewrite0.txt``
    -> ``("K", "rewrite0.txt")``). Either is empty when the name has no key or no extension."""
    key, _, ext = posixpath.basename(name).partition(".")
    return key, ext


def is_image_member(ext: str) -> bool:
    return ext.lower() in IMAGE_EXTS


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add ``data`` as member ``name`` with fixed metadata (mtime 0, mode 644, no owner), so the
    same rows give byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
