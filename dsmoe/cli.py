"""`dsmoe` command line: one subcommand per stage of the workflow.

This file only dispatches: each stage's module adds its own subcommands through `register(subparsers)`.
"""

import argparse
import importlib
import logging
import sys

STAGE_MODULES = [
    "dsmoe.hub",  # base, info
    "dsmoe.convert",  # convert
    "dsmoe.data.build",  # data prepare
    "dsmoe.train.trainer",  # train
    "dsmoe.evaluation.cli",  # eval ppl | sweep | lm-eval
    "dsmoe.baselines.cli",  # baseline drop | prune
    "dsmoe.report.cli",  # report collect | activated-pct
    "dsmoe.pilot",  # pilot
]


def build_parser():
    parser = argparse.ArgumentParser(prog="dsmoe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGE_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"dsmoe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
