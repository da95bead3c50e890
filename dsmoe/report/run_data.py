"""A run's results as the tables and figures read them: collected CSVs, the paper's numbers, output files.

`dsmoe report collect` gathers a run's evaluation CSVs into results/<run>/data/, which is all the
notebooks read.
"""

import io
from collections import defaultdict
from pathlib import Path

import pandas as pd
import yaml

from ..atomic import atomic_file, write_csv
from ..names import METHOD_ORDER, RUN_DATA

PAPER_RESULTS = Path(__file__).parent / "paper_results.yaml"


def collect(paths, out_dir):
    """Concatenate evaluation CSVs by file name (ppl.csv, layers.csv, ...) into `out_dir`."""
    groups = defaultdict(list)
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"evaluation file {str(path)!r} does not exist")
        groups[path.stem].append(pd.read_csv(path))
    unknown = sorted(set(groups) - set(RUN_DATA))
    if unknown:
        raise ValueError(f"do not know how to collect {unknown}; expected files named {RUN_DATA} (.csv)")
    for name in RUN_DATA:
        frames = groups.get(name, [])
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["model"])
        write_csv(df, Path(out_dir) / f"{name}.csv")


def load_run(run_dir):
    """The collected data of a run: {name: DataFrame} for each of `dsmoe.names.RUN_DATA`. A file that an
    older run did not collect (windows.csv, ...) loads as an empty frame."""
    data_dir = Path(run_dir) / "data"
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} does not exist; run the workflow (rule collect) first")
    return {name: pd.read_csv(path) if (path := data_dir / f"{name}.csv").is_file() else pd.DataFrame(columns=["model"])
            for name in RUN_DATA}


def load_paper(path=PAPER_RESULTS):
    return yaml.safe_load(Path(path).read_text())


def overall(ppl):
    """One row per model (source 'all'), in the paper's order."""
    df = ppl[ppl["source"] == "all"].copy()
    df["order"] = df["model"].map({m: i for i, m in enumerate(METHOD_ORDER)}).fillna(len(METHOD_ORDER))
    return df.sort_values(["order", "model"]).drop(columns="order").set_index("model")



def save_figure(fig, figures_dir, name):
    """Write `fig` as NAME.png and NAME.pdf, each atomically."""
    for ext in ("png", "pdf"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, dpi=150, bbox_inches="tight")
        with atomic_file(Path(figures_dir) / f"{name}.{ext}", mode="wb") as handle:
            handle.write(buffer.getvalue())


def save_table(df, tables_dir, name, floatfmt=".4g"):
    """Write `df` as NAME.csv and NAME.md (a Markdown table), each atomically."""
    write_csv(df, Path(tables_dir) / f"{name}.csv")
    with atomic_file(Path(tables_dir) / f"{name}.md") as handle:
        handle.write(df.to_markdown(index=False, floatfmt=floatfmt) + "\n")
