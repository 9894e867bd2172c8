"""Global stages: the rows entering one are spilled per shard, then

* a *reduce* stage (``fit_partial``/``merge``/``load_state``) is fitted over the spill as a Ray
  aggregation: small partial states per block, merged on the driver, in ``fit_rounds`` rounds (a
  round after the first runs on workers that loaded the previous round's state, e.g. ``clip_filter``'s
  refinement over the rows near its cut). The state is persisted in the run directory (a resumed run
  reuses it) and workers load it from there;
* a *shuffle* stage (``shuffle = True``, ``stages.shuffle``) is fitted first when it has a reduce
  step (``has_fit``), then runs its shuffle (``pipeline.ray.shuffle``): per-shard decision files
  that the apply pass loads. Its state file is the shuffle's completion marker."""

from __future__ import annotations

import logging
import pickle
import posixpath
import time

import ray

from pipeline.ray.session import GLUE_TASK_CPUS, glue_concurrency
from pipeline.ray.shuffle import ShuffleRun
from pipeline.ray.sinks import SpillSink
from pipeline.ray.workers import fit_class

log = logging.getLogger("clipcurate")


class GlobalFits:
    """Spills and fitted states of the global stages of one run (``ex`` is the ``Executor``)."""

    def __init__(self, ex):
        self.ex = ex
        self.states: dict[int, object] = {}
        self.shuffles: dict[int, ShuffleRun] = {}
        self.fitted: dict[int, object] = {}  # reduce states (a shuffle stage's: its has_fit step)
        self.seconds: dict[str, float] = {}

    def _fit_path(self, g: int) -> str | None:
        """Where the reduce state of global stage ``g`` is (None: it has none)."""
        stage, rd = self.ex.stages[g], self.ex.rd
        path = rd.state_path(g, stage.name)
        if not getattr(stage, "shuffle", False):
            return path
        return posixpath.join(path[: -len(".json")], "fit.json") if stage.has_fit else None

    def state_url(self, index: int) -> str | None:
        """Where workers load the fitted state of stage ``index`` (None: not a global stage, or a
        shuffle stage without a reduce step)."""
        if index not in self.states:
            return None
        path = self._fit_path(index)
        return None if path is None else self.ex.rd.url_of(path)

    def decisions_url(self, index: int) -> str | None:
        """Where workers load the decisions of shuffle stage ``index`` (None: not one)."""
        run = self.shuffles.get(index)
        return None if run is None else run.decisions_url

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
        ex = self.ex
        g = ex.globals[b]
        if g in self.states:
            return
        stage = ex.stages[g]
        shuffle = getattr(stage, "shuffle", False)
        path = self._fit_path(g)
        state = None
        if path is not None:
            state = self._fit(b, path)
            stage.load_state(state)
            self.fitted[g] = state
        if shuffle:
            if not ex.rd.exists(ex.rd.state_path(g, stage.name)):
                self.ensure_spill(b, list(range(ex.plan.n_shards)))
            run = ShuffleRun(ex, g, None if path is None else ex.rd.url_of(path))
            self.states[g] = run.ensure()
            self.shuffles[g] = run
        else:
            self.states[g] = state

    def _fit(self, b: int, path: str):
        """The reduce state of global stage ``globals[b]`` (read from ``path``, or fitted and written there)."""
        ex, rd = self.ex, self.ex.rd
        g = ex.globals[b]
        stage = ex.stages[g]
        if rd.exists(path):
            log.info("reusing fitted state of %s from %s", stage.name, path)
            return rd.read_json(path)
        n = ex.plan.n_shards
        self.ensure_spill(b, list(range(n)))
        cols = list(dict.fromkeys([*stage.fit_columns, "key", "status"]))
        res = stage.resources()
        t0 = time.perf_counter()
        state, prev_url = None, None
        rounds = getattr(stage, "fit_rounds", 1)
        for r in range(rounds):
            ds = ex.source_ds(g, list(range(n)), columns=cols)
            args = (ex.targets[g], ex.cfg_json[g])
            fit = fit_class(stage.name if r == 0 else f"{stage.name}_round{r}")
            extra = {"state_url": prev_url, "run": ex.counter}
            if res.actor:  # set up once per actor (e.g. balance's automaton), not once per block
                kw = dict(
                    fn_constructor_args=args,
                    fn_constructor_kwargs=extra,
                    compute=ray.data.ActorPoolStrategy(size=res.concurrency or 1),
                )
            else:
                kw, fit = {}, fit(*args, setup=False, **extra)
            log.info("fitting global stage %s over %d shards (round %d of %d)", stage.name, n, r + 1, rounds)
            parts = ds.map_batches(fit, batch_size=None, batch_format="pyarrow", num_cpus=res.num_cpus, **kw)
            partials, combine = [], getattr(stage, "combine", None)
            for row in parts.iter_rows():  # folded as they arrive when the stage can (``combine``)
                partials.append(pickle.loads(row["p"]))
                if combine is not None:
                    partials = [combine(partials)]
            if r:
                stage.load_state(state)
            state = stage.merge(partials)
            del partials
            if r + 1 < rounds:  # the workers of the next round load this round's state
                round_path = f"{path[: -len('.json')]}.round{r}.json"
                rd.write_json(round_path, state)
                state, prev_url = rd.read_json(round_path), rd.url_of(round_path)
        self.seconds[stage.name] = time.perf_counter() - t0
        rd.write_json(path, state)
        return rd.read_json(path)  # what workers will load: the JSON round trip

    def summaries(self) -> dict[str, dict]:
        st = self.ex.stages
        out = {}
        for g in self.ex.globals:
            if g not in self.states:
                continue
            if g in self.shuffles:
                fit = st[g].state_summary(self.fitted[g]) if g in self.fitted else {}
                out[st[g].name] = {**fit, **self.states[g].get("summary", {})}
            else:
                out[st[g].name] = st[g].state_summary(self.states[g])
        return out
