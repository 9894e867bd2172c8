"""Checks of a run that need no Ray, made by ``clipcurate run`` before Ray starts and before anything
is written to the output (DESIGN.md, "Errors and bad input").

* the output is set, and ``RunDir.check``: an output of another config or not made by clipcurate is
  refused unless ``--overwrite``, and so is a rerun whose input files changed since the run read them;
* the input, through the source's (the first stage's) ``check``; for ``read``: the path exists (file, folder, glob, any fsspec URL),
  its format is known, the configured columns are there (Parquet schema, first rows or header of text
  files; never a whole file) and it has at least one row (unless ``allow_empty``);
* the optional packages the entries need (``packages()``; the ``vllm`` rewrite engine needs vLLM);
* on a local Ray (no ``ray.address``, no ``$RAY_ADDRESS``), the local files the other stages name
  (``paths.missing_paths``: model folders, metadata files, ...); on a cluster the workers read them
  from their own disk, so the driver cannot check them;
* the output: inside a Ray Job a relative local output is refused (it would be written inside Ray's
  temporary copy of the working dir, deleted with the session); elsewhere it is made absolute, so the
  manifest and the summary name where the shards are (``resolve_output``).

``check_inputs`` (``clipcurate validate``) makes the input and path checks alone.

Each failure is a ``ConfigError`` whose text is one line naming the file, the stage and the key.
This module imports no Ray.
"""

from __future__ import annotations

import os

from pipeline.config import ConfigError, Pipeline
from pipeline.paths import missing_paths
from pipeline.runs import RunDir, source_fingerprint

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for the driver of a Ray Job


def in_ray_job() -> bool:
    return bool(os.environ.get(RAY_JOB_ENV))


def is_relative_local(output: str) -> bool:
    """A local path that is not absolute (not a URL, not ``~``-relative)."""
    return "://" not in output and not os.path.isabs(os.path.expanduser(output))


def job_output_error(output: str | None, where: str) -> str | None:
    """Why ``output`` cannot be the output of a Ray Job (one line), or None when it can."""
    if not output:
        return f"{where}: no output: pass an absolute path on shared storage or an object-store URL (--output s3://bucket/out)"
    if is_relative_local(output):
        return (
            f"{where}: output '{output}' is a relative path: in a Ray Job it would be written inside Ray's "
            f"temporary copy of the working dir, deleted with the session; pass an absolute path on shared "
            f"storage or an object-store URL (--output s3://bucket/out)"
        )
    return None


def resolve_output(pipe: Pipeline) -> None:
    """Make a relative local output absolute (outside a Ray Job), refuse it inside one."""
    out = pipe.config.output
    if not out:
        return
    if in_ray_job():
        err = job_output_error(out, pipe.source)
        if err:
            raise ConfigError(err)
    elif is_relative_local(out):
        pipe.config.output = os.path.abspath(os.path.expanduser(out))


def check_paths(pipe: Pipeline, first: int = 1) -> None:
    """Raise ``ConfigError`` for the first local path a stage (from ``first`` on) names that does not exist."""
    for spec in pipe.stages[first:]:
        for key, value in missing_paths(spec.config):
            raise ConfigError(
                f"{pipe.source}: stages[{spec.index}] ({spec.name}): key '{key}': {value} does not exist "
                f"(relative paths are looked up in the workflow's folder, then in the working directory {os.getcwd()})"
            )


def check_inputs(pipe: Pipeline) -> None:
    """The input (the source's ``check``) and the local files every stage names; reads headers only."""
    spec = pipe.stages[0]
    source = pipe.build(spec.index)
    _check_source(pipe, source)
    check_paths(pipe)


def _check_source(pipe: Pipeline, source) -> list[dict]:
    """The source's ``check``; its input fingerprint."""
    spec = pipe.stages[0]
    where = f"{pipe.source}: stages[{spec.index}] ({spec.name})"
    try:
        source.check()  # the Source role's contract: ValueError, one line naming the key and the file
        return source_fingerprint(source)
    except ValueError as e:
        raise ConfigError(f"{where}: {_one_line(e)}") from None
    except OSError as e:  # permissions, credentials, an unreachable store
        raise ConfigError(f"{where}: key 'path': cannot open the input: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def missing_packages(pipe: Pipeline) -> None:
    """Raise ``ConfigError`` for the first package an entry needs (``packages()``) that is not installed."""
    from importlib.util import find_spec

    for spec in pipe.stages:
        for module, key, hint in pipe.build(spec.index).packages():
            if find_spec(module) is None:
                raise ConfigError(
                    f"{pipe.source}: stages[{spec.index}] ({spec.name}): key '{key}': needs the Python "
                    f"package '{module}', which is not installed ({hint})"
                )


def preflight(pipe: Pipeline, overwrite: bool = False) -> list[dict]:
    """Raise ``ConfigError`` (one line) if the run cannot start; read only, writes nothing. Returns
    the input's fingerprint (``source_fingerprint``), for the run to check a resumed output with."""
    src = pipe.source
    if not pipe.config.output:
        raise ConfigError(f"{src}: no output: set 'output:' in the file or pass --output")
    resolve_output(pipe)
    fingerprint = _check_source(pipe, pipe.build(0))
    if not (pipe.config.ray.address or os.environ.get("RAY_ADDRESS")):
        check_paths(pipe)
    missing_packages(pipe)
    try:
        RunDir(pipe.config.output).check(pipe, overwrite=overwrite, fingerprint=fingerprint)
    except OSError as e:
        raise ConfigError(f"{src}: output {pipe.config.output}: cannot open it: {_one_line(e)}") from None
    return fingerprint
