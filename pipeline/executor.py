"""Run a validated pipeline on Ray Data. The only module that imports ray.

How a run goes (see DESIGN.md and pipeline/runs.py):

1. ``RunDir.prepare`` checks the output (same config: resume; other config: refuse unless overwrite).
2. The driver splits the input list into input shards (once; reused on resume).
3. The stages between ``read`` and ``write`` are cut into segments at each *global* stage. The rows
   entering a global stage are spilled per shard to the run dir; the stage's ``fit`` runs over the
   spill as a Ray aggregation (``map_batches`` of partial states, merged on the driver); the merged
   state is persisted and reused on resume.
4. The last segment streams into a Datasink that writes the shards. Shards already complete are
   skipped, so a rerun redoes only incomplete ones.

Scheduling: one Ray block is one shard (the loader makes one block per shard; ``batch_size=None``
keeps blocks whole; ``target_max_block_size`` is raised so Ray does not split them). Stateless
stages run as Ray tasks, stages with ``setup`` as actor pools (``concurrency``, ``num_gpus``).
Retries: tasks ``max_retries``, actors ``max_restarts`` + ``max_task_retries``, from ``ray:``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
import time
import warnings
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import ray
from ray.data import DataContext, Datasink

from pipeline import registry
from pipeline.config import ConfigError, Pipeline
from pipeline.runs import InputPlan, RunDir
from schemas.manifest import MANIFEST_NAME, Manifest, ShardEntry
from stages.read import SHARD_COL, SPEC_SCHEMA

log = logging.getLogger("clipcurate")

# Retry options (max_retries, max_restarts, max_task_retries) have no named parameter in Ray 2.60's
# map_batches and still go through ray_remote_args; we set them explicitly on purpose.
warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")

# Test-only fault injection: ``CLIPCURATE_TEST_KILL_ONCE=stage:FILE`` makes the first worker of that
# stage that finds FILE absent create it and exit hard mid-batch (os._exit), as a crashing actor would.
KILL_ENV = "CLIPCURATE_TEST_KILL_ONCE"

# CPUs reserved by the glue tasks (input/spill loaders, shard/spill sinks). They are I/O-bound and
# short; reserving a whole CPU each deadlocks a cluster whose CPUs are all held by actor pools (the
# demo on 2 CPUs: download + clip_score actors hold both, so read and write could never start).
# Reserving no CPU, they are capped by count instead (``_glue_concurrency``): uncapped, Ray Data
# starts one worker process (~200 MB) per pending shard and memory grows with the input
# (bench/scale.py: 2.2x the peak at 10x input uncapped, flat capped).
GLUE_TASK_CPUS = 0


def _glue_concurrency() -> int:
    """Glue tasks in flight per operator: enough writers for a large cluster, few on a small one."""
    return max(2, int(ray.cluster_resources().get("CPU", 0)) // 4)


# ---- Ray session ------------------------------------------------------------------------------------


# Driver environment forwarded to every Ray worker (runtime_env). AWS_*/FSSPEC_* carry object-store
# credentials and endpoints (AWS_ENDPOINT_URL, FSSPEC_S3_*), so nodes of a `ray start` cluster, whose
# environment is not the driver's, reach the same storage. They are visible in the job's runtime env;
# on a real cluster prefer instance roles / node-level credentials and leave them unset on the driver.
ENV_PREFIXES = ("CLIPCURATE_", "NO_ALBUMENTATIONS", "HF_", "AWS_", "FSSPEC_", "GOOGLE_APPLICATION_")


def init_ray(pipe: Pipeline) -> None:
    if ray.is_initialized():
        return
    rc = pipe.config.ray
    address = rc.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}}
    if address:
        # Inside a Ray Job the job's runtime env already reaches every worker; passing one here too
        # makes Ray refuse to merge any key both set.
        in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
        ray.init(address=address, runtime_env=None if in_job else env, log_to_driver=True)
    else:
        ray.init(
            address="local",  # never attach to some other cluster on this machine by accident
            num_cpus=rc.num_cpus,
            object_store_memory=rc.object_store_memory,
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=True,
        )


def _configure_data_context(pipe: Pipeline) -> None:
    ctx = DataContext.get_current()
    ctx.target_max_block_size = pipe.config.ray.target_max_block_size
    ctx.enable_progress_bars = pipe.config.ray.show_progress
    ctx.enable_operator_progress_bars = pipe.config.ray.show_progress
    ctx.verbose_progress = False
    ctx.execution_options.preserve_order = False


# ---- progress counters ----------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class _Counter:
    """Per-stage row counters, seconds and status counts, reported by every worker after each block."""

    def __init__(self):
        self.rows = defaultdict(int)
        self.seconds = defaultdict(float)
        self.status = defaultdict(lambda: defaultdict(int))

    def report(self, stage: str, rows: int, seconds: float, rejected: dict[str, int]) -> None:
        self.rows[stage] += rows
        self.seconds[stage] += seconds
        for k, v in rejected.items():
            self.status[stage][k] += v

    def snapshot(self) -> dict:
        return {
            "rows": dict(self.rows),
            "seconds": dict(self.seconds),
            "status": {k: dict(v) for k, v in self.status.items()},
        }


def _rejected_by(table: pa.Table, stage: str) -> dict[str, int]:
    import pyarrow.compute as pc

    mask = pc.equal(table.column("rejected_by"), stage).fill_null(False)
    if not pc.any(mask).as_py():
        return {}
    vc = pc.value_counts(pc.filter(table.column("status"), mask))
    return {d["values"]: d["counts"] for d in vc.to_pylist()}


# ---- stage wrappers (what Ray runs) --------------------------------------------------------------

_CACHE: dict[tuple, Any] = {}


def _build(name: str, cfg, state_ref):
    """The stage for (name, config, state), built and set up once per worker process."""
    key = (name, cfg.model_dump_json(), state_ref.hex() if isinstance(state_ref, ray.ObjectRef) else None)
    stage = _CACHE.get(key)
    if stage is None:
        cls = registry.get(name)
        stage = cls(cfg)
        if state_ref is not None:
            stage.load_state(ray.get(state_ref) if isinstance(state_ref, ray.ObjectRef) else state_ref)
        stage._ensure_setup()
        _CACHE[key] = stage
    return stage


def _maybe_kill(name: str) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec or ":" not in spec:
        return
    stage, path = spec.split(":", 1)
    if stage == name and not os.path.exists(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        log.warning("test fault injection: killing this %s worker (pid %d)", name, os.getpid())
        os._exit(1)


def _run(stage, name: str, batch: pa.Table, counter) -> pa.Table:
    t0 = time.perf_counter()
    _maybe_kill(name)
    out = stage(batch)
    if counter is not None:
        counter.report.remote(name, out.num_rows, time.perf_counter() - t0, _rejected_by(out, name))
    return out


class _StageActor:
    def __init__(self, name: str, cfg, state_ref, counter):
        self.name = name
        self.counter = counter
        self.stage = _build(name, cfg, state_ref)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _run(self.stage, self.name, batch, self.counter)


class _FitActor:
    """``fit_partial`` of a global stage over one block; the pickled partial comes back as one row.
    As an actor it builds the stage once; as a plain callable (task) it uses the per-process cache."""

    def __init__(self, name: str, cfg, setup: bool = True):
        self.name, self.cfg = name, cfg
        self.stage = _build(name, cfg, None) if setup else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        stage = self.stage or _build(self.name, self.cfg, None)
        return pa.table({"p": pa.array([pickle.dumps(stage.fit_partial(batch))], pa.binary())})


def _task_fn(name: str, cfg, state_ref, counter):
    def fn(batch: pa.Table) -> pa.Table:
        return _run(_build(name, cfg, state_ref), name, batch, counter)

    return fn


def _load_fn(read_cfg, counter):
    def fn(specs: pa.Table) -> pa.Table:
        stage = _build("read", read_cfg, None)
        t0 = time.perf_counter()
        out = stage(specs)
        if counter is not None:
            counter.report.remote("read", out.num_rows, time.perf_counter() - t0, {})
        return out

    return fn


def _spill_load_fn(paths: dict[int, str], columns: list[str] | None):
    def fn(specs: pa.Table) -> pa.Table:
        import fsspec
        import pyarrow.parquet as pq

        out = []
        for shard in specs.column("shard").to_pylist():
            with fsspec.open(paths[shard], "rb") as f:
                out.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(out, promote_options="permissive")

    return fn


def apply_llm(ds, spec, group_by: str = "key"):
    """Apply a ``stages.rewrite.LLMSpec`` to a Ray Dataset through ``ray.data.llm`` and return it.

    Each ray.data.llm engine returns one generation per row, so every row is exploded into one carrier
    row (it bypasses the LLM) plus one request row per generation, run through the processor, and
    gathered back by ``group_by``. Rows in == rows out; grouped by the shard column, each shard comes
    back whole (in key order) inside one block, which is what the writer needs."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor, vLLMEngineProcessorConfig

    if spec.kind == "vllm":
        config = vLLMEngineProcessorConfig(**spec.processor_kwargs)
    elif spec.kind == "http":
        config = HttpRequestProcessorConfig(**spec.processor_kwargs, headers=spec.headers or None)
    else:
        raise ValueError(f"unknown llm spec kind {spec.kind!r}")
    processor = build_processor(config, preprocess=spec.preprocess, postprocess=spec.postprocess)
    ds = ds.map_batches(spec.explode, batch_format="pyarrow")
    ds = processor(ds)
    return ds.groupby(group_by).map_groups(spec.collect, batch_format="pyarrow")


# ---- sinks -------------------------------------------------------------------------------------


class _ShardSink(Datasink):
    """Writes final shards through the ``write`` stage."""

    def __init__(self, cfg):
        self.cfg = cfg

    def write(self, blocks, ctx) -> list[dict]:
        stage = _build("write", self.cfg, None)
        results = []
        for block in blocks:
            if block.num_rows:
                out = stage(block)
                results.extend(json.loads(s) for s in out.column("stats").to_pylist())
        return results


class _SpillSink(Datasink):
    """Writes the rows entering a global stage, one Parquet per shard (atomically)."""

    def __init__(self, paths: dict[int, str]):
        self.paths = paths

    def write(self, blocks, ctx) -> int:
        import fsspec
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from stages.io import atomic_write_bytes

        n = 0
        for block in blocks:
            for shard in pc.unique(block.column(SHARD_COL)).to_pylist():
                rows = block.filter(pc.equal(block.column(SHARD_COL), shard))
                sink = pa.BufferOutputStream()
                pq.write_table(rows, sink, compression="zstd")
                fs, path = fsspec.core.url_to_fs(self.paths[shard])
                atomic_write_bytes(fs, path, sink.getvalue().to_pybytes())
                n += 1
        return n


# ---- the run ------------------------------------------------------------------------------------


class Executor:
    def __init__(self, pipe: Pipeline, overwrite: bool = False, on_progress=None):
        self.pipe = pipe
        self.overwrite = overwrite
        self.on_progress = on_progress
        if not pipe.config.output:
            raise ValueError(f"{pipe.source}: no output: set 'output:' in the file or pass --output")
        self.rd = RunDir(pipe.config.output)
        self.stages = [pipe.build(i) for i in range(len(pipe.stages))]
        self.rc = pipe.config.ray
        self.states: dict[int, Any] = {}
        self.state_refs: dict[int, Any] = {}

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
        return ray.data.from_arrow([pa.Table.from_pylist([r], schema=SPEC_SCHEMA) for r in rows])

    def _source(self, boundary: int | None, shards: list[int], columns: list[str] | None = None):
        """Rows of ``shards`` entering segment ``boundary`` (None: from the input; else the spill
        before global stage ``boundary``), one block per shard."""
        specs = self._specs(shards)
        if boundary is None:
            fn = _load_fn(self.stages[0].config, self.counter)
        else:
            paths = {s: self.rd.url_of(self.rd.spill_path(boundary, s)) for s in shards}
            fn = _spill_load_fn(paths, columns)
        return specs.map_batches(
            fn,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=GLUE_TASK_CPUS,
            concurrency=_glue_concurrency(),
            max_retries=self.rc.max_task_retries,
        )

    def _apply(self, ds, indices: list[int]):
        for i in indices:
            stage = self.stages[i]
            if getattr(stage.config, "engine", None) in ("vllm", "openai") and hasattr(stage, "llm_spec"):
                # LLM engines run through ray.data.llm (vLLM replicas or an OpenAI-compatible endpoint)
                ds = apply_llm(ds, stage.llm_spec(), group_by=SHARD_COL)
                continue
            cfg = stage.config
            state_ref = self.state_refs.get(i)
            res = stage.resources()
            common = dict(
                batch_size=None,
                batch_format="pyarrow",
                zero_copy_batch=False,
                num_cpus=res.num_cpus,
            )
            if res.num_gpus:
                common["num_gpus"] = res.num_gpus
            test_env = {k: v for k, v in os.environ.items() if k == KILL_ENV}
            if test_env:
                common["runtime_env"] = {"env_vars": test_env}
            if res.actor:
                ds = ds.map_batches(
                    _StageActor,
                    fn_constructor_args=(stage.name, cfg, state_ref, self.counter),
                    compute=ray.data.ActorPoolStrategy(size=res.concurrency or 1),
                    max_restarts=self.rc.max_actor_restarts,
                    max_task_retries=self.rc.max_task_retries,
                    **common,
                )
            else:
                ds = ds.map_batches(
                    _task_fn(stage.name, cfg, state_ref, self.counter),
                    max_retries=self.rc.max_task_retries,
                    **common,
                )
        return ds

    # -- segments and global stages
    def _segments(self) -> tuple[list[int], list[list[int]]]:
        middle = list(range(1, len(self.stages) - 1))
        globals_ = [i for i in middle if self.stages[i].is_global]
        segs, cur = [], []
        for i in middle:
            if i in globals_:
                segs.append(cur)
                cur = [i]
            else:
                cur.append(i)
        segs.append(cur)
        return globals_, segs

    def _ensure_spill(self, b: int, shards: list[int]) -> None:
        """Make the spill before global stage ``globals[b]`` exist for ``shards``."""
        g = self.globals[b]
        missing = [s for s in shards if not self.rd.exists(self.rd.spill_path(g, s))]
        if not missing:
            return
        if b == 0:
            ds = self._source(None, missing)
        else:
            self._ensure_state(b - 1)
            self._ensure_spill(b - 1, missing)
            ds = self._source(self.globals[b - 1], missing)
        ds = self._apply(ds, self.segs[b])
        paths = {s: self.rd.url_of(self.rd.spill_path(g, s)) for s in missing}
        log.info("computing the rows entering global stage %s (%d shards)", self.stages[g].name, len(missing))
        ds.write_datasink(
            _SpillSink(paths), ray_remote_args={"num_cpus": GLUE_TASK_CPUS}, concurrency=_glue_concurrency()
        )

    def _ensure_state(self, b: int) -> None:
        g = self.globals[b]
        if g in self.states:
            return
        stage = self.stages[g]
        path = self.rd.state_path(g, stage.name)
        if self.rd.exists(path):
            state = self.rd.read_json(path)
            log.info("reusing fitted state of %s from %s", stage.name, path)
        else:
            self._ensure_spill(b, list(range(self.plan.n_shards)))
            cols = list(dict.fromkeys([*stage.fit_columns, "key", "status"]))
            ds = self._source(g, list(range(self.plan.n_shards)), columns=cols)
            res = stage.resources()
            args = (stage.name, stage.config)
            if res.actor:  # set up once per actor (e.g. balance's automaton), not once per block
                kw = dict(fn_constructor_args=args, compute=ray.data.ActorPoolStrategy(size=res.concurrency or 1))
                fit = _FitActor
            else:
                kw, fit = {}, _FitActor(*args, setup=False)
            log.info("fitting global stage %s over %d shards", stage.name, self.plan.n_shards)
            t0 = time.perf_counter()
            parts = ds.map_batches(fit, batch_size=None, batch_format="pyarrow", num_cpus=res.num_cpus, **kw).take_all()
            state = stage.merge([pickle.loads(r["p"]) for r in parts])
            self.fit_seconds[stage.name] = time.perf_counter() - t0
            self.rd.write_json(path, state)
        stage.load_state(state)
        self.states[g] = state
        self.state_refs[g] = ray.put(state)

    def _check_resources(self) -> None:
        """Fail before any work if the actor pools that stream together cannot all be placed on the
        cluster (Ray would wait forever), or if a stage asks for GPUs the cluster does not have."""
        total = ray.cluster_resources()
        cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
        src = self.pipe.source
        for seg in self.segs:
            need_cpu, need_gpu, parts = 0.0, 0.0, []
            # task stages need a CPU free beside the actors (the largest of them), or they starve
            tasks = [self.stages[i].resources().num_cpus for i in seg if not self.stages[i].resources().actor]
            if tasks:
                need_cpu += max(tasks)
                parts.append((seg[0], f"task stages {max(tasks):g} CPU"))
            for i in seg:
                stage = self.stages[i]
                res = stage.resources()
                if not res.actor:
                    continue
                n = res.concurrency or 1
                if res.num_gpus and gpus == 0:
                    raise ConfigError(
                        f"{src}: stages[{i}] ({stage.name}): num_gpus={res.num_gpus:g} but the Ray cluster has no GPU; "
                        f"set num_gpus: 0 to run on CPU (--set stages.{stage.name}.num_gpus=0)"
                    )
                need_cpu += n * res.num_cpus
                need_gpu += n * res.num_gpus
                parts.append((i, f"{stage.name} {n}x{res.num_cpus:g} CPU"))
            if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
                # name the stage that asks for the most: the first one to lower
                actors = [j for j in seg if self.stages[j].resources().actor]
                i = max(actors, key=lambda j: (self.stages[j].resources().concurrency or 1) * max(
                    self.stages[j].resources().num_cpus, self.stages[j].resources().num_gpus))
                raise ConfigError(
                    f"{src}: stages[{i}] ({self.stages[i].name}): the actor pools that run together "
                    f"({', '.join(p for _, p in parts)}) need {need_cpu:g} CPUs and {need_gpu:g} GPUs, the Ray "
                    f"cluster has {cpus:g} CPUs and {gpus:g} GPUs; lower 'concurrency' or 'num_cpus' of these stages"
                )

    # -- main
    def run(self) -> dict:
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        init_ray(self.pipe)
        _configure_data_context(self.pipe)
        self.globals, self.segs = self._segments()
        self._check_resources()
        self.resumed = self.rd.prepare(self.pipe, overwrite=self.overwrite)
        self.counter = _Counter.remote()
        self.fit_seconds: dict[str, float] = {}
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
        writer = self.stages[-1]
        writer.config = writer.config.model_copy(
            update={
                "output": self.rd.url,
                "name_digits": self.plan.name_digits,
                "expected_rows": {s: c for s, c in enumerate(self.plan.counts)},
            }
        )
        stop = threading.Event()
        poller = threading.Thread(target=self._poll, args=(stop,), daemon=True)
        poller.start()
        try:
            if pending:
                if self.globals:
                    last = len(self.globals) - 1
                    self._ensure_state(last)
                    self._ensure_spill(last, pending)
                    ds = self._source(self.globals[last], pending)
                else:
                    ds = self._source(None, pending)
                ds = self._apply(ds, self.segs[-1])
                ds.write_datasink(
                    _ShardSink(writer.config),
                    ray_remote_args={"num_cpus": GLUE_TASK_CPUS},
                    concurrency=_glue_concurrency(),
                )
            else:
                # still load the states, so the manifest can summarise them
                for b in range(len(self.globals)):
                    self._ensure_state(b)
        finally:
            stop.set()
            poller.join(timeout=5)
        progress = ray.get(self.counter.snapshot.remote())
        manifest = self._manifest(started, time.perf_counter() - t0, progress)
        if not self.pipe.config.keep_intermediate:
            self.rd.remove_spills()
        return manifest

    def _poll(self, stop: threading.Event) -> None:
        while not stop.wait(10.0):
            try:
                snap = ray.get(self.counter.snapshot.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress is best effort
                continue
            if self.on_progress:
                self.on_progress(snap)

    def _manifest(self, started: datetime, wall: float, progress: dict) -> dict:
        stats = self.rd.shard_stats()
        status_counts: dict[str, int] = defaultdict(int)
        rule_counts: dict[str, int] = defaultdict(int)
        stage_status: dict[str, dict[str, int]] = {}
        for st in stats:
            for k, v in st["status_dict"].items():
                status_counts[k] += v
            for k, v in st.get("rule_dict", {}).items():
                rule_counts[k] += v
            for stg, d in st.get("stage_status", {}).items():
                tgt = stage_status.setdefault(stg, {})
                for k, v in d.items():
                    tgt[k] = tgt.get(k, 0) + v
        shards = [ShardEntry(name=st["shard"], count=st["count"], successes=st["successes"]) for st in stats]
        names = [s.name for s in shards]
        pattern = (
            f"{self.rd.url.rstrip('/')}/{{{names[0]}..{names[-1]}}}.tar"
            if len(names) > 1
            else f"{self.rd.url.rstrip('/')}/{names[0]}.tar"
            if names
            else ""
        )
        models = {s.name: s.model_info() for s in self.stages if s.model_info()}
        global_state = {
            self.stages[g].name: self.stages[g].state_summary(self.states[g]) for g in self.globals if g in self.states
        }
        m = Manifest(
            name=self.pipe.config.name,
            output=self.rd.url,
            total_rows=sum(s.count for s in shards),
            total_samples=sum(s.successes for s in shards),
            shard_pattern=pattern,
            shards=shards,
            status_counts=dict(sorted(status_counts.items())),
            rule_counts=dict(sorted(rule_counts.items(), key=lambda kv: -kv[1])),
            stage_status=stage_status,
            stage_seconds={k: round(v, 3) for k, v in progress["seconds"].items()},
            stage_rows=progress["rows"],
            fit_seconds={k: round(v, 3) for k, v in self.fit_seconds.items()},
            resumed=self.resumed,
            input_rows=sum(c for c in self.plan.counts if c >= 0),
            models=models,
            global_state=global_state,
            config=self.pipe.resolved(),
            config_hash=self.pipe.config_hash(),
            versions=_versions(),
            started_at=started.isoformat(timespec="seconds"),
            finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
            wall_seconds=round(wall, 3),
        )
        data = m.model_dump(mode="json")
        self.rd.write_json(self.rd.path(MANIFEST_NAME), data)
        return data


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("clipcurate", "ray", "pyarrow", "polars", "torch", "open_clip_torch", "img2dataset", "webdataset", "transformers"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    import sys

    out["python"] = sys.version.split()[0]
    return out


def run(pipe: Pipeline, overwrite: bool = False, on_progress=None) -> dict:
    return Executor(pipe, overwrite=overwrite, on_progress=on_progress).run()


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def submit(workflow: str, address: str | None, args: list[str], working_dir: str, runtime_env: dict) -> int:
    """Submit ``python -m pipeline run WORKFLOW ARGS`` as a Ray Job, stream its logs, return its exit code."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    env = dict(runtime_env)
    env["working_dir"] = working_dir
    entry = " ".join(["python", "-m", "pipeline", "run", workflow, *[_quote(a) for a in args]])
    job_id = client.submit_job(entrypoint=entry, runtime_env=env)
    print(f"submitted job {job_id}: {entry}", flush=True)
    import asyncio

    async def _tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(_tail())
    except Exception as e:  # noqa: BLE001 - log streaming is best effort; the status is what counts
        log.warning("log streaming stopped: %s", e)
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    print(f"job {job_id}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


def ensure_local_ray(num_cpus: int | None = None) -> None:
    """Start a local Ray once (tests share one session through this)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
