"""`dsmoe` command line: one subcommand per stage of the workflow.

This file only dispatches: each stage's module adds its own subcommands through `register(subparsers)`.
Errors take one path: whatever a command raises is printed as one message (the file and the cause)
and the exit code is 2; `DSMOE_DEBUG=1` prints the traceback as well.
"""

import argparse
import importlib
import logging
import os
import re
import sys
import traceback

STAGE_MODULES = [
    "dsmoe.hub",  # base, info
    "dsmoe.convert",  # convert
    "dsmoe.data.build",  # data prepare
    "dsmoe.train.trainer",  # train
    "dsmoe.evaluation.cli",  # eval ppl | sweep | lm-eval
    "dsmoe.baselines.cli",  # baseline drop | prune
    "dsmoe.report.cli",  # report collect | activated-pct
    "dsmoe.pilot",  # pilot
    "dsmoe.plan",  # plan
    "dsmoe.fetch",  # fetch
]


def build_parser():
    parser = argparse.ArgumentParser(prog="dsmoe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGE_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


EXPECTED_ERRORS = (ValueError, TypeError, OSError)  # bad input, a bad file, a failed write: no hint to debug


def describe_error(err):
    """One line for an exception: for an OS error the file and the cause (`out/model: No space left on device`)."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "") if err.filename else ""
        return f"{where}: {err.strerror}" if where else err.strerror
    message = str(err) if not isinstance(err, KeyError) else f"missing key {err}"
    found = re.search(r"os error (\d+)", message)  # safetensors reports a failed write with the errno inside
    if found:
        message = f"{os.strerror(int(found.group(1)))} ({message})"
    if not isinstance(err, EXPECTED_ERRORS):
        message = f"{type(err).__name__}: {message} (DSMOE_DEBUG=1 shows the traceback)"
    return message or type(err).__name__


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except Exception as err:  # noqa: BLE001  (the one error path of the CLI)
        if os.environ.get("DSMOE_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"dsmoe {args.command}: error: {describe_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
