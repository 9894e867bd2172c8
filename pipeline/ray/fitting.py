"""Global stages: the rows entering one are spilled per shard, its ``fit`` runs over the spill as a
Ray aggregation (partial states per block, merged on the driver), and the merged state is persisted
in the run directory (a resumed run reuses it). Workers load the state from there."""

from __future__ import annotations

import logging
import pickle
import time

import ray

from pipeline.ray.session import GLUE_TASK_CPUS, glue_concurrency
from pipeline.ray.sinks import SpillSink
from pipeline.ray.workers import fit_class

log = logging.getLogger("clipcurate")


class GlobalFits:
    """Spills and fitted states of the global stages of one run (``ex`` is the ``Executor``)."""

    def __init__(self, ex):
        self.ex = ex
        self.states: dict[int, object] = {}
        self.seconds: dict[str, float] = {}

    def state_url(self, index: int) -> str | None:
        """Where workers load the fitted state of stage ``index`` (None: not a global stage)."""
        if index not in self.states:
            return None
        rd = self.ex.rd
        return rd.url_of(rd.state_path(index, self.ex.stages[index].name))

    def ensure_spill(self, b: int, shards: list[int]) -> None:
        """Make the spill before global stage ``globals[b]`` exist for ``shards``."""
        ex, rd = self.ex, self.ex.rd
        g = ex.globals[b]
        missing = [s for s in shards if not rd.exists(rd.spill_path(g, s))]
        if not missing:
            return
        if b == 0:
            ds = ex.source_ds(None, missing)
        else:
            self.ensure_state(b - 1)
            self.ensure_spill(b - 1, missing)
            ds = ex.source_ds(ex.globals[b - 1], missing)
        ds = ex.apply(ds, ex.segs[b])
        paths = {s: rd.url_of(rd.spill_path(g, s)) for s in missing}
        name = ex.stages[g].name
        log.info("computing the rows entering global stage %s (%d shards)", name, len(missing))
        ds.write_datasink(
            SpillSink(f"spill_before_{name}", paths),
            ray_remote_args={"num_cpus": GLUE_TASK_CPUS},
            concurrency=glue_concurrency(),
        )

    def ensure_state(self, b: int) -> None:
        ex, rd = self.ex, self.ex.rd
        g = ex.globals[b]
        if g in self.states:
            return
        stage = ex.stages[g]
        path = rd.state_path(g, stage.name)
        if rd.exists(path):
            state = rd.read_json(path)
            log.info("reusing fitted state of %s from %s", stage.name, path)
        else:
            n = ex.plan.n_shards
            self.ensure_spill(b, list(range(n)))
            cols = list(dict.fromkeys([*stage.fit_columns, "key", "status"]))
            ds = ex.source_ds(g, list(range(n)), columns=cols)
            res = stage.resources()
            args = (ex.targets[g], ex.cfg_json[g])
            fit = fit_class(stage.name)
            if res.actor:  # set up once per actor (e.g. balance's automaton), not once per block
                kw = dict(fn_constructor_args=args, compute=ray.data.ActorPoolStrategy(size=res.concurrency or 1))
            else:
                kw, fit = {}, fit(*args, setup=False)
            log.info("fitting global stage %s over %d shards", stage.name, n)
            t0 = time.perf_counter()
            parts = ds.map_batches(fit, batch_size=None, batch_format="pyarrow", num_cpus=res.num_cpus, **kw).take_all()
            state = stage.merge([pickle.loads(r["p"]) for r in parts])
            self.seconds[stage.name] = time.perf_counter() - t0
            rd.write_json(path, state)
            state = rd.read_json(path)  # what workers will load: the JSON round trip
        stage.load_state(state)
        self.states[g] = state

    def summaries(self) -> dict[str, dict]:
        st = self.ex.stages
        return {st[g].name: st[g].state_summary(self.states[g]) for g in self.ex.globals if g in self.states}
