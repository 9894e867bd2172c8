"""Check a pipeline's columns across stages, and describe the plan (``clipcurate plan``).

Every column a stage ``requires`` must be produced by an earlier stage (the read stage
produces the base columns of ``schemas.row``). The first stage must be ``read`` and the last
``write``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import ConfigError, Pipeline
from schemas.row import BASE_FIELDS

# Base columns that exist (possibly null) from the read stage on, but carry data only once a
# stage fills them. ``requires`` on them is checked against the stage that fills them.
FILLED_BY_DOWNLOAD = ("image", "width", "height", "original_width", "original_height", "sha256")


@dataclass
class StepPlan:
    index: int
    name: str
    kind: str  # "read", "task", "actor", "write"
    is_global: bool
    requires: tuple[str, ...]
    produces: tuple[str, ...]
    resources: dict
    notes: list[str] = field(default_factory=list)


def check(pipe: Pipeline) -> list[StepPlan]:
    """Validate stage order and columns. Raises ConfigError naming file, stage and column."""
    src = pipe.source
    names = [s.name for s in pipe.stages]
    if names[0] != "read":
        raise ConfigError(f"{src}: stages[0] ({names[0]}): the first stage must be 'read'")
    if names[-1] != "write":
        raise ConfigError(f"{src}: stages[{len(names) - 1}] ({names[-1]}): the last stage must be 'write'")
    for i, n in enumerate(names[1:-1], start=1):
        if n in ("read", "write"):
            raise ConfigError(f"{src}: stages[{i}] ({n}): '{n}' may only appear {'first' if n == 'read' else 'last'}")
    available = {f.name for f in BASE_FIELDS} - set(FILLED_BY_DOWNLOAD)
    steps: list[StepPlan] = []
    for spec in pipe.stages:
        stage = pipe.build(spec.index)
        for col in stage.requires:
            if col not in available:
                producers = [
                    n for n in ("download", "clip_score", "balance", "rewrite", "basic_filter")
                    if n != spec.name
                ]
                raise ConfigError(
                    f"{src}: stages[{spec.index}] ({spec.name}): requires column '{col}', which no earlier "
                    f"stage produces — put a stage that produces it (e.g. {_producer_hint(col, producers)}) before it"
                )
        produced = tuple(stage.output_columns())
        if spec.name == "download" or spec.name == "read" and stage.reads_webdataset():
            available |= set(FILLED_BY_DOWNLOAD)
        available |= set(produced)
        res = stage.resources()
        kind = "read" if spec.name == "read" else "write" if spec.name == "write" else ("actor" if res.actor else "task")
        steps.append(
            StepPlan(
                index=spec.index,
                name=spec.name,
                kind=kind,
                is_global=stage.is_global,
                requires=tuple(stage.requires),
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


def _producer_hint(col: str, candidates: list[str]) -> str:
    if col in FILLED_BY_DOWNLOAD:
        return "'download'"
    from pipeline import registry

    for n in candidates:
        try:
            cls = registry.get(n)
        except Exception:  # noqa: BLE001 - a hint only
            continue
        if col in cls.produces:
            return f"'{n}'"
    return "a stage that produces it"


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
            "read": "driver splits the input into shards; Ray tasks load them",
            "write": "Ray Datasink: one tar + parquet + stats per shard",
            "task": f"Ray tasks (num_cpus={r['num_cpus']})",
            "actor": f"actor pool (concurrency={r['concurrency']}, num_cpus={r['num_cpus']}, num_gpus={r['num_gpus']})",
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
