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
            "actor": f"actor pool (concurrency={r['concurrency']}, num_cpus={r['num_cpus']}, num_gpus={r['num_gpus']})",
            "hook": f"dataset-level operation (ray.data.llm processor, concurrency={r['concurrency']})",
        }[s.kind]
        glob = "  [global: fit pass over the whole pool first]" if s.is_global else ""
        lines.append(f"   {s.index}. {s.name:<13} {how}{glob}")
        if s.requires:
            lines.append(f"        requires: {', '.join(s.requires)}")
        if s.produces:
            lines.append(f"        produces: {', '.join(s.produces)}")
        if r.get("batch_size"):
            lines.append(f"        batch_size: {r['batch_size']}")
    return "\n".join(lines)
