"""The end of a run of the ``write`` sink: ``sizes.json``, and with ``write.reshard`` balanced tars.

Without ``reshard``, each input shard's tar is final; ``sizes.json`` lists it with its samples.

With ``reshard``, each input shard's tar is written to ``OUTPUT/_clipcurate/tars/NNNNN.tar`` first
(the Parquet and ``_stats.json`` go to the output as usual). Once every shard is complete, the
``ok`` samples, in input order (shard by shard, tar order within a shard), are cut into ``n``
balanced tars ``OUTPUT/00000.tar ...``: ``n = max(min_shards, ceil(total / samples_per_shard))``
(at most one tar per sample, at least one tar), and the sizes differ by at most one sample.
Units of work (run anywhere, in any order, each written under a temporary name and renamed):

* ``tar``: copy a range of samples (member bytes as they are) from one or more staged tars into
  one balanced tar;
* ``parquet``: rewrite one shard Parquet with its ``tar`` column naming each sample's balanced tar.

Then ``_clipcurate/reshard.json`` records the layout (written last: a rerun of a finished run
redoes nothing), ``sizes.json`` is written, and the staged tars are deleted. A run killed before
the record redoes every unit on the rerun, with the same result.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.manifest import PARQUET_SUFFIX, SIZES_NAME, STATE_DIR, TAR_SUFFIX, shard_name
from schemas.members import add_member, split_member
from schemas.row import TAR_COLUMN
from stages.io import atomic_write_bytes

TAR_COL = TAR_COLUMN  # Parquet column: the tar (relative to the output) that holds the row's sample
STAGED_DIR = f"{STATE_DIR}/tars"  # with reshard: the input shards' tars until the balanced ones exist
RECORD = f"{STATE_DIR}/reshard.json"


def tar_samples(stats: dict) -> int:
    """Samples in the tar of a shard's stats (``successes`` in stats written before ``tar_samples``)."""
    n = stats.get("tar_samples")
    return stats["successes"] if n is None else int(n)


def balanced_sizes(total: int, samples_per_shard: int, min_shards: int) -> list[int]:
    """Sizes of the balanced tars: as many as ``samples_per_shard`` needs and at least ``min_shards``
    (never more than ``total``, never fewer than one); they differ by at most one."""
    n = max(min_shards, -(-total // samples_per_shard))
    n = max(1, min(n, total))
    q, r = divmod(total, n)
    return [q + 1 if j < r else q for j in range(n)]


def _join(root: str, rel: str) -> str:
    return posixpath.join(root.rstrip("/"), rel)


def _digits(n: int, at_least: int) -> int:
    return max(at_least, len(str(max(n - 1, 0))))


def plan(root: str, stats: list[dict], samples_per_shard: int, min_shards: int, name_digits: int) -> dict:
    """The layout (``layout``: balanced tar -> samples, in order) and the units that make it."""
    counts = [(st["shard"], tar_samples(st)) for st in stats]
    sizes = balanced_sizes(sum(n for _, n in counts), samples_per_shard, min_shards)
    digits = _digits(len(sizes), name_digits)
    names = [f"{shard_name(j, digits)}{TAR_SUFFIX}" for j in range(len(sizes))]
    # walk both sequences at once: which samples of which input shard go to which balanced tar
    pieces: list[list[dict]] = [[] for _ in sizes]
    runs: dict[str, list[list]] = {name: [] for name, _ in counts}
    j, room = 0, sizes[0] if sizes else 0
    for shard, n in counts:
        done = 0
        while done < n:
            while room == 0:
                j += 1
                room = sizes[j]
            take = min(room, n - done)
            src = _join(root, f"{STAGED_DIR}/{shard}{TAR_SUFFIX}")
            pieces[j].append({"src": src, "skip": done, "take": take})
            runs[shard].append([names[j], take])
            done += take
            room -= take
    units = [{"kind": "tar", "out": _join(root, name), "pieces": p} for name, p in zip(names, pieces)]
    units += [
        {"kind": "parquet", "path": _join(root, f"{shard}{PARQUET_SUFFIX}"), "runs": runs[shard]}
        for shard, _ in counts
    ]
    return {"layout": dict(zip(names, sizes)), "sources": dict(counts), "units": units}


def _samples(fileobj):
    """(key, [(member name, bytes), ...]) per sample of a tar stream, in order."""
    key, members = None, []
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, _ = split_member(m.name)
            if key is not None and k != key:
                yield key, members
                members = []
            key = k
            members.append((m.name, tar.extractfile(m).read()))
    if key is not None:
        yield key, members


def write_balanced_tar(fs, unit: dict) -> int:
    """Copy the unit's pieces into its balanced tar (atomically); the number of samples written."""
    buf, n = io.BytesIO(), 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for piece in unit["pieces"]:
            skip, take, got = piece["skip"], piece["take"], 0
            with fs.open(piece["src"], "rb") as f:
                for i, (_, members) in enumerate(_samples(f)):
                    if i < skip:
                        continue
                    if got == take:
                        break
                    for name, data in members:
                        add_member(out, name, data)
                    got += 1
            if got != take:
                raise RuntimeError(
                    f"reshard: {piece['src']} has {skip + got} samples, expected {skip + take}"
                )
            n += got
    atomic_write_bytes(fs, unit["out"], buf.getvalue())
    return n


def point_parquet(fs, unit: dict, compression: str) -> int:
    """Rewrite one shard Parquet: each row whose ``tar`` is set gets its balanced tar, in order."""
    with fs.open(unit["path"], "rb") as f:
        table = pq.read_table(f)
    col = table.column(TAR_COL).to_pylist()
    names = iter([name for name, n in unit["runs"] for _ in range(n)])
    try:
        new = [None if v is None else next(names) for v in col]
    except StopIteration:
        raise RuntimeError(f"reshard: {unit['path']} has more samples than its tar") from None
    if next(names, None) is not None:
        raise RuntimeError(f"reshard: {unit['path']} has fewer samples than its tar")
    i = table.column_names.index(TAR_COL)
    table = table.set_column(i, TAR_COL, pa.array(new, pa.string()))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    atomic_write_bytes(fs, unit["path"], sink.getvalue().to_pybytes())
    return int(pc.sum(pc.is_valid(table.column(TAR_COL))).as_py() or 0)


def read_record(fs, root: str) -> dict | None:
    path = _join(root, RECORD)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def commit(fs, root: str, layout: dict[str, int], sources: dict[str, int]) -> None:
    """Record the finished layout, then drop the staged tars."""
    data = json.dumps({"layout": layout, "sources": sources}, indent=1).encode()
    atomic_write_bytes(fs, _join(root, RECORD), data)
    staged = _join(root, STAGED_DIR)
    if fs.exists(staged):
        fs.rm(staged, recursive=True)


def write_sizes(fs, root: str, sizes: dict[str, int]) -> None:
    """open_clip's ``sizes.json``: {tar file name: samples}."""
    atomic_write_bytes(fs, _join(root, SIZES_NAME), json.dumps(sizes, indent=1).encode())


def url_to_fs(url: str):
    fs, root = fsspec.core.url_to_fs(url, use_listings_cache=False)
    return fs, root.rstrip("/") or "/"
