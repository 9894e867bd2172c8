"""clipcurate (also: python -m pipeline): validate, plan, run, report and submit curation pipelines.

Bad configs and bad inputs (a missing file, column or model folder, an empty list, an output of
another config or of a changed input) fail before any work with one line naming the file, the stage
and the key (exit 2). A run that fails after starting exits 1; its finished shards are kept.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


QUIET_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "gcsfs", "adlfs", "fsspec", "urllib3")

EXAMPLES = """\
examples:
  clipcurate validate workflows/demo.yaml
  clipcurate plan workflows/full.yaml --set ray.num_cpus=16
  clipcurate run workflows/datacomp_clip.yaml --output out/ --set stages.0.path=pool.parquet
  clipcurate run workflows/demo.yaml --output out/ --progress ray
  clipcurate report out/
  clipcurate submit workflows/demo.yaml --address http://HEAD:8265 -- --output s3://bucket/out
  clipcurate eval out/ --config workflows/eval_demo.yaml

Run 'clipcurate COMMAND --help' for the options of a command."""

PROGRESS_HELP = (
    "auto (default): on a terminal, Ray Data's progress bars (ray.show_progress) and a line of per-stage "
    "counters every 10 s; otherwise (CI, nohup, Ray Job logs) the counter line only. "
    "ray: Ray Data's progress too (bars, or its log block every 10 s when not on a terminal). "
    "quiet: the counter line only"
)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("clipcurate")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _load(args):
    from pipeline import config, plan

    pipe = config.load(args.file, overrides=args.set, output=getattr(args, "output", None))
    steps = plan.check(pipe)
    return pipe, steps


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="pipeline YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")


def _sub(sub, name: str, help: str, description: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, 100),
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="clipcurate",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--version", action="version", version=f"clipcurate {version()}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = _sub(
        sub, "validate", "check a pipeline file, its input and the files it names, then exit",
        "Check the file (keys, stage order, columns), the input (exists, has the columns, not empty) and "
        "the local files the stages name (model folders, metadata files); nothing runs.",
        "clipcurate validate workflows/demo.yaml --set stages.0.path=urls.parquet",
    )  # fmt: skip
    _common(p)
    p = _sub(
        sub, "plan", "print the execution plan and its resource totals (same as run --dry-run)",
        "Print the steps (how each runs, the columns it needs and adds) and the CPUs, GPUs and actors "
        "they reserve, with a warning when a local Ray cannot hold them.",
        "clipcurate plan workflows/full.yaml --set ray.num_cpus=16",
    )  # fmt: skip
    _common(p)
    p.add_argument("--output")
    p = _sub(
        sub, "run", "run a pipeline",
        "Run a pipeline on a local Ray, or on the cluster at ray.address / $RAY_ADDRESS. A rerun on the "
        "same output resumes; the summary, manifest.json and report.html say what happened to every row.",
        "clipcurate run workflows/demo.yaml --output out/ --set samples_per_shard=1000",
    )  # fmt: skip
    _common(p)
    p.add_argument("--output", help="output folder (any fsspec path); overrides 'output:'")
    p.add_argument("--overwrite", action="store_true", help="replace an output written by another config")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan, run nothing")
    p.add_argument("--no-report", action="store_true", help="do not build report.html at the end")
    p.add_argument("--progress", choices=["auto", "ray", "quiet"], default="auto", help=PROGRESS_HELP)
    p = _sub(
        sub, "report", "(re)build report.html for an output folder",
        "Build OUTPUT/report.html from the shards' Parquet and manifest.json (any fsspec path).",
        "clipcurate report out/",
    )  # fmt: skip
    p.add_argument("output")
    p = _sub(
        sub, "submit", "submit a run to a Ray cluster as a Ray Job",
        "Validate the file here, upload the working dir and run 'python -m pipeline run FILE ARGS' as a "
        "Ray Job; stream its logs; exit 0 only if it SUCCEEDED. Arguments after -- go to 'pipeline run' "
        "in the job; the output must be absolute or an object-store URL. On a cluster with token "
        "authentication (Ray >= 2.60), the token is taken from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
        "~/.ray/auth_token.",
        "clipcurate submit workflows/demo.yaml --address http://HEAD:8265 -- --output s3://bucket/out",
    )  # fmt: skip
    _common(p)
    p.add_argument("--address", default=None, help="Ray dashboard address (default: $RAY_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="folder uploaded as the job's working dir")
    p.add_argument(
        "--no-pip",
        action="store_true",
        help="install nothing for the job (as CLIPCURATE_SUBMIT_PIP=0): the cluster has the dependencies",
    )
    from pipeline.evaluate import cli as eval_cli

    p = _sub(
        sub, "eval", eval_cli.HELP,
        "Train a CLIP with open_clip's own trainer on the output's tars for a fixed number of samples seen "
        "(equal compute whatever the output's size), then evaluate zero-shot classification and image-text "
        "retrieval on held-out sets; writes OUTPUT/eval.json and a section of report.html.",
        "clipcurate eval out/ --config workflows/eval_demo.yaml",
    )  # fmt: skip
    eval_cli.add_arguments(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" belongs to the job of `submit` (its `pipeline run` arguments).
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)
    args.run_args = passthrough
    if passthrough and args.cmd != "submit":
        print(f"error: arguments after -- are only for 'submit': {' '.join(passthrough)}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:  # storage clients' INFO chatter ("Found credentials in environment variables.")
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    from pipeline.config import ConfigError

    try:
        if args.cmd == "report":
            from pipeline import report

            path = report.build_html(args.output)
            print(f"report: {path}")
            return 0
        if args.cmd == "eval":
            from pipeline.evaluate import cli as eval_cli

            return eval_cli.run(args)
        pipe, steps = _load(args)
        if args.cmd == "validate":
            from pipeline.preflight import check_inputs

            check_inputs(pipe)
            print(f"{args.file}: ok ({len(steps)} stages: {' -> '.join(s.name for s in steps)})")
            return 0
        if args.cmd == "plan" or getattr(args, "dry_run", False):
            from pipeline import plan

            print(plan.describe(pipe, steps))
            return 0
        if args.cmd == "submit":
            return _submit(args, pipe)
        return _run(args, pipe)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args, pipe) -> int:
    from pipeline.preflight import preflight

    # Input and output problems end here, in one line, before Ray starts and before anything is written.
    fingerprint = preflight(pipe, overwrite=args.overwrite)
    from pipeline import report
    from pipeline.ray import run
    from stages.base import StageFailed

    printer = report.ProgressPrinter()
    quiet = args.progress == "quiet" or (args.progress == "auto" and not sys.stdout.isatty())
    if args.progress == "ray":
        pipe.config.ray.show_progress = True  # asked for on the command line (not part of the config hash)
    try:
        manifest = run(
            pipe, overwrite=args.overwrite, on_progress=printer, quiet=quiet, fingerprint=fingerprint
        )
    except StageFailed as e:
        print(f"error: {pipe.source}: {e} (shards written so far are kept; rerun to resume)", file=sys.stderr)
        return 1
    html = None
    if not args.no_report:
        try:
            html = report.build_html(manifest["output"])
        except Exception as e:  # noqa: BLE001 - the data is written; a report failure must not hide it
            logging.getLogger("clipcurate").warning("report.html could not be built: %s", e)
    report.print_summary(manifest, report_path=html)
    return 0


def _submit(args, pipe) -> int:
    from pipeline.config import ConfigError
    from pipeline.preflight import job_output_error
    from pipeline.ray import jobs

    run_args = list(args.run_args)
    for s in args.set:
        run_args += ["--set", s]
    # The job's working dir is Ray's temporary copy of --working-dir: a relative output would vanish with it.
    err = job_output_error(_output_arg(args.run_args) or pipe.config.output, args.file)
    if err:
        raise ConfigError(err)
    working_dir = os.path.abspath(args.working_dir)
    # The job runs in (a copy of) the working dir: name the workflow relative to it when it is inside.
    workflow = os.path.abspath(args.file)
    workflow = (
        os.path.relpath(workflow, working_dir) if workflow.startswith(working_dir + os.sep) else args.file
    )
    if args.no_pip:
        os.environ[SUBMIT_PIP_ENV] = "0"
    env = _runtime_env(working_dir)
    note = (
        f"runtime env: Ray pip-installs {len(env['pip'])} packages into a new virtualenv on each node "
        f"before the job starts (--no-pip or {SUBMIT_PIP_ENV}=0 when the cluster has them)"
        if env.get("pip")
        else None
    )
    return jobs.submit(workflow, args.address, run_args, working_dir, env, note=note)


def _output_arg(run_args: list[str]) -> str | None:
    """The ``--output`` among ``pipeline run`` arguments (the last one wins, as argparse does)."""
    out = None
    for i, a in enumerate(run_args):
        if a == "--output" and i + 1 < len(run_args):
            out = run_args[i + 1]
        elif a.startswith("--output="):
            out = a.split("=", 1)[1]
    return out


SUBMIT_PIP_ENV = "CLIPCURATE_SUBMIT_PIP"  # "0": the cluster already has the dependencies (no pip install)


def _runtime_env(working_dir: str | None = None) -> dict:
    """The Ray Job runtime env of ``clipcurate submit``, from ``pyproject.toml`` (the working dir's,
    else the one beside this package):

    * ``pip``: ``[project].dependencies`` minus ``[tool.clipcurate.runtime_env].preinstalled`` (ray,
      torch: the cluster image has them). Left out when ``CLIPCURATE_SUBMIT_PIP=0``, for clusters that
      already run in an environment with the project's dependencies (the tests, prebuilt images).
    * ``excludes``: paths not uploaded with the working dir (``.venv``, outputs, ``.git`` ...).
    * ``env_vars``: set for the job's driver and workers.
    """
    import re
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    candidates = [Path(working_dir) / "pyproject.toml"] if working_dir else []
    candidates.append(Path(__file__).resolve().parent.parent / "pyproject.toml")
    data: dict = {}
    for pp in candidates:
        if pp.exists():
            data = tomllib.loads(pp.read_text())
            if data.get("project", {}).get("name") == "clipcurate":
                break
    table = data.get("tool", {}).get("clipcurate", {}).get("runtime_env", {})

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    preinstalled = {norm(n) for n in table.get("preinstalled", ["ray", "torch", "torchvision"])}
    deps = [
        d
        for d in data.get("project", {}).get("dependencies", [])
        if norm(Requirement(d).name) not in preinstalled
    ]
    env: dict = {"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}}
    env["env_vars"].update({k: str(v) for k, v in table.get("env_vars", {}).items()})
    if table.get("excludes"):
        env["excludes"] = list(table["excludes"])
    if os.environ.get(SUBMIT_PIP_ENV, "1") != "0" and deps:
        env["pip"] = deps
    return env


if __name__ == "__main__":
    sys.exit(main())
