"""Pydantic models of the pipeline YAML, and loading with clear one-line errors.

    name: demo
    output: demo_out            # any fsspec path; --output overrides
    samples_per_shard: 100
    ray: {...}                  # RayConfig
    stages:
      - read: {path: urls.parquet, url_col: url, caption_col: caption}
      - download: {image_size: 64}
      - clip_score: {model: local-dir:demo/assets/toy_clip, min_score: 0.2}
      - write: {}

Every error names the file, the stage (by position and name) and the key, and says what is
allowed. It is raised before any work starts.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline import registry
from pipeline.paths import base_dirs, resolve_config_paths
from stages.base import StageConfig


class ConfigError(ValueError):
    """A bad config. ``str(err)`` is the one line shown to the user."""


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(
        None, description="Ray address to connect to; null: `$RAY_ADDRESS` if set, else start a local Ray."
    )
    num_cpus: int | None = Field(None, description="CPUs of a local Ray (ignored when connecting to a cluster).")
    object_store_memory: int | None = Field(
        None, description="Object store size in bytes of a local Ray (ignored when connecting to a cluster)."
    )
    max_task_retries: int = Field(
        3, description="Ray Data task retries (a worker that dies) and actor task retries."
    )
    max_actor_restarts: int = Field(3, description="Restarts of an actor of a pool that dies.")
    target_max_block_size: int = Field(
        512 * 1024 * 1024, description="Ray Data's block size limit in bytes; one block is one shard, it must fit."
    )
    show_progress: bool = Field(
        True,
        description="Show Ray Data's progress bars when stdout is a terminal (`run --progress ray`: wherever "
        "the output goes; `--progress quiet`: never).",
    )


class ReportConfig(BaseModel):
    """What ``report.html`` shows beyond the run's own numbers (the data's columns it should use)."""

    model_config = ConfigDict(extra="forbid")

    label_column: str | None = Field(
        None,
        description="a column with a known label per row (e.g. a generator's ground truth): the report "
        "splits the score histograms by its values and adds a 'labels' section (rows kept and rejected "
        "per value); null: no label",
    )
    label_names: dict[str, str] = Field(
        default_factory=dict,
        description="display name per label value (keys are the values as text, YAML booleans become "
        "'true'/'false'); values not named are shown as they are",
    )
    show_columns: list[str] = Field(
        default_factory=list,
        description="extra columns whose values are shown under each sample in the sample grid",
    )

    @field_validator("label_names", mode="before")
    @classmethod
    def _label_keys_as_text(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {label_key(k): val for k, val in v.items()}
        return v


def label_key(value: Any) -> str | None:
    """A label value as text, as the report compares them (``True`` -> ``"true"``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


class StageSpec(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    config: Any  # a validated StageConfig
    index: int


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("pipeline", description="Name of the pipeline (manifest, report, plan).")
    output: str | None = Field(
        None, description="Output folder, any fsspec path (`s3://...`); `--output` overrides. Not resolved "
        "against the workflow's folder: a relative output is relative to the working directory."
    )
    samples_per_shard: int = Field(
        10_000, ge=1, description="Rows per input and output shard (img2dataset's `number_sample_per_shard`)."
    )
    seed: int = Field(
        0, description="Seed of the run, recorded in the config hash; stages that draw at random have their own `seed` key."
    )
    keep_intermediate: bool = Field(
        False, description="Keep the spilled intermediate shards (before global stages) after a successful run."
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="How Ray is started or reached (`RayConfig`).")
    report: ReportConfig = Field(
        default_factory=ReportConfig, description="What report.html shows beyond the run's own numbers."
    )
    stages: list[dict[str, Any]] = Field(
        description="The entries, each a one-key mapping `- NAME: {options}`: a source first, a sink last."
    )


class Pipeline(BaseModel):
    """A validated pipeline: the top-level config plus one validated config per stage."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: str
    config: PipelineConfig
    stages: list[StageSpec]
    raw: dict[str, Any]

    def resolved(self) -> dict[str, Any]:
        """The fully resolved config (defaults filled in), JSON-serialisable."""
        top = self.config.model_dump(mode="json", exclude={"stages"})
        top["stages"] = [{s.name: s.config.model_dump(mode="json")} for s in self.stages]
        return top

    def config_hash(self) -> str:
        """Hash of what determines the output (not where it goes, how Ray is run, or what the report shows)."""
        res = self.resolved()
        res.pop("output", None)
        res.pop("ray", None)
        res.pop("keep_intermediate", None)
        res.pop("report", None)
        for entry in res["stages"]:  # how many row errors a run tolerates does not change a row
            for body in entry.values():
                if isinstance(body, dict):
                    body.pop("max_error_fraction", None)  # presentation only: changing it neither changes nor blocks a resumed run
        return hashlib.sha256(json.dumps(res, sort_keys=True).encode()).hexdigest()[:16]

    def build(self, index: int):
        spec = self.stages[index]
        return registry.get(spec.name)(spec.config)


def _fmt_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation allows (one, the members of a union, or a list's items)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_of(a)]


def _tags(model: type[BaseModel], discriminator: str) -> list[str]:
    f = model.model_fields.get(discriminator)
    return [str(v) for v in get_args(f.annotation)] if f is not None else []


def _model_at(model: type[BaseModel] | None, path: tuple) -> type[BaseModel] | None:
    """The model whose keys sit at ``path`` (an error's ``loc`` minus its last part), following nested
    models and tagged unions (whose ``loc`` holds the tag: ``engine.<tag>.key``)."""
    parts, i = [str(p) for p in path], 0
    while model is not None and i < len(parts):
        field = model.model_fields.get(parts[i])
        if field is None:
            return None
        members, i = _models_of(field.annotation), i + 1
        if i < len(parts) and parts[i].isdigit():  # an item of a list of models
            i += 1
        if len(members) == 1:
            model = members[0]
        elif isinstance(field.discriminator, str) and i < len(parts):
            model = next((m for m in members if parts[i] in _tags(m, field.discriminator)), None)
            i += 1
        else:
            return None
    return model


def _describe_error(err: dict, model: type[BaseModel]) -> str:
    typ = err.get("type", "")
    loc_t = tuple(err.get("loc", ()))
    loc = _fmt_loc(loc_t)
    holder = _model_at(model, loc_t[:-1])
    if typ == "extra_forbidden":
        fields = holder.model_fields if holder is not None else {}
        allowed = ", ".join(sorted(fields)) if fields else "(none)"
        return f"unknown key '{loc}' — allowed keys: {allowed}"
    if typ == "missing":
        return f"missing required key '{loc}'"
    inp = err.get("input")
    shown = repr(inp) if not isinstance(inp, dict | list) else type(inp).__name__
    field = holder.model_fields.get(str(loc_t[-1])) if holder is not None and loc_t else None
    if typ in ("union_tag_invalid", "union_tag_not_found", "model_attributes_type") and field is not None:
        disc = field.discriminator
        if isinstance(disc, str):
            tags = [t for m in _models_of(field.annotation) for t in _tags(m, disc)]
            got = shown
            if isinstance(inp, dict):
                got = repr(inp[disc]) if disc in inp else f"a mapping without '{disc}'"
            return f"key '{loc}': expected a mapping with '{disc}': one of {', '.join(tags)} (got {got})"
    return f"key '{loc}': {err.get('msg', 'invalid value')} (got {shown})"


def _set_path(d: dict, dotted: str, value: Any, source: str) -> None:
    """Apply one ``--set a.b=c``. Inside ``stages``, a stage is addressed by name (the first
    stage of that name, ``stages.clip_score.min_score``) or by position (``stages.2.min_score``)."""
    parts = dotted.split(".")
    cur: Any = d
    for i, p in enumerate(parts[:-1]):
        if isinstance(cur, list):
            idx = int(p) if p.isdigit() else next(
                (j for j, item in enumerate(cur) if isinstance(item, dict) and p in item), None
            )
            if idx is None or idx >= len(cur) or not isinstance(cur[idx], dict) or len(cur[idx]) != 1:
                raise ConfigError(f"{source}: --set {dotted}: no stage '{p}'")
            item = cur[idx]
            name = next(iter(item))
            if item[name] is None:
                item[name] = {}
            cur = item[name]
            continue
        if not isinstance(cur, dict):
            raise ConfigError(f"{source}: --set {dotted}: '{'.'.join(parts[:i])}' is not a mapping")
        if cur.get(p) is None:
            cur[p] = [] if p == "stages" else {}
        cur = cur[p]
    if not isinstance(cur, dict):
        raise ConfigError(f"{source}: --set {dotted}: cannot set a key inside a non-mapping")
    cur[parts[-1]] = value


def parse_set(item: str, source: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"{source}: --set {item!r}: expected KEY=VALUE")
    k, v = item.split("=", 1)
    if v == "":
        return k.strip(), ""
    try:
        return k.strip(), yaml.safe_load(v)
    except yaml.YAMLError as e:
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{source}: --set {item}: the value is not valid YAML ({problem})") from None


def load(path: str | Path, overrides: list[str] | None = None, output: str | None = None) -> Pipeline:
    """Load, apply ``--set`` overrides, and validate a pipeline file. Raises ``ConfigError``."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{source}: cannot open the file: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    return from_dict(raw, source=source, overrides=overrides, output=output, workflow_file=path)


def from_dict(
    raw: Any,
    source: str = "<config>",
    overrides: list[str] | None = None,
    output: str | None = None,
    workflow_file: str | Path | None = None,
) -> Pipeline:
    """Validate a pipeline given as a mapping. Path keys of the stages are resolved by
    ``pipeline.paths`` (the folder of ``workflow_file``, if given, then the working directory)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping with a 'stages' list")
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        k, v = parse_set(item, source)
        _set_path(raw, k, v, source)
    if output is not None:
        raw["output"] = output
    try:
        top = PipelineConfig(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{source}: {_describe_error(err, PipelineConfig)}") from None
    if not top.stages:
        raise ConfigError(f"{source}: 'stages' is empty — a pipeline needs at least a source and a sink")
    specs: list[StageSpec] = []
    path_bases = base_dirs(workflow_file)
    for i, item in enumerate(top.stages):
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(
                f"{source}: stages[{i}]: each stage is a mapping with one key, the stage name "
                f"(e.g. '- NAME: {{key: value}}'), got {item!r}"
            )
        name, body = next(iter(item.items()))
        try:
            cls = registry.get(name)
        except registry.UnknownStage:
            raise ConfigError(
                f"{source}: stages[{i}]: unknown stage '{name}' — known stages: {', '.join(registry.names())}"
            ) from None
        body = body or {}
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: stages[{i}] ({name}): options must be a mapping, got {body!r}")
        body = resolve_config_paths([cls.Config], body, path_bases)
        try:
            cfg: StageConfig = cls.Config(**body)
        except ValidationError as e:
            err = e.errors()[0]
            raise ConfigError(f"{source}: stages[{i}] ({name}): {_describe_error(err, cls.Config)}") from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{source}: stages[{i}] ({name}): {e}") from None
        specs.append(StageSpec(name=name, config=cfg, index=i))
    return Pipeline(source=source, config=top, stages=specs, raw=raw)
