"""Ray Datasinks: the final shards (through the pipeline's sink) and the spills before global stages."""

from __future__ import annotations

import dataclasses
import time

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Datasink

from pipeline.ray.workers import build, counter_handle
from schemas.row import SHARD_COL
from stages.io import atomic_write_bytes


class ShardSink(Datasink):
    """Writes final shards through the pipeline's ``Sink``; returns one stats dict per shard. Each
    block's rows and busy seconds go to the run's ``Counter`` (``counter``: its name), like a stage's;
    the counter also tells when the source loaded each shard (``SinkContext.started``)."""

    def __init__(self, name: str, target: str, cfg_json: str, ctx, counter: str | None = None):
        self.name, self.target, self.cfg_json, self.ctx, self.counter = name, target, cfg_json, ctx, counter

    def get_name(self) -> str:
        return self.name

    def write(self, blocks, ctx) -> list[dict]:
        sink = build(self.target, self.cfg_json)
        results = []
        h = counter_handle(self.counter)
        for block in blocks:
            if block.num_rows:
                t0 = time.perf_counter()
                results.extend(sink.write(block, self._context(block)))
                if h is not None:
                    h.report.remote(self.name, block.num_rows, time.perf_counter() - t0, {})
        return results

    def _context(self, block):
        h = counter_handle(self.counter)
        if h is None:
            return self.ctx
        shards = [int(s) for s in pc.unique(block.column(SHARD_COL)).to_pylist()]
        return dataclasses.replace(self.ctx, started=ray.get(h.started_at.remote(shards)))


def finish(sink, target: str, cfg_json: str, ctx, stats: list[dict], retries: int) -> dict[str, int]:
    """The sink's end of the run: its ``finish_plan`` units as Ray tasks (retried), then ``finish``."""
    units = sink.finish_plan(ctx, stats)
    results = []
    if units:

        @ray.remote(num_cpus=1, max_retries=retries)
        def unit_task(unit: dict) -> dict:
            return build(target, cfg_json).finish_unit(unit, ctx)

        results = ray.get([unit_task.options(name=f"{sink.name}.finish").remote(u) for u in units])
    return sink.finish(ctx, stats, results)


class SpillSink(Datasink):
    """Writes the rows entering a global stage, one Parquet per shard (atomically)."""

    def __init__(self, label: str, paths: dict[int, str]):
        self.label, self.paths = label, paths

    def get_name(self) -> str:
        return self.label

    def write(self, blocks, ctx) -> int:
        n = 0
        for block in blocks:
            for shard in pc.unique(block.column(SHARD_COL)).to_pylist():
                rows = block.filter(pc.equal(block.column(SHARD_COL), shard))
                buf = pa.BufferOutputStream()
                pq.write_table(rows, buf, compression="zstd")
                fs, path = fsspec.core.url_to_fs(self.paths[shard])
                atomic_write_bytes(fs, path, buf.getvalue().to_pybytes())
                n += 1
        return n
