"""What Ray runs for a source, a stage or a sink.

Workers get small constructor arguments only (the entry's name in the registry, its config as
JSON, the URL of its fitted state, the name of the run's counter actor), passed by value, so an actor
that dies is restarted from them, and they build
the stage themselves: no stage object or state travels through the object store. Each operator is
named after its stage (``MapBatches(download)``), which is what progress bars and the dashboard show.
"""

from __future__ import annotations

import atexit
import json
import time
from typing import Any

import fsspec
import pyarrow as pa
import ray

from pipeline import registry
from schemas import OK
from schemas.row import SHARD_COL

# ---- per-process cache of built stages ---------------------------------------------------------------

_CACHE: dict[tuple, Any] = {}
_ATEXIT = False


def _teardown_all() -> None:
    for stage in list(_CACHE.values()):
        try:
            stage.teardown()
        except Exception:  # noqa: BLE001 - the process is ending
            pass
    _CACHE.clear()


def build(target: str, cfg_json: str, state_url: str | None = None, setup: bool = True, run: str | None = None):
    """The entry ``target`` (registry name or import path) with config ``cfg_json`` and the fitted
    state at ``state_url``, built and set up once per worker process. A fitted state is cached per
    ``run``: worker processes outlive runs, and the next run's state may sit at the same URL."""
    global _ATEXIT
    key = (target, cfg_json, state_url, setup, run if state_url else None)
    stage = _CACHE.get(key)
    if stage is None:
        cls = registry.get(target)
        stage = cls(cls.Config.model_validate_json(cfg_json))
        if state_url is not None:
            with fsspec.open(state_url, "rb") as f:
                stage.load_state(json.loads(f.read()))
        if setup:
            stage._ensure_setup()
        _CACHE[key] = stage
        if not _ATEXIT:
            atexit.register(_teardown_all)
            _ATEXIT = True
    return stage


# ---- progress counters ---------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class Counter:
    """Per-stage counters, reported by every worker after each block: ``rows`` it passed on (every
    row of the block), ``processed`` (the rows it worked on: the ``ok`` rows it got, every row for the
    source and the sink), busy ``seconds`` and the statuses it set."""

    def __init__(self):
        self.rows: dict[str, int] = {}
        self.processed: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.status: dict[str, dict[str, int]] = {}
        self.started: dict[int, float] = {}  # shard -> time.time() the source first loaded it

    def mark_started(self, shards: list[int], t: float) -> None:
        for s in shards:
            self.started.setdefault(s, t)

    def started_at(self, shards: list[int]) -> dict[int, float]:
        return {s: self.started[s] for s in shards if s in self.started}

    def report(
        self, stage: str, rows: int, seconds: float, rejected: dict[str, int], processed: int | None = None
    ) -> None:
        self.rows[stage] = self.rows.get(stage, 0) + rows
        self.processed[stage] = self.processed.get(stage, 0) + (rows if processed is None else processed)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        d = self.status.setdefault(stage, {})
        for k, v in rejected.items():
            d[k] = d.get(k, 0) + v

    def snapshot(self) -> dict:
        return {
            "rows": dict(self.rows),
            "processed": dict(self.processed),
            "seconds": dict(self.seconds),
            "status": {k: dict(v) for k, v in self.status.items()},
        }


def rejected_by(table: pa.Table, stage: str) -> dict[str, int]:
    import pyarrow.compute as pc

    if "rejected_by" not in table.column_names:
        return {}
    mask = pc.equal(table.column("rejected_by"), stage).fill_null(False)
    if not pc.any(mask).as_py():
        return {}
    vc = pc.value_counts(pc.filter(table.column("status"), mask))
    return {d["values"]: d["counts"] for d in vc.to_pylist()}


_COUNTERS: dict[str, Any] = {}


def counter_handle(counter: str | None):
    """The run's ``Counter`` actor, by name. Workers get the name, not the handle: a handle inside a
    UDF is an object-store reference in each actor's constructor arguments (ray-project/ray#53727)."""
    if counter is None:
        return None
    h = _COUNTERS.get(counter)
    if h is None:
        h = _COUNTERS[counter] = ray.get_actor(counter)
    return h


def ok_rows(table: pa.Table) -> int:
    """Rows of ``table`` a stage works on (``Stage.__call__`` hands only the ``ok`` rows to ``process``)."""
    import pyarrow.compute as pc

    if "status" not in table.column_names:
        return table.num_rows
    return int(pc.sum(pc.equal(table.column("status"), OK).fill_null(False).cast(pa.int64())).as_py() or 0)


def run_stage(
    stage, name: str, batch: pa.Table, counter: str | None, decisions_url: str | None = None
) -> pa.Table:
    t0 = time.perf_counter()
    if decisions_url is not None:  # a shuffle stage: the decisions of this block's shard(s) first
        import pyarrow.compute as pc

        from pipeline.ray.shuffle import load_shard_decisions

        shards = [int(s) for s in pc.unique(batch.column(SHARD_COL)).to_pylist()]
        load_shard_decisions(stage, decisions_url, shards)
    processed = ok_rows(batch)
    out = stage(batch)
    h = counter_handle(counter)
    if h is not None:
        h.report.remote(name, out.num_rows, time.perf_counter() - t0, rejected_by(out, name), processed)
    return out


# ---- stage operators ---------------------------------------------------------------------------


class StageActor:
    """One actor of a stage's pool (subclassed per stage, so Ray names the operator after it). Its
    stage is in the process's cache, torn down once when the process exits (``_teardown_all``)."""

    def __init__(self, name: str, target: str, cfg_json: str, state_url, counter, decisions_url=None):
        self.name, self.counter, self.decisions_url = name, counter, decisions_url
        self.stage = build(target, cfg_json, state_url, run=counter)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return run_stage(self.stage, self.name, batch, self.counter, self.decisions_url)


def actor_class(name: str) -> type:
    """A ``StageActor`` subclass named after the stage (the operator's name in Ray Data)."""
    return type(_label(name), (StageActor,), {"__module__": __name__})


def task_fn(name: str, target: str, cfg_json: str, state_url: str | None, counter, decisions_url=None):
    def fn(batch: pa.Table) -> pa.Table:
        stage = build(target, cfg_json, state_url, run=counter)
        return run_stage(stage, name, batch, counter, decisions_url)

    fn.__name__ = fn.__qualname__ = _label(name)
    return fn


def source_fn(name: str, target: str, cfg_json: str, counter):
    def fn(specs: pa.Table) -> pa.Table:
        src = build(target, cfg_json)
        h = counter_handle(counter)
        if h is not None:
            h.mark_started.remote(specs.column("shard").to_pylist(), time.time())
        t0 = time.perf_counter()
        out = src.load_specs(specs)
        if h is not None:
            h.report.remote(name, out.num_rows, time.perf_counter() - t0, {})
        return out

    fn.__name__ = fn.__qualname__ = _label(name)
    return fn


def spill_load_fn(label: str, paths: dict[int, str], columns: list[str] | None):
    def fn(specs: pa.Table) -> pa.Table:
        import pyarrow.parquet as pq

        out = []
        for shard in specs.column("shard").to_pylist():
            with fsspec.open(paths[shard], "rb") as f:
                out.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(out, promote_options="permissive")

    fn.__name__ = fn.__qualname__ = _label(label)
    return fn


class FitPartial:
    """``fit_partial`` of a global stage over one block; the pickled partial comes back as one row.
    As an actor it builds the stage once; as a plain callable (task) it uses the per-process cache.
    ``state_url``: the previous round's state (rounds after the first, ``fit_rounds``)."""

    def __init__(self, target: str, cfg_json: str, setup: bool = True, state_url=None, run=None):
        self.target, self.cfg_json, self.state_url, self.run = target, cfg_json, state_url, run
        self.stage = build(target, cfg_json, state_url, run=run) if setup else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pickle

        stage = self.stage or build(self.target, self.cfg_json, self.state_url, run=self.run)
        return pa.table({"p": pa.array([pickle.dumps(stage.fit_partial(batch))], pa.binary())})


def fit_class(name: str) -> type:
    return type(_label(f"fit_{name}"), (FitPartial,), {"__module__": __name__})


def _label(name: str) -> str:
    """An operator label from a stage name (plug-in names are import paths)."""
    return name.rsplit(":", 1)[-1] if ":" in name else name
