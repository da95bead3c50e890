"""Key numbers of `dsmoe pilot` runs side by side: activation, λ and LM loss every N steps, held-out ppl.

    python benchmarks/pilot_table.py PILOT_DIR [PILOT_DIR ...] [--every 25] [--copy-to benchmarks/pilots]

Prints a markdown table (one column group per pilot) and each pilot's held-out perplexities
(ppl.csv: dense, init, trained). `--copy-to` keeps the small files of each pilot (curves.png,
pilot.json, ppl.csv, train_log.csv) under DIR/<pilot name>/, for committing.
"""

import argparse
import shutil
from pathlib import Path

import pandas as pd

SMALL_FILES = ("curves.png", "pilot.json", "ppl.csv", "run/train_log.csv")


def curve_table(pilots, every):
    """Rows at steps 1, every, 2·every, ... and the last: active fraction, λ, LM loss of each pilot."""
    columns = {}
    for pilot in pilots:
        log = pd.read_csv(Path(pilot) / "run" / "train_log.csv").set_index("step")
        keep = [s for s in log.index if s == log.index.min() or s % every == 0 or s == log.index.max()]
        name = Path(pilot).name
        for column, short in (("mean_active_fraction", "active"), ("lambda", "λ"), ("lm_loss", "lm_loss")):
            columns[f"{name} {short}"] = log.loc[keep, column]
    return pd.DataFrame(columns)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pilots", nargs="+")
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--copy-to", help="keep the small files of each pilot under this directory")
    args = parser.parse_args()
    print(curve_table(args.pilots, args.every).to_markdown(floatfmt=".3g"))
    for pilot in map(Path, args.pilots):
        if (pilot / "ppl.csv").is_file():
            ppl = pd.read_csv(pilot / "ppl.csv")
            print(f"\n{pilot.name}: " + ", ".join(f"{r.model} ppl {r.ppl:.2f} ({r.mean_active_experts:.2f} experts)"
                                               for r in ppl.itertuples()))
        if args.copy_to:
            target = Path(args.copy_to) / pilot.name
            target.mkdir(parents=True, exist_ok=True)
            for name in SMALL_FILES:
                if (pilot / name).is_file():
                    shutil.copy(pilot / name, target / Path(name).name)


if __name__ == "__main__":
    main()
