"""Checks of a run that need no Ray, made by ``clipcurate run`` before Ray starts and before anything
is written to the output (DESIGN.md, "Errors and bad input").

* the output is set, and ``RunDir.check``: an output of another config or not made by clipcurate is
  refused unless ``--overwrite``, and so is a rerun whose input files changed since the run read them;
* the input, through the source's (the first stage's) ``check``; for ``read``: the path exists (file, folder, glob, any fsspec URL),
  its format is known, the configured columns are there (Parquet schema, first rows or header of text
  files; never a whole file) and it has at least one row (unless ``allow_empty``);
* the optional packages the entries need (``packages()``; the ``vllm`` rewrite engine needs vLLM).

Each failure is a ``ConfigError`` whose text is one line naming the file, the stage and the key.
This module imports no Ray.
"""

from __future__ import annotations

from pipeline.config import ConfigError, Pipeline
from pipeline.runs import RunDir, source_fingerprint


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


def preflight(pipe: Pipeline, overwrite: bool = False) -> None:
    """Raise ``ConfigError`` (one line) if the run cannot start; read only, writes nothing."""
    src = pipe.source
    if not pipe.config.output:
        raise ConfigError(f"{src}: no output: set 'output:' in the file or pass --output")
    spec = pipe.stages[0]
    where = f"{src}: stages[{spec.index}] ({spec.name})"
    source = pipe.build(spec.index)
    try:
        source.check()  # the Source role's contract: ValueError, one line naming the key and the file
        fingerprint = source_fingerprint(source)
    except ValueError as e:
        raise ConfigError(f"{where}: {_one_line(e)}") from None
    except OSError as e:  # permissions, credentials, an unreachable store
        raise ConfigError(f"{where}: key 'path': cannot open the input: {_one_line(e)}") from None
    missing_packages(pipe)
    try:
        RunDir(pipe.config.output).check(pipe, overwrite=overwrite, fingerprint=fingerprint)
    except OSError as e:
        raise ConfigError(f"{src}: output {pipe.config.output}: cannot open it: {_one_line(e)}") from None
