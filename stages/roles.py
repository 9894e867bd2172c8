"""The two roles beside ``Stage``: where rows come from (``Source``) and where they go (``Sink``).

A pipeline is one source, any number of stages, one sink. Like stages, both are plain classes that
run without Ray; the executor finds them by role, never by name.

``Source`` (the ``read`` entry of a workflow)::

    src = Read(ReadConfig(...))
    src.check()                              # cheap input checks, before any work
    counts = src.split(rows_per_shard, write_shard)   # driver: cut the input into input shards
    rows = src.load(spec)                    # worker: one input shard (SHARD_SPEC_SCHEMA row) -> rows

``Sink`` (the ``write`` entry)::

    snk = Write(WriteConfig(...))
    stats = snk.write_shard(shard, rows, ctx)   # worker: one whole shard -> files; its stats dict
    # after every shard is complete (also when a rerun finds them all complete):
    units = snk.finish_plan(ctx, all_stats)     # driver: work that needs every shard (JSON-able units)
    done = [snk.finish_unit(u, ctx) for u in units]   # workers: one unit each, atomic, any order
    sizes = snk.finish(ctx, all_stats, done)    # driver: commit; {tar file name: samples}

Runtime parameters of the sink (where the output is, how shards are named, how many rows each
must have) travel in a ``SinkContext``, not in YAML-settable config fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from schemas.row import SHARD_COL
from stages.base import Declared, Resources


class _Role(Declared):
    """A source or a sink: declared like a stage (``stages.base.Declared``), called otherwise."""

    def resources(self) -> Resources:
        return Resources(num_cpus=0, actor=False)

    def setup(self) -> None:
        """Open what every call needs (once per worker)."""

    def _ensure_setup(self) -> None:
        if not self._setup_done:
            self.setup()
            self._setup_done = True



class Source(_Role):
    """Splits the input into input shards on the driver and loads one shard on a worker."""

    def check(self) -> None:
        """Cheap checks of the input (exists, format, columns, not empty) before any work.
        Raises ``ValueError`` with a one-line message naming the file and the key."""

    def split(self, samples_per_shard: int, write_shard: Callable[[int, pa.Table], Any]) -> list[int]:
        """Stream the input; call ``write_shard(shard, table)`` per input shard; return row counts
        (-1 where unknown until loaded)."""
        raise NotImplementedError

    def load(self, spec: dict[str, Any]) -> pa.Table:
        """The rows of one input shard (a ``SHARD_SPEC_SCHEMA`` row), with ``SHARD_COL`` set."""
        raise NotImplementedError

    def load_specs(self, specs: pa.Table) -> pa.Table:
        """``load`` for every spec row of ``specs``, concatenated."""
        self._ensure_setup()
        from schemas import conform

        out = [self.load(spec) for spec in specs.to_pylist()]
        if not out:
            return conform(pa.table({"key": pa.array([], pa.string()), "status": pa.array([], pa.string())}))
        return pa.concat_tables(out, promote_options="permissive")


@dataclass(frozen=True)
class SinkContext:
    """What the executor tells the sink at run time."""

    output: str  # the output folder (any fsspec URL)
    name_digits: int = 5  # digits of shard file names
    expected_rows: dict[int, int] = field(default_factory=dict)  # shard -> rows it must have (-1: unknown)
    started: dict[int, float] = field(default_factory=dict)  # shard -> time.time() its rows were loaded


class Sink(_Role):
    """Writes whole shards: files out, one stats dict per shard back."""

    def write_shard(self, shard: int, rows: pa.Table, ctx: SinkContext) -> dict:
        raise NotImplementedError

    def write(self, batch: pa.Table, ctx: SinkContext) -> list[dict]:
        """Write every shard present in ``batch`` (rows carry ``SHARD_COL``); stats in shard order."""
        self._ensure_setup()
        if SHARD_COL not in batch.column_names:
            raise ValueError(f"{self.name}: rows lack the internal {SHARD_COL!r} column set by the source")
        stats = []
        for shard in sorted(pc.unique(batch.column(SHARD_COL)).to_pylist()):
            rows = batch.filter(pc.equal(batch.column(SHARD_COL), shard))
            stats.append(self.write_shard(int(shard), rows, ctx))
        return stats

    def finish_plan(self, ctx: SinkContext, stats: list[dict]) -> list[dict]:
        """Driver, once every shard is complete (``stats``: every shard's stats dict, in shard
        order): the units of work that need all shards (a re-layout), each small and JSON-able.
        Must be idempotent: a rerun of a finished run calls it again. Default: none."""
        return []

    def finish_unit(self, unit: dict, ctx: SinkContext) -> dict:
        """Worker: do one unit of ``finish_plan`` (write its files atomically); its result."""
        raise NotImplementedError

    def finish(self, ctx: SinkContext, stats: list[dict], results: list[dict]) -> dict[str, int]:
        """Driver, after every unit is done: commit the run's outputs. Returns the tars a trainer
        reads, file name (relative to the output) -> samples, in order. Default: none."""
        return {}


def role_of(obj_or_cls) -> str:
    """``source``, ``sink`` or ``stage``."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    if issubclass(cls, Source):
        return "source"
    if issubclass(cls, Sink):
        return "sink"
    return "stage"
