"""`dsmoe report collect | activated-pct` (old name: `dsmoe figures`, kept as an alias for one release)."""

from ..names import RUN_DATA


def register(subparsers):
    p = subparsers.add_parser("report", aliases=["figures"], help="gather a run's evaluation results for the tables and figures")
    commands = p.add_subparsers(dest="report_command", required=True, metavar="COMMAND")
    c = commands.add_parser("collect", help="concatenate evaluation CSVs by name (ppl.csv, layers.csv, ...) into a directory")
    c.add_argument("files", nargs="+", help=f"evaluation CSVs; the file name picks the kind ({', '.join(RUN_DATA)})")
    c.add_argument("--out", required=True, help="output directory: one CSV per kind (written atomically)")
    c.set_defaults(func=cmd_collect)
    c = commands.add_parser("activated-pct", help="print a model's activated params (%% of total) from its ppl.csv")
    c.add_argument("ppl_csv", help="ppl.csv written by `dsmoe eval ppl`")
    c.set_defaults(func=cmd_activated_pct)


def cmd_collect(args):
    from .run_data import collect

    collect(args.files, args.out)


def cmd_activated_pct(args):
    from ..evaluation.perplexity import read_activated_pct

    print(f"{read_activated_pct(args.ppl_csv):.6f}")
