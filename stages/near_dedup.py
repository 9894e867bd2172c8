"""Perceptual near-duplicates (``near_dedup``), a shuffle stage (``stages/shuffle.py``): rows whose images'
perceptual hashes (``imagehash.phash`` of the decoded ``image``) differ in at most ``max_distance`` bits.

Partition: each ``ok`` row's hash is cut into ``max_distance + 1`` bands of contiguous bits; one partition
row per band, ``part = hash(band index, band bits)``. Two hashes within ``max_distance`` bits agree on at
least one whole band (pigeonhole), so every near pair meets in at least one partition; nothing is missed.
Decide: within one ``part``, a row is a ``duplicate`` when a row with a smaller key is within
``max_distance``; the reason names the nearest such key (then the smallest) and the distance:

    near_dedup:phash duplicate of key 000000012 (distance 9 of 256 bits)

Rule tag ``near_duplicate:phash``. Like exact ``dedup`` the smallest key of a near pair is kept, and a row
is judged against every smaller-key row within the distance (kept or not), so the result does not depend on
the order or the partitioning. The stage also writes ``phash`` (hex) on every row it hashed.

Cost: one image decode + a 32x32 DCT per row (twice: partition and apply), ``max_distance + 1`` partition
rows of ~100 bytes per row. A partition holds the rows sharing one band value: with ``B`` bits per band
about ``N / 2**B`` rows of random-looking hashes, compared pairwise: the defaults (256 bits in 33 bands of
~8 bits) suit pools of millions; for hundreds of millions keep ``hash_size**2 / (max_distance + 1)`` at 16
bits or more (e.g. hash_size 16, max_distance 15), at some loss of recall on cropped copies.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pyarrow as pa
from pydantic import Field, model_validator

from stages.base import StageConfig, replace_column
from stages.dedup import key_rank
from stages.shuffle import PART, ShuffleStage, decisions

RULE = "near_duplicate:phash"


def phash_int(data: bytes, hash_size: int) -> int:
    """``imagehash.phash`` of the encoded image ``data`` as an int of ``hash_size**2`` bits."""
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        h = imagehash.phash(im.convert("RGB"), hash_size=hash_size)
    return int(str(h), 16)


def bands(bits: int, n_bands: int) -> list[tuple[int, int]]:
    """``n_bands`` contiguous (shift, width) bands covering ``bits`` bits, widths differing by at most 1."""
    base, extra = divmod(bits, n_bands)
    out, shift = [], 0
    for b in range(n_bands):
        width = base + (1 if b < extra else 0)
        out.append((shift, width))
        shift += width
    return out


class NearDedupConfig(StageConfig):
    hash_size: int = Field(
        16, ge=4, le=32, description="phash side: the hash has `hash_size`² bits (16: 256 bits, 8: 64)."
    )
    max_distance: int = Field(
        32,
        ge=0,
        description="Largest Hamming distance (bits) between two hashes that makes them near-duplicates; "
        "the hash is cut into `max_distance + 1` bands.",
    )

    @model_validator(mode="after")
    def _fits(self):
        if self.max_distance + 1 > self.hash_size**2:
            raise ValueError(f"max_distance must be below hash_size**2 ({self.hash_size**2})")
        return self


class NearDedup(ShuffleStage):
    name = "near_dedup"
    Config = NearDedupConfig
    requires = ("key", "image")
    produces = ("phash",)
    partition_columns = ("image",)

    @property
    def bits(self) -> int:
        return self.config.hash_size**2

    def _hashes(self, batch: pa.Table) -> list[int | None]:
        out = []
        for data in batch.column("image").to_pylist():
            try:
                out.append(phash_int(data, self.config.hash_size) if data else None)
            except Exception:  # noqa: BLE001 - an undecodable image has no hash (download rejects those)
                out.append(None)
        return out

    def _hex(self, h: int | None) -> str | None:
        return None if h is None else f"{h:0{self.bits // 4}x}"

    # ---- partition ------------------------------------------------------------------------
    def partition_rows(self, batch: pa.Table) -> pa.Table:
        keys = batch.column("key").to_pylist()
        parts, pkeys, phs = [], [], []
        cuts = bands(self.bits, self.config.max_distance + 1)
        for key, h in zip(keys, self._hashes(batch)):
            if h is None:
                continue
            for b, (shift, width) in enumerate(cuts):
                value = (h >> shift) & ((1 << width) - 1)
                digest = hashlib.blake2b(f"{b}:{value}".encode(), digest_size=8).digest()
                parts.append(int.from_bytes(digest, "little"))
                pkeys.append(key)
                phs.append(self._hex(h))
        return pa.table(
            {PART: pa.array(parts, pa.uint64()), "key": pa.array(pkeys, pa.string()), "phash": phs},
            schema=pa.schema([(PART, pa.uint64()), ("key", pa.string()), ("phash", pa.string())]),
        )

    # ---- decide ---------------------------------------------------------------------------
    def decide(self, group: pa.Table) -> pa.Table:
        keys = group.column("key").to_pylist()
        hashes = [int(h, 16) for h in group.column("phash").to_pylist()]
        by_part: dict[int, list[int]] = {}
        for i, p in enumerate(group.column(PART).to_pylist()):
            by_part.setdefault(p, []).append(i)
        best: dict[str, tuple[int, tuple, int, str]] = {}  # key -> (distance, kept order, row index, kept)
        for rows in by_part.values():
            if len(rows) < 2:
                continue
            rows.sort(key=lambda i: key_rank(keys[i]))
            for a in range(1, len(rows)):
                i = rows[a]
                for j in rows[:a]:
                    if keys[j] == keys[i]:
                        continue
                    d = (hashes[i] ^ hashes[j]).bit_count()
                    if d > self.config.max_distance:
                        continue
                    cand = (d, key_rank(keys[j]), i, keys[j])
                    if keys[i] not in best or cand[:2] < best[keys[i]][:2]:
                        best[keys[i]] = cand
        found = sorted(best.values(), key=lambda c: c[2])
        reasons = [
            f"near_dedup:phash duplicate of key {k} (distance {d} of {self.bits} bits)"
            for d, _, _, k in found
        ]
        return decisions(group, [c[2] for c in found], reasons, RULE, ranks=[c[0] for c in found])

    def decision_summary(self, table: pa.Table) -> dict[str, Any]:
        return {"flagged": table.num_rows}

    # ---- apply ----------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        batch = replace_column(
            batch, "phash", pa.array([self._hex(h) for h in self._hashes(batch)], pa.string())
        )
        return super().process(batch)


__all__ = ["NearDedup", "NearDedupConfig"]
