"""``near_dedup`` (issue 13): the perceptual-hash tier, a shuffle stage run in one process (``run_local``).

Real parts: the shapes world with near-copies served on 127.0.0.1 and downloaded with the demo settings
(``copies_pool``), ``imagehash``'s phash. The brute-force oracle compares every pair of rows.
"""

from __future__ import annotations

import random
from collections import Counter

import pyarrow as pa

from stages.dedup import key_rank
from stages.near_dedup import NearDedup, bands, phash_int
from stages.shuffle import run_local


def blocks(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(s, size) for s in range(0, table.num_rows, size)]


def judged(stage, table: pa.Table, size: int, n_partitions: int) -> dict[str, tuple]:
    out = pa.concat_tables(run_local(stage, blocks(table, size), n_partitions))
    cols = (out.column(c).to_pylist() for c in ("key", "status", "reason", "rule"))
    return {k: (s, r, ru) for k, s, r, ru in zip(*cols)}


def oracle(table: pa.Table, hash_size: int, max_distance: int) -> dict[str, str]:
    """Every pair: a row is a duplicate of the nearest smaller-key row within the distance (then the smallest key)."""
    keys = table.column("key").to_pylist()
    hashes = [phash_int(b, hash_size) for b in table.column("image").to_pylist()]
    out = {}
    for i, k in enumerate(keys):
        near = [
            ((hashes[i] ^ hashes[j]).bit_count(), key_rank(keys[j]), keys[j])
            for j in range(len(keys))
            if key_rank(keys[j]) < key_rank(k) and (hashes[i] ^ hashes[j]).bit_count() <= max_distance
        ]
        if near:
            d, _, kept = min(near)
            out[k] = f"near_dedup:phash duplicate of key {kept} (distance {d} of {hash_size**2} bits)"
    return out


def test_bands_cover_the_hash_and_near_hashes_share_one():
    for bits, n in ((64, 7), (256, 33), (256, 1), (16, 16)):
        cuts = bands(bits, n)
        assert sum(w for _, w in cuts) == bits and cuts[0][0] == 0
        assert max(w for _, w in cuts) - min(w for _, w in cuts) <= 1
    rng = random.Random(0)
    cuts = bands(256, 33)
    for _ in range(200):  # pigeonhole: 32 flipped bits cannot touch all 33 bands
        h = rng.getrandbits(256)
        g = h
        for b in rng.sample(range(256), rng.randint(0, 32)):
            g ^= 1 << b
        same = [((h ^ g) >> s) & ((1 << w) - 1) == 0 for s, w in cuts]
        assert any(same)


def test_decisions_equal_brute_force_whatever_the_partitioning(copies_pool):
    stage_cfg = {"hash_size": 16, "max_distance": 32}
    want = oracle(copies_pool, 16, 32)
    assert len(want) >= 50, "the world has near-copies to find"
    for size, n_parts in ((copies_pool.num_rows, 1), (100, 3), (37, 7)):
        got = judged(NearDedup(stage_cfg), copies_pool, size, n_parts)
        flagged = {k: r for k, (s, r, _) in got.items() if s != "ok"}
        assert flagged == want, (size, n_parts)
        assert {got[k][2] for k in flagged} == {"near_duplicate:phash"}
        assert {got[k][0] for k in flagged} == {"duplicate"}


def test_phash_tier_flags_reencoded_and_resized_copies_not_distinct_renderings(copies_pool):
    """Acceptance 3 (perceptual tier), with the stage's defaults: >= 95% of the re-encoded and resized
    copies, <= 1% of the distinct renderings (rows that are no copy, whose concept another such row shares)."""
    got = judged(NearDedup(), copies_pool, 128, 4)
    t = copies_pool
    kind = t.column("copy_kind").to_pylist()
    flagged = [got[k][0] != "ok" for k in t.column("key").to_pylist()]
    concept = list(zip(*(t.column(c).to_pylist() for c in ("true_colour", "true_shape", "background"))))
    originals = [i for i, k in enumerate(kind) if k is None]
    shared = Counter(concept[i] for i in originals)
    renderings = [i for i in originals if shared[concept[i]] > 1]
    rate = {
        k: sum(flagged[i] for i in range(len(kind)) if kind[i] == k) / kind.count(k)
        for k in ("reencode", "resize", "crop", "recolour")
    }
    easy = [i for i, k in enumerate(kind) if k in ("reencode", "resize")]
    recall = sum(flagged[i] for i in easy) / len(easy)
    false = sum(flagged[i] for i in renderings) / len(renderings)
    print(f"near_dedup defaults: copies flagged {rate}; re-encoded+resized {recall:.3f} of {len(easy)}; "
          f"distinct renderings {false:.4f} of {len(renderings)}; all originals "
          f"{sum(flagged[i] for i in originals) / len(originals):.4f} of {len(originals)}")  # fmt: skip
    assert len(easy) >= 50 and len(renderings) >= 200
    assert recall >= 0.95
    assert false <= 0.01


def test_phash_column_is_written_on_every_hashed_row(copies_pool):
    t = copies_pool.slice(0, 40)
    out = pa.concat_tables(run_local(NearDedup({"hash_size": 8, "max_distance": 4}), [t], 2))
    ph = out.column("phash").to_pylist()
    assert all(p is not None and len(p) == 16 for p in ph)
    assert ph[0] == f"{phash_int(t.column('image')[0].as_py(), 8):016x}"
