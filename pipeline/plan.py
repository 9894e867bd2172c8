"""Check a pipeline's roles and columns, and describe the plan (``clipcurate plan``).

Works from the declarations alone (``stages.base`` and ``stages.roles``): the first entry must be a
source, the last a sink, the others stages; every column an entry requires must be produced (or,
for the base columns of ``schemas.row.FILLED_LATER``, filled) by an earlier entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import ConfigError, Pipeline
from schemas.row import BASE_FIELDS, FILLED_LATER
from stages.roles import role_of


@dataclass
class StepPlan:
    index: int
    name: str
    kind: str  # "source", "task", "actor", "hook", "sink"
    is_global: bool
    requires: tuple[str, ...]
    produces: tuple[str, ...]
    resources: dict
    notes: list[str] = field(default_factory=list)


def check(pipe: Pipeline) -> list[StepPlan]:
    """Validate roles and columns. Raises ConfigError naming file, stage and column."""
    src = pipe.source
    built = [pipe.build(spec.index) for spec in pipe.stages]
    roles = [role_of(b) for b in built]
    names = [s.name for s in pipe.stages]
    last = len(names) - 1
    if roles[0] != "source":
        raise ConfigError(f"{src}: stages[0] ({names[0]}): the first stage must be a source")
    if roles[-1] != "sink":
        raise ConfigError(f"{src}: stages[{last}] ({names[-1]}): the last stage must be a sink")
    for i, (n, r) in enumerate(zip(names, roles)):
        if 0 < i < last and r != "stage":
            raise ConfigError(f"{src}: stages[{i}] ({n}): a {r} may only appear {'first' if r == 'source' else 'last'}")
    available = {f.name for f in BASE_FIELDS} - set(FILLED_LATER)
    steps: list[StepPlan] = []
    for spec, stage, role in zip(pipe.stages, built, roles):
        for col in stage.required_columns():
            if col not in available:
                raise ConfigError(
                    f"{src}: stages[{spec.index}] ({spec.name}): requires column '{col}', which no earlier "
                    f"stage produces — put a stage that produces it (e.g. {_producer_hint(col, spec.name)}) before it"
                )
        produced = tuple(stage.output_columns())
        available |= set(produced) | set(stage.filled_columns())
        res = stage.resources()
        if role != "stage":
            kind = role
        elif stage.dataset_hook() is not None:
            kind = "hook"
        else:
            kind = "actor" if res.actor else "task"
        steps.append(
            StepPlan(
                index=spec.index,
                name=spec.name,
                kind=kind,
                is_global=stage.is_global,
                requires=tuple(stage.required_columns()),
                produces=produced,
                resources={
                    "num_cpus": res.num_cpus,
                    "num_gpus": res.num_gpus,
                    "concurrency": res.concurrency,
                    "batch_size": res.batch_size,
                },
            )
        )
    return steps


def _producer_hint(col: str, asking: str) -> str:
    """Built-in stages that produce or fill ``col`` (from their declarations)."""
    from pipeline import registry

    found = []
    for n in registry.names():
        if n == asking:
            continue
        try:
            cls = registry.get(n)
        except Exception:  # noqa: BLE001 - a hint only
            continue
        if col in cls.produces or col in getattr(cls, "fills", ()):
            found.append(f"'{n}'")
    return " or ".join(found) or "a stage that produces it"


def describe(pipe: Pipeline, steps: list[StepPlan]) -> str:
    lines = [
        f"pipeline '{pipe.config.name}' from {pipe.source}",
        f"  output: {pipe.config.output or '(set with --output)'}",
        f"  samples_per_shard: {pipe.config.samples_per_shard}   seed: {pipe.config.seed}   config hash: {pipe.config_hash()}",
        "  steps:",
    ]
    for s in steps:
        r = s.resources
        how = {
            "source": "driver splits the input into shards; Ray tasks load them",
            "sink": "Ray Datasink: one tar + parquet + stats per shard",
            "task": f"Ray tasks (num_cpus={r['num_cpus']})",
            "actor": f"actor pool of {r['concurrency'] or 1} (num_cpus={r['num_cpus']:g}, num_gpus={r['num_gpus']:g} each)",
            "hook": f"dataset-level operation (ray.data.llm processor, {r['concurrency'] or 1} replicas, "
            f"num_gpus={r['num_gpus']:g} each)",
        }[s.kind]
        glob = "  [global: fit pass over the whole pool first]" if s.is_global else ""
        lines.append(f"   {s.index}. {s.name:<13} {how}{glob}")
        if s.requires:
            lines.append(f"        requires: {', '.join(s.requires)}")
        if s.produces:
            lines.append(f"        produces: {', '.join(s.produces)}")
        if r.get("batch_size"):
            lines.append(f"        batch_size: {r['batch_size']}")
    return "\n".join(lines + resource_lines(pipe))


def resource_lines(pipe: Pipeline) -> list[str]:
    """The plan's resource totals per segment (``pipeline.capacity``), and whether the Ray the run
    would use can hold them: a local Ray is checked here; a cluster when the run starts."""
    import os

    from pipeline import capacity

    built = [pipe.build(spec.index) for spec in pipe.stages]
    names = [spec.name for spec in pipe.stages]
    _, segs = capacity.segments(built)
    needs = [n for n in capacity.needs(built, names, segs) if n.stages]
    lines = ["  resources (stages between global stages run together; pools hold their share throughout):"]
    for n in needs:
        tasks = f", {n.task_cpus:g} CPU kept free for task stages" if n.task_cpus else ""
        lines.append(
            f"    {' -> '.join(names[i] for i in n.stages)}: {n.actors} actors, {n.cpus:g} CPUs, {n.gpus:g} GPUs{tasks}"
        )
    peak_cpu = max((n.cpus for n in needs), default=0.0)
    peak_gpu = max((n.gpus for n in needs), default=0.0)
    peak_actors = max((n.actors for n in needs), default=0)
    lines.append(f"    at most: {peak_cpu:g} CPUs, {peak_gpu:g} GPUs, {peak_actors} actors at a time")
    address = pipe.config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        lines.append(f"  cluster {address}: checked against these totals when the run starts")
        return lines
    cpus, gpus = capacity.local_capacity(pipe.config.ray.num_cpus)
    short = [n for n in needs if n.pools and (n.cpus > cpus + 1e-9 or n.gpus > gpus + 1e-9)]
    if not short:
        lines.append(f"  local Ray ({cpus:g} CPUs, {gpus:g} GPUs): holds them")
        return lines
    n = short[0]
    i = capacity.largest_pool(n)
    lines.append(
        f"  WARNING: a local Ray ({cpus:g} CPUs, {gpus:g} GPUs) cannot hold the pools that run together "
        f"({', '.join(n.parts)}: {n.cpus:g} CPUs, {n.gpus:g} GPUs); the run would stop before any work. Lower "
        f"'concurrency', 'num_cpus' or 'num_gpus' (e.g. --set stages.{names[i]}.concurrency=1), or run on a "
        f"cluster (ray.address or RAY_ADDRESS)"
    )
    return lines
