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
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import registry
from stages.base import StageConfig


class ConfigError(ValueError):
    """A bad config. ``str(err)`` is the one line shown to the user."""


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = None  # None: $RAY_ADDRESS if set, else start a local Ray
    num_cpus: int | None = None  # for a local Ray only
    object_store_memory: int | None = None  # bytes, for a local Ray only
    max_task_retries: int = 3  # Ray Data task retries (worker death)
    max_actor_restarts: int = 3  # actor pool restarts (actor death)
    target_max_block_size: int = 512 * 1024 * 1024  # one block per shard must fit
    show_progress: bool = True


class StageSpec(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    config: Any  # a validated StageConfig
    index: int


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "pipeline"
    output: str | None = None
    samples_per_shard: int = Field(10_000, ge=1)
    seed: int = 0
    keep_intermediate: bool = False  # keep spilled intermediate shards after a successful run
    ray: RayConfig = Field(default_factory=RayConfig)
    stages: list[dict[str, Any]]


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
        """Hash of what determines the output (not where it goes, nor how Ray is run)."""
        res = self.resolved()
        res.pop("output", None)
        res.pop("ray", None)
        res.pop("keep_intermediate", None)
        return hashlib.sha256(json.dumps(res, sort_keys=True).encode()).hexdigest()[:16]

    def build(self, index: int):
        spec = self.stages[index]
        return registry.get(spec.name)(spec.config)


def _fmt_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _describe_error(err: dict, fields: dict[str, Any] | None) -> str:
    typ = err.get("type", "")
    loc = _fmt_loc(err.get("loc", ()))
    if typ == "extra_forbidden":
        allowed = ", ".join(sorted(fields)) if fields else "(none)"
        return f"unknown key '{loc}' — allowed keys: {allowed}"
    if typ == "missing":
        return f"missing required key '{loc}'"
    inp = err.get("input")
    shown = repr(inp) if not isinstance(inp, dict | list) else type(inp).__name__
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
    return from_dict(raw, source=source, overrides=overrides, output=output)


def from_dict(raw: Any, source: str = "<config>", overrides: list[str] | None = None, output: str | None = None) -> Pipeline:
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
        raise ConfigError(f"{source}: {_describe_error(err, PipelineConfig.model_fields)}") from None
    if not top.stages:
        raise ConfigError(f"{source}: 'stages' is empty — a pipeline needs at least a source and a sink")
    specs: list[StageSpec] = []
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
        try:
            cfg: StageConfig = cls.Config(**body)
        except ValidationError as e:
            err = e.errors()[0]
            raise ConfigError(f"{source}: stages[{i}] ({name}): {_describe_error(err, cls.Config.model_fields)}") from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{source}: stages[{i}] ({name}): {e}") from None
        specs.append(StageSpec(name=name, config=cfg, index=i))
    return Pipeline(source=source, config=top, stages=specs, raw=raw)
