"""Shuffle stages on Ray (``stages.shuffle``): partition -> decide -> per-shard decisions, with no
process (the driver included) holding state that grows with the pool.

Files, under the stage's state folder ``_clipcurate/state/NN_name/`` (``NN_name.json`` beside it is
the completion marker, written last):

* ``parts/SSSSS.parquet``: one task per spill shard: ``partition_block`` of the shard, with a
  ``bucket`` column (``part`` modulo the number of buckets), sorted by bucket, one row group per bucket.
* ``decided/BBBBB.parquet``: one task per bucket reads that bucket's row groups of every ``parts``
  file (row-group statistics: only the footers of the others), calls ``decide`` once, and writes the
  decisions sorted by shard, one row group per shard.
* ``decisions/shard-SSSSS.parquet``: one task per shard reads its row groups of every ``decided``
  file, merges them (``merge_decisions``) and writes them (an empty table when it has none); it
  returns the stage's ``decision_summary``; the driver sums these and the decide tasks'
  ``group_summary`` into the manifest (``add_summary``).

Every file is written atomically. The driver only submits tasks and sums small summaries. A run
killed before the marker is written recomputes the whole shuffle on the next run (the folders are
cleared first); after the marker, ``parts/`` and ``decided/`` are removed (``keep_intermediate``
keeps them). The apply pass (``workers.run_stage``) loads the decisions of the shard(s) of its block
(``load_shard_decisions``) before calling the stage.

A shuffle stage with a reduce step (``has_fit``) is fitted first (``pipeline.ray.fitting``), its
state at ``NN_name/fit.json``; the tasks build the stage with it.
"""

from __future__ import annotations

import logging
import math
import posixpath
import time

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from schemas.row import SHARD_COL
from stages.io import atomic_write_bytes
from stages.shuffle import DECISIONS, PART, add_summary, merge_decisions, partition_block

log = logging.getLogger("clipcurate")

BUCKET = "bucket"
# Input rows per bucket (one ``decide`` call): about 50 bytes a partition row, a few per input row.
ROWS_PER_PARTITION = 1_000_000


def n_buckets(total_rows: int, rows_per_partition: int | None = None) -> int:
    return max(1, math.ceil(total_rows / (rows_per_partition or ROWS_PER_PARTITION)))


def decisions_file(decisions_url: str, shard: int) -> str:
    return posixpath.join(decisions_url.rstrip("/"), f"shard-{shard:05d}.parquet")


def load_shard_decisions(stage, decisions_url: str, shards: list[int]) -> None:
    """Install in ``stage`` the merged decisions of ``shards`` (what the apply pass calls)."""
    tables = []
    for s in shards:
        with fsspec.open(decisions_file(decisions_url, s), "rb") as f:
            tables.append(pq.read_table(f))
    stage.load_decisions(merge_decisions(tables))


def _write(url: str, table: pa.Table, group_col: str | None = None) -> None:
    """Write ``table`` atomically; one row group per value of ``group_col`` (sorted) when given."""
    buf = pa.BufferOutputStream()
    with pq.ParquetWriter(buf, table.schema, compression="zstd") as w:
        if group_col is None or table.num_rows == 0:
            w.write_table(table, row_group_size=max(1, table.num_rows))
        else:
            table = table.sort_by(group_col)
            col = table.column(group_col).to_numpy()
            cuts = [0, *(i + 1 for i in range(len(col) - 1) if col[i] != col[i + 1]), len(col)]
            for a, b in zip(cuts, cuts[1:]):
                w.write_table(table.slice(a, b - a), row_group_size=b - a)
    fs, path = fsspec.core.url_to_fs(url)
    atomic_write_bytes(fs, path, buf.getvalue().to_pybytes())


def _read_groups(url: str, col: str, value: int) -> pa.Table | None:
    """The rows of file ``url`` whose ``col`` is ``value``, reading only the row groups that may hold it."""
    with fsspec.open(url, "rb") as f:
        pf = pq.ParquetFile(f)
        i = pf.schema_arrow.get_field_index(col)
        groups = []
        for g in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(g).column(i).statistics
            if st is None or not st.has_min_max or st.min <= value <= st.max:
                groups.append(g)
        if not groups:
            return None
        t = pf.read_row_groups(groups)
    return t.filter(pc.equal(t.column(col), value))


def _numbered(folder_url: str, i: int) -> str:
    return posixpath.join(folder_url.rstrip("/"), f"{i:05d}.parquet")


def _build(target, cfg_json, fit_url, run):
    from pipeline.ray.workers import build

    return build(target, cfg_json, fit_url, run=run)


@ray.remote(num_cpus=1)
def _partition(target, cfg_json, fit_url, run, spill_url, columns, shard, buckets, out_url) -> int:
    stage = _build(target, cfg_json, fit_url, run)
    with fsspec.open(spill_url, "rb") as f:
        names = pq.read_schema(f).names
    with fsspec.open(spill_url, "rb") as f:
        block = pq.read_table(f, columns=[c for c in columns if c in names])
    rows = partition_block(stage, block, shard)
    bucket = pc.bit_wise_and(rows.column(PART).cast(pa.uint64()), pa.scalar(2**63 - 1, pa.uint64()))
    bucket = pa.array(pc.cast(bucket, pa.int64()).to_numpy() % buckets, pa.int64())
    _write(out_url, rows.append_column(BUCKET, bucket), BUCKET)
    return rows.num_rows


@ray.remote(num_cpus=1)
def _decide(target, cfg_json, fit_url, run, parts_url, n_shards, bucket, out_url) -> dict:
    stage = _build(target, cfg_json, fit_url, run)
    urls = (_numbered(parts_url, s) for s in range(n_shards))
    found = [t for t in (_read_groups(u, BUCKET, bucket) for u in urls) if t is not None and t.num_rows]
    out, summary = DECISIONS.empty_table(), {}
    if found:
        group = pa.concat_tables(found).drop_columns([BUCKET])
        out = stage.decide(group).select(DECISIONS.names).cast(DECISIONS)
        summary = stage.group_summary(group, out)
    _write(out_url, out, SHARD_COL)
    return summary


@ray.remote(num_cpus=1)
def _gather(target, cfg_json, fit_url, run, decided_url, n_buckets, shard, out_url) -> dict:
    stage = _build(target, cfg_json, fit_url, run)
    found = [_read_groups(_numbered(decided_url, b), SHARD_COL, shard) for b in range(n_buckets)]
    merged = merge_decisions([t for t in found if t is not None])
    _write(out_url, merged)
    return stage.decision_summary(merged)


def _run_all(refs: list, on_result=None) -> None:
    """Wait for ``refs`` as they finish (each result handed to ``on_result`` and dropped)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=min(len(pending), 64))
        for r in ray.get(done):
            if on_result is not None:
                on_result(r)


class ShuffleRun:
    """The shuffle of global stage ``g`` (a ``ShuffleStage``) of executor ``ex``."""

    def __init__(self, ex, g: int, fit_url: str | None):
        self.ex, self.g, self.fit_url = ex, g, fit_url
        rd = ex.rd
        self.marker = rd.state_path(g, ex.stages[g].name)
        self.base = self.marker[: -len(".json")]

    def url(self, *parts: str) -> str:
        return self.ex.rd.url_of(posixpath.join(self.base, *parts))

    @property
    def decisions_url(self) -> str:
        return self.url("decisions")

    def ensure(self) -> dict:
        """The marker's content (computing the shuffle when the marker is missing)."""
        ex, rd = self.ex, self.ex.rd
        if rd.exists(self.marker):
            log.info("reusing the decisions of %s from %s", ex.stages[self.g].name, self.base)
            return rd.read_json(self.marker)
        for sub in ("parts", "decided", "decisions"):  # a killed run's leftovers: start clean
            p = posixpath.join(self.base, sub)
            if rd.fs.exists(p):
                rd.fs.rm(p, recursive=True)
        summary = self.compute()
        data = {"shuffle": True, "buckets": self.buckets, "decisions": "decisions", "summary": summary}
        rd.write_json(self.marker, data)
        if not ex.pipe.config.keep_intermediate:
            for sub in ("parts", "decided"):
                p = posixpath.join(self.base, sub)
                if rd.fs.exists(p):
                    rd.fs.rm(p, recursive=True)
        return rd.read_json(self.marker)

    def compute(self) -> dict:
        ex, g = self.ex, self.g
        stage, n = ex.stages[g], ex.plan.n_shards
        self.buckets = n_buckets(sum(c for c in ex.plan.counts if c > 0))
        common = (ex.targets[g], ex.cfg_json[g], self.fit_url, ex.counter)
        cols = list(dict.fromkeys([*stage.partition_columns, "key", "status"]))
        name = stage.name
        t0 = time.perf_counter()
        log.info("shuffle of %s: partitioning %d shards into %d buckets", name, n, self.buckets)
        parts, decided, nb = self.url("parts"), self.url("decided"), self.buckets
        _run_all(
            [
                _partition.options(name=f"partition_{name}").remote(
                    *common, ex.rd.url_of(ex.rd.spill_path(g, s)), cols, s, nb, _numbered(parts, s)
                )
                for s in range(n)
            ]
        )
        summary: dict = {}
        _run_all(
            [
                _decide.options(name=f"decide_{name}").remote(*common, parts, n, b, _numbered(decided, b))
                for b in range(nb)
            ],
            lambda r: add_summary(summary, r),
        )
        _run_all(
            [
                _gather.options(name=f"decisions_{name}").remote(
                    *common, decided, nb, s, decisions_file(self.decisions_url, s)
                )
                for s in range(n)
            ],
            lambda r: add_summary(summary, r),
        )
        ex.fits.seconds[name] = ex.fits.seconds.get(name, 0.0) + time.perf_counter() - t0
        return summary
