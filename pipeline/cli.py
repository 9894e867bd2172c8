"""``clipcurate`` / ``python -m pipeline``: run, validate, plan, report and submit pipelines.

    clipcurate validate workflows/demo.yaml
    clipcurate plan workflows/demo.yaml --set stages.clip_score.batch_size=128
    clipcurate run workflows/demo.yaml --output out/ [--overwrite] [--dry-run]
    clipcurate report out/
    clipcurate submit workflows/demo.yaml --address http://127.0.0.1:8265 -- --output /shared/out

Bad configs and bad inputs (missing file or column, empty list, an output of another config or of a
changed input) fail before any work with one line naming the file, the stage and the key (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


QUIET_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "gcsfs", "adlfs", "fsspec", "urllib3")


def _load(args):
    from pipeline import config, plan

    pipe = config.load(args.file, overrides=args.set, output=getattr(args, "output", None))
    steps = plan.check(pipe)
    return pipe, steps


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="pipeline YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clipcurate", description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate", help="check a pipeline file and exit")
    _common(p)
    p = sub.add_parser("plan", help="print the execution plan (same as run --dry-run)")
    _common(p)
    p.add_argument("--output")
    p = sub.add_parser("run", help="run a pipeline")
    _common(p)
    p.add_argument("--output", help="output folder (any fsspec path); overrides 'output:'")
    p.add_argument("--overwrite", action="store_true", help="replace an output written by another config")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan, run nothing")
    p.add_argument("--no-report", action="store_true", help="do not build report.html at the end")
    p = sub.add_parser("report", help="(re)build report.html for an output folder")
    p.add_argument("output")
    p = sub.add_parser("submit", help="submit a run to a Ray cluster as a Ray Job")
    _common(p)
    p.add_argument("--address", default=None, help="Ray dashboard address (default: $RAY_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="folder uploaded as the job's working dir")
    p.epilog = "Arguments after -- are passed to 'pipeline run' in the job (e.g. -- --output s3://b/out)."
    from pipeline.evaluate import cli as eval_cli

    eval_cli.add_arguments(sub.add_parser("eval", help=eval_cli.HELP))
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
            print(f"{args.file}: ok ({len(steps)} stages: {' -> '.join(s.name for s in steps)})")
            return 0
        if args.cmd == "plan" or getattr(args, "dry_run", False):
            from pipeline import plan

            print(plan.describe(pipe, steps))
            return 0
        if args.cmd == "submit":
            return _submit(args)
        return _run(args, pipe)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args, pipe) -> int:
    from pipeline.preflight import preflight

    # Input and output problems end here, in one line, before Ray starts and before anything is written.
    preflight(pipe, overwrite=args.overwrite)
    from pipeline import report
    from pipeline.ray import run
    from stages.base import StageFailed

    printer = report.ProgressPrinter()
    try:
        manifest = run(pipe, overwrite=args.overwrite, on_progress=printer)
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


def _submit(args) -> int:
    from pipeline.ray import submit

    run_args = list(args.run_args)
    for s in args.set:
        run_args += ["--set", s]
    working_dir = os.path.abspath(args.working_dir)
    # The job runs in (a copy of) the working dir: name the workflow relative to it when it is inside.
    workflow = os.path.abspath(args.file)
    workflow = (
        os.path.relpath(workflow, working_dir) if workflow.startswith(working_dir + os.sep) else args.file
    )
    return submit(workflow, args.address, run_args, working_dir, _runtime_env(working_dir))


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
