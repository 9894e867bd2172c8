"""Run a validated pipeline on Ray Data.

How a run goes (see DESIGN.md and pipeline/runs.py):

1. ``RunDir.prepare`` checks the output (same config: resume; other config: refuse unless overwrite).
2. The driver has the source split the input into input shards (once; reused on resume).
3. The stages between the source and the sink are cut into segments at each *global* stage
   (``pipeline.ray.fitting``): the rows entering it are spilled, it is fitted, its state persisted.
4. The last segment streams into a Datasink that writes the shards through the sink. Shards already
   complete are skipped, so a rerun redoes only incomplete ones.

Scheduling: one Ray block is one shard (the loader makes one block per shard; ``batch_size=None``
keeps blocks whole; ``target_max_block_size`` is raised so Ray does not split them). Each stage says
how it runs (``resources()``: tasks, or an actor pool with ``concurrency``/``num_gpus``; or a
``dataset_hook()``); nothing here knows a stage by name. Retries: tasks ``max_retries``, actors
``max_restarts`` + ``max_task_retries``, from ``ray:``.

Failures: a ``StageFailed`` raised in a worker (an error that is not a row's) ends the run with that
one-line message; after the run, each stage's ``max_error_fraction`` is checked against the manifest.
Shards written before a failure stay complete, so a rerun resumes from them.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from datetime import UTC, datetime

import pyarrow as pa
import ray

from pipeline import capacity
from pipeline import manifest as manifest_mod
from pipeline.config import Pipeline
from pipeline.ray import hooks, resources
from pipeline.ray.fitting import GlobalFits
from pipeline.ray.session import GLUE_TASK_CPUS, configure_data_context, glue_concurrency, init_ray
from pipeline.ray.sinks import ShardSink, finish
from pipeline.ray.workers import Counter, actor_class, source_fn, spill_load_fn, task_fn
from pipeline.runs import InputPlan, RunDir
from schemas.row import SHARD_COL, SHARD_SPEC_SCHEMA
from stages.base import StageFailed
from stages.roles import SinkContext

log = logging.getLogger("clipcurate")


_FAILED_LINE = re.compile(r"StageFailed: stage (\S+): (.+)")


def find_stage_failure(err: BaseException) -> StageFailed | None:
    """The ``StageFailed`` behind an error that came back through Ray (wrapped once or more, or only
    as the text of a remote traceback)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StageFailed):
            return StageFailed(e.stage, e.message)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    found = _FAILED_LINE.findall(str(err))
    return StageFailed(*found[-1]) if found else None


class Executor:
    def __init__(
        self, pipe: Pipeline, overwrite: bool = False, on_progress=None, quiet: bool = False, fingerprint=None
    ):
        self.pipe = pipe
        self.fingerprint = fingerprint  # the input's, when the caller (preflight) has just computed it
        self.quiet = quiet  # no Ray Data progress or INFO lines (``session.configure_data_context``)
        self.overwrite = overwrite
        self.on_progress = on_progress
        if not pipe.config.output:
            raise ValueError(f"{pipe.source}: no output: set 'output:' in the file or pass --output")
        self.rd = RunDir(pipe.config.output)
        self.stages = [pipe.build(i) for i in range(len(pipe.stages))]
        self.targets = [s.name for s in pipe.stages]  # registry names or import paths
        self.cfg_json = [s.config.model_dump_json() for s in pipe.stages]
        self.rc = pipe.config.ray
        self.fits = GlobalFits(self)
        self.counter: str | None = None  # name of the run's Counter actor (set by run)

    # -- datasets
    def _specs(self, shards: list[int]):
        rows = [
            {
                "shard": s,
                "path": self.rd.url_of(self.rd.input_path(s)),
                "rows": self.plan.counts[s],
                "shard_digits": self.plan.shard_digits,
                "index_digits": self.plan.index_digits,
            }
            for s in shards
        ]
        # one Arrow table per shard -> one block per shard, no shuffle
        return ray.data.from_arrow([pa.Table.from_pylist([r], schema=SHARD_SPEC_SCHEMA) for r in rows])

    def source_ds(self, boundary: int | None, shards: list[int], columns: list[str] | None = None):
        """Rows of ``shards`` entering segment ``boundary`` (None: from the source; else the spill
        before global stage ``boundary``), one block per shard."""
        specs = self._specs(shards)
        if boundary is None:
            fn = source_fn(self.stages[0].name, self.targets[0], self.cfg_json[0], self.counter)
        else:
            paths = {s: self.rd.url_of(self.rd.spill_path(boundary, s)) for s in shards}
            fn = spill_load_fn(f"spill_of_{self.stages[boundary].name}", paths, columns)
        return specs.map_batches(
            fn,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=GLUE_TASK_CPUS,
            compute=ray.data.TaskPoolStrategy(size=glue_concurrency()),
            max_retries=self.rc.max_task_retries,
        )

    def apply(self, ds, indices: list[int]):
        for i in indices:
            stage = self.stages[i]
            hook = stage.dataset_hook()
            if hook is not None:
                ds = hooks.apply(ds, hook, group_by=SHARD_COL)
                continue
            res = stage.resources()
            args = (stage.name, self.targets[i], self.cfg_json[i], self.fits.state_url(i), self.counter)
            args += (self.fits.decisions_url(i),)
            common = dict(batch_size=None, batch_format="pyarrow", zero_copy_batch=False, num_cpus=res.num_cpus)
            if res.num_gpus:
                common["num_gpus"] = res.num_gpus
            if res.actor:
                ds = ds.map_batches(
                    actor_class(stage.name),
                    fn_constructor_args=args,
                    compute=ray.data.ActorPoolStrategy(size=res.concurrency or 1),
                    max_restarts=self.rc.max_actor_restarts,
                    max_task_retries=self.rc.max_task_retries,
                    **common,
                )
            else:
                ds = ds.map_batches(task_fn(*args), max_retries=self.rc.max_task_retries, **common)
        return ds

    # -- segments
    def _segments(self) -> tuple[list[int], list[list[int]]]:
        return capacity.segments(self.stages)

    def dataset(self, pending: list[int]):
        """The Ray Dataset of the last segment for ``pending`` shards (fitting global stages first)."""
        if self.globals:
            last = len(self.globals) - 1
            self.fits.ensure_state(last)
            self.fits.ensure_spill(last, pending)
            ds = self.source_ds(self.globals[last], pending)
        else:
            ds = self.source_ds(None, pending)
        return self.apply(ds, self.segs[-1])

    # -- main
    def prepare(self) -> list[int]:
        """Start Ray, check resources and the output, split the input; the shards still to write."""
        init_ray(self.pipe, quiet=self.quiet)
        configure_data_context(self.pipe, quiet=self.quiet)
        self.globals, self.segs = self._segments()
        resources.check(self.pipe.source, self.stages, self.targets, self.segs)
        self.resumed = self.rd.prepare(self.pipe, overwrite=self.overwrite, fingerprint=self.fingerprint)
        self.plan: InputPlan = self.rd.input_plan(self.stages[0], self.pipe.config.samples_per_shard)
        done = self.rd.completed_shards(self.plan)
        pending = [s for s in range(self.plan.n_shards) if s not in done]
        log.info(
            "%s: %d input shards, %d complete, %d to do -> %s",
            "resuming" if self.resumed else "starting",
            self.plan.n_shards,
            len(done),
            len(pending),
            self.rd.url,
        )
        return pending

    def run(self) -> dict:
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        pending = self.prepare()
        self.counter = f"clipcurate-counter-{uuid.uuid4().hex[:12]}"  # workers find it by name
        self._counter = Counter.options(name=self.counter).remote()
        try:
            return self._run(pending, started, t0)
        finally:
            ray.kill(self._counter)

    def _run(self, pending: list[int], started: datetime, t0: float) -> dict:
        sink = self.stages[-1]
        ctx = SinkContext(
            output=self.rd.url,
            name_digits=self.plan.name_digits,
            expected_rows={s: c for s, c in enumerate(self.plan.counts)},
        )
        stop = threading.Event()
        poller = threading.Thread(target=self._poll, args=(stop,), daemon=True)
        poller.start()
        try:
            if pending:
                self.dataset(pending).write_datasink(
                    ShardSink(sink.name, self.targets[-1], self.cfg_json[-1], ctx, self.counter),
                    ray_remote_args={"num_cpus": GLUE_TASK_CPUS},
                    concurrency=glue_concurrency(),
                )
            else:
                # still load the states, so the manifest can summarise them
                for b in range(len(self.globals)):
                    self.fits.ensure_state(b)
        except Exception as e:
            failed = find_stage_failure(e)
            if failed is not None:
                raise failed from None
            raise
        finally:
            stop.set()
            poller.join(timeout=5)
        stats = self.rd.shard_stats()
        tars = finish(sink, self.targets[-1], self.cfg_json[-1], ctx, stats, self.rc.max_task_retries)
        progress = ray.get(self._counter.snapshot.remote())
        middle = self.stages[1:-1]
        data = manifest_mod.build(
            pipe=self.pipe,
            url=self.rd.url,
            stats=stats,
            tars=tars,
            stage_names=[s.name for s in middle],
            progress=progress,
            fit_seconds=self.fits.seconds,
            resumed=self.resumed,
            input_rows=sum(c for c in self.plan.counts if c >= 0),
            models={s.name: s.model_info() for s in self.stages if s.model_info()},
            global_state=self.fits.summaries(),
            started=started,
            wall=time.perf_counter() - t0,
        )
        limits = {s.name: getattr(s.config, "max_error_fraction", None) for s in middle}
        try:
            manifest_mod.check_error_fractions(data, {k: v for k, v in limits.items() if v is not None})
        except StageFailed as e:
            data["failed"] = str(e)  # the manifest says why the run failed; spills stay for the rerun
            manifest_mod.write(self.rd, data)
            raise
        manifest_mod.write(self.rd, data)
        if not self.pipe.config.keep_intermediate:
            self.rd.remove_spills()
        return data

    def _poll(self, stop: threading.Event) -> None:
        while not stop.wait(10.0):
            try:
                snap = ray.get(self._counter.snapshot.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress is best effort
                continue
            if self.on_progress:
                self.on_progress(snap)


def run(
    pipe: Pipeline, overwrite: bool = False, on_progress=None, quiet: bool = False, fingerprint=None
) -> dict:
    ex = Executor(pipe, overwrite=overwrite, on_progress=on_progress, quiet=quiet, fingerprint=fingerprint)
    return ex.run()
