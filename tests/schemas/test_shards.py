"""The shared helpers of the output layout: shard file names, the shard-complete test, the tar
member codec and protocol-to-URL."""

from __future__ import annotations

import io
import tarfile

import fsspec

from schemas.manifest import shard_complete, shard_files, shard_name, shard_of
from schemas.members import IMAGE_EXTS, add_member, image_ext, is_image_member, split_member
from stages.io import url_of


def test_shard_files_and_completion():
    name = shard_name(12)
    assert shard_files(name) == ("00012.tar", "00012.parquet", "00012_stats.json")
    assert shard_complete(name, {"00012.tar", "00012.parquet", "00012_stats.json", "x"})
    assert not shard_complete(name, {"00012.tar", "00012.parquet"})
    assert shard_of("00012_stats.json") == "00012" and shard_of("00012.parquet", (".parquet",)) == "00012"
    assert shard_of("manifest.json") is None and shard_of("ab.tar") is None


def test_member_codec_round_trip():
    buf = io.BytesIO()
    jpg, png = b"\xff\xd8\xff" + b"x" * 8, b"\x89PNG\r\n\x1a\n" + b"y"
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        add_member(tar, f"000.{image_ext(jpg)}", jpg)
        add_member(tar, f"001.{image_ext(png)}", png)
        add_member(tar, "001.rewrite0.txt", b"r")
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        members = [(split_member(m.name), m.mtime, m.uid) for m in tar]
    assert members == [(("000", "jpg"), 0, 0), (("001", "png"), 0, 0), (("001", "rewrite0.txt"), 0, 0)]
    assert is_image_member("JPEG") and not is_image_member("txt") and "webp" in IMAGE_EXTS
    assert image_ext(b"RIFF1234WEBP") == "webp" and image_ext(b"??") == "img"
    assert split_member("dir/K.json") == ("K", "json") and split_member("noext") == ("noext", "")


def test_url_of():
    local = fsspec.filesystem("file")
    assert url_of(local, "/tmp/x/00000.tar") == "/tmp/x/00000.tar"
    assert url_of(fsspec.filesystem("memory"), "/x/00000.tar") == "memory:///x/00000.tar"
