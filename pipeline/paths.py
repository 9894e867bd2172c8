"""The one rule for path keys of a workflow (keys marked with ``stages.base.path_field``).

A relative value is looked up in the workflow file's folder first, then in the current working
directory; the first place where it exists wins. A value found nowhere is kept as given (it stays
relative to the working directory, and the stage that opens it reports it missing). Then:

* found in the working directory: kept as written (so configs and their hash do not depend on
  where the checkout lives, and Ray workers, whose working directory is the driver's or the job's
  ``--working-dir``, open the same file);
* found in the workflow's folder: rewritten relative to the working directory when it lies inside
  it (``workflows/../demo/x`` -> ``demo/x``), else as an absolute path.

Values left untouched: absolute paths, URLs and fsspec paths (anything with ``://``, such as
``s3://`` or ``file://``), ``hf-hub:`` model ids. ``local-dir:PATH`` resolves ``PATH`` and keeps the
prefix. Keys marked ``prefixed`` (a model name or ``local-dir:PATH``) resolve ``local-dir:`` values
only. ``~`` is expanded. A glob (``*``, ``?``, ``[``) counts as existing where it matches a file.
Lists of values are resolved item by item, and so are lists of nested models.

``missing_paths`` lists the local paths a validated config names that do not exist (``clipcurate
validate`` and a run on a local Ray refuse them before any work): every ``local-dir:PATH``; the plain
values of keys marked ``always`` (always a path: an input, a metadata file, a config file); and, for
keys whose plain value may also be a name (a model id, a pretrained tag), values that can only be a
path (absolute, or starting with ``./``, ``../`` or ``~``). URLs other than ``file://`` and ``hf-hub:``
ids are not checked here (the source checks its own input, remote included).
"""

from __future__ import annotations

import glob
import os
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from stages.base import PATH_ALWAYS, PATH_MARK, PATH_PREFIXED

LOCAL_DIR = "local-dir:"
UNTOUCHED_PREFIXES = ("hf-hub:",)
_GLOB_CHARS = ("*", "?", "[")


def _exists(p: Path) -> bool:
    s = str(p)
    if any(c in s for c in _GLOB_CHARS):
        return bool(glob.glob(s))
    return p.exists()


def resolve_path(value: str, base_dirs: list[Path], prefixed: bool = False, cwd: Path | None = None) -> str:
    """``value`` resolved by the rule above; ``base_dirs`` are tried in order (the workflow's
    folder, then the working directory)."""
    if value.startswith(LOCAL_DIR):
        return LOCAL_DIR + resolve_path(value[len(LOCAL_DIR) :], base_dirs, cwd=cwd)
    if prefixed or not value or "://" in value or value.startswith(UNTOUCHED_PREFIXES):
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    here = Path(os.path.abspath(cwd or os.getcwd()))
    for base in base_dirs:
        cand = Path(os.path.abspath(Path(base) / expanded))
        if not _exists(cand):
            continue
        if cand.parent == here or here in cand.parents:
            rel = os.path.relpath(cand, here)
            # Found in the working directory as written: keep the user's spelling.
            return expanded if os.path.normpath(expanded) == rel else rel
        return str(cand)
    return expanded


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic model classes inside an annotation (``X``, ``X | None``, ``A | B``, ``list[X]``...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_of(arg)]


def _mark(field) -> str | None:
    extra = field.json_schema_extra
    return extra.get(PATH_MARK) if isinstance(extra, dict) else None


def resolve_config_paths(models: list[type[BaseModel]], body: dict, base_dirs: list[Path]) -> dict:
    """A copy of the raw config ``body`` with the values of path keys resolved. ``models`` are the
    config classes the body may validate as (several for a union); nested model keys are walked."""
    out = dict(body)
    for key, value in body.items():
        fields = [m.model_fields[key] for m in models if key in m.model_fields]
        marks = {_mark(f) for f in fields} - {None}
        if marks:
            prefixed = marks == {PATH_PREFIXED}
            if isinstance(value, str):
                out[key] = resolve_path(value, base_dirs, prefixed)
            elif isinstance(value, list):
                out[key] = [resolve_path(v, base_dirs, prefixed) if isinstance(v, str) else v for v in value]
            continue
        nested = [m for f in fields for m in _models_of(f.annotation)]
        if nested and isinstance(value, dict):
            out[key] = resolve_config_paths(nested, value, base_dirs)
        elif nested and isinstance(value, list):  # a list of nested models: each item walked
            out[key] = [resolve_config_paths(nested, v, base_dirs) if isinstance(v, dict) else v for v in value]
    return out


def base_dirs(workflow_file: str | Path | None) -> list[Path]:
    """Where relative paths are looked up: the workflow file's folder (if any), then the cwd."""
    dirs = [Path(workflow_file).parent] if workflow_file is not None else []
    return [*dirs, Path.cwd()]


def _local_target(value: str, mark: str, always: bool) -> str | None:
    """The local path to check for a path key's ``value``, or None (see ``missing_paths``)."""
    if value.startswith(LOCAL_DIR):
        return value[len(LOCAL_DIR) :]
    if mark == PATH_PREFIXED or not value or value.startswith(UNTOUCHED_PREFIXES):
        return None
    if value.startswith("file://"):
        return value[len("file://") :]
    if "://" in value:
        return None
    if always or os.path.isabs(value) or value.startswith(("./", "../", "~")):
        return os.path.expanduser(value)
    return None


def missing_paths(config: BaseModel, prefix: str = "") -> list[tuple[str, str]]:
    """``(key, value)`` of each local path that the validated ``config`` (nested models included)
    names and that does not exist, relative paths taken from the working directory (where config
    loading has put them, ``resolve_path``)."""
    out: list[tuple[str, str]] = []
    for name, field in type(config).model_fields.items():
        value = getattr(config, name, None)
        key = f"{prefix}{name}"
        mark = _mark(field)
        if mark:
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            values = value if isinstance(value, list) else [value]
            for v in values:
                target = _local_target(v, mark, bool(extra.get(PATH_ALWAYS))) if isinstance(v, str) else None
                if target is not None and not _exists(Path(target)):
                    out.append((key, v))
        elif isinstance(value, BaseModel):
            out += missing_paths(value, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    out += missing_paths(item, f"{key}.{i}.")
    return out
