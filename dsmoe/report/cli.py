"""`dsmoe report collect | activated-pct | claims | seeds | budget | summary` (old name: `dsmoe figures`, kept as an alias
for one release)."""

from ..names import RUN_DATA


def register(subparsers):
    p = subparsers.add_parser("report", aliases=["figures"], help="gather a run's evaluation results for the tables and figures")
    commands = p.add_subparsers(dest="report_command", required=True, metavar="COMMAND")
    c = commands.add_parser("collect", help="concatenate evaluation CSVs by name (ppl.csv, layers.csv, ...) into a directory")
    c.add_argument("files", nargs="+", help=f"evaluation CSVs; the file name picks the kind ({', '.join(RUN_DATA)})")
    c.add_argument("--all-on", nargs="*", default=[], metavar="PPL_CSV",
                   help="ppl.csv files of `dsmoe eval ppl --all-experts-on`: collected as all_on.csv, not into ppl.csv")
    c.add_argument("--out", required=True, help="output directory: one CSV per kind (written atomically)")
    c.set_defaults(func=cmd_collect)
    c = commands.add_parser("activated-pct", help="print a model's activated params (%% of total) from its ppl.csv")
    c.add_argument("ppl_csv", help="ppl.csv written by `dsmoe eval ppl`")
    c.set_defaults(func=cmd_activated_pct)
    c = commands.add_parser("claims", help="write a run's claims table (tables/claims.csv and .md) from its collected data")
    c.add_argument("--run", required=True, help="run directory (results/<run_name>) with data/ and config.yaml")
    c.set_defaults(func=cmd_claims)
    c = commands.add_parser("seeds", help="one model's seed spread across runs that differ only in train.seed "
                                          "(tables/seeds.csv and .md of the first run)")
    c.add_argument("--runs", nargs="+", required=True, help="run directories (results/<run_name>), the first the reference")
    c.add_argument("--model", default="dsmoe", help="the model compared (default %(default)s)")
    c.set_defaults(func=cmd_seeds)
    c = commands.add_parser("budget", help="DSMoE against another model across runs that differ only in train.tokens: "
                                           "which way the gap moves with tokens (tables/budget.csv and .md of the first run)")
    c.add_argument("--runs", nargs="+", required=True, help="run directories (results/<run_name>); rows ordered by budget")
    c.add_argument("--model", default="dsmoe", help="the model in DSMoE's place (default %(default)s)")
    c.add_argument("--other", default="prune_sparsegpt", help="the model it is compared with, in each run (default %(default)s)")
    c.set_defaults(func=cmd_budget)
    c = commands.add_parser("summary", help="print where a run's results are, its Table 1 rows and how to open the notebooks")
    c.add_argument("--run", required=True, help="run directory (results/<run_name>) with data/")
    c.set_defaults(func=cmd_summary)


def cmd_collect(args):
    from .run_data import collect

    collect(args.files, args.out, all_on=args.all_on)


def cmd_activated_pct(args):
    from ..evaluation.perplexity import read_activated_pct

    print(f"{read_activated_pct(args.ppl_csv):.6f}")


def cmd_claims(args):
    from pathlib import Path

    from . import load_run, run_claims, run_config, save_table

    table = run_claims(load_run(args.run), run_config(args.run).get("train", {}).get("tokens"))
    save_table(table, Path(args.run) / "tables", "claims")
    for row in table.itertuples():
        print(f"{row.claim}: {row.reproduced}")


def cmd_seeds(args):
    from pathlib import Path

    from . import save_table
    from .seeds import seed_table

    table = seed_table(args.runs, args.model)
    save_table(table, Path(args.runs[0]) / "tables", "seeds")
    print(table.to_string(index=False))


def cmd_budget(args):
    from pathlib import Path

    from . import save_table
    from .budget import budget_table

    table = budget_table(args.runs, args.model, args.other)
    save_table(table, Path(args.runs[0]) / "tables", "budget")
    print(table.to_string(index=False))


def cmd_summary(args):
    from .summary import summary

    print(summary(args.run))
