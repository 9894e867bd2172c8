"""The ``clipcurate eval`` subcommand: its arguments and what it runs (registered in ``pipeline/cli.py``)."""

from __future__ import annotations

import argparse
import logging
import sys

HELP = "train a small CLIP on an output for a fixed budget and evaluate it (OUTPUT/eval.json)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="a finished clipcurate output folder (local)")
    p.add_argument("--config", help="eval YAML (model, samples_seen, batch_size, seed, eval sets, ...)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override an eval key (repeatable)"
    )
    p.add_argument(
        "--no-report", action="store_true", help="do not rebuild report.html with the eval section"
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.evaluate.config import load
    from pipeline.evaluate.run import EVAL_NAME, evaluate, summary

    cfg = load(args.config, args.set)
    try:
        result = evaluate(args.output, cfg)
    except RuntimeError as e:  # the trainer failed: not a config problem (exit 1, its log is named)
        print(f"error: {args.output}: {e}", file=sys.stderr)
        return 1
    print(summary(result))
    print(f"eval: {args.output.rstrip('/')}/{EVAL_NAME}")
    if not args.no_report:
        from pipeline import report

        try:
            print(f"report: {report.build_html(args.output)}")
        except Exception as e:  # noqa: BLE001 - eval.json is written; a report failure must not hide it
            logging.getLogger("clipcurate").warning("report.html could not be rebuilt: %s", e)
    return 0
