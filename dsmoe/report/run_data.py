"""A run's results as the tables and figures read them: collected CSVs, the paper's numbers, output files.

`dsmoe report collect` gathers a run's evaluation CSVs into results/<run>/data/, which is all the
notebooks read.
"""

import io
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import yaml

from ..atomic import atomic_file, write_csv
from ..names import METHOD_ORDER, RUN_DATA

PAPER_RESULTS = Path(__file__).parent / "paper_results.yaml"


def collect(paths, out_dir, all_on=()):
    """Concatenate evaluation CSVs by file name (ppl.csv, layers.csv, ...) into `out_dir`; `all_on`: the
    ppl.csv files of `dsmoe eval ppl --all-experts-on`, collected as all_on.csv (never into ppl.csv)."""
    groups = defaultdict(list)
    for path, name in [(Path(p), None) for p in paths] + [(Path(p), "all_on") for p in all_on]:
        if not path.is_file():
            raise FileNotFoundError(f"evaluation file {str(path)!r} does not exist")
        if name == "all_on" and path.stem != "ppl":
            raise ValueError(f"{str(path)!r}: the all-experts-on files are the ppl.csv of `dsmoe eval ppl --all-experts-on`")
        groups[name or path.stem].append(pd.read_csv(path))
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


FALLBACK_RUN = "cpu-study-paper"  # committed (results/cpu-study-paper/, with diagnostics): what a notebook shows before any run


class Run(NamedTuple):
    """Where a notebook reads a run (`dir`) and writes its tables and figures (`out`)."""

    dir: Path
    out: Path
    fallback: bool


def find_run(run_dir, fallback=FALLBACK_RUN, scratch=None):
    """The `Run` of `run_dir` where it holds collected results (data/ppl.csv), else of its sibling
    `fallback` (results/cpu-study-paper/, committed), saying so. A fallback run is read, never written: its
    tables and figures go to `scratch` (default: a folder under the system's temporary directory).
    A clear error where neither holds results."""
    run_dir = Path(run_dir)
    if (run_dir / "data" / "ppl.csv").is_file():
        print(f"Reading the run in {run_dir}; tables and figures go to {run_dir}/.")
        return Run(run_dir, run_dir, False)
    other = run_dir.parent / fallback
    if not (other / "data" / "ppl.csv").is_file():
        raise FileNotFoundError(f"neither {run_dir} nor {other} holds collected results (data/ppl.csv); run `make demo`")
    out = Path(scratch) if scratch is not None else Path(tempfile.gettempdir()) / "dsmoe-notebooks" / fallback
    print(f"{run_dir} holds no results yet (`make demo` writes them): showing the committed CPU study in {other} "
          f"instead; its files stay as committed, this notebook writes to {out}/.")
    return Run(other, out, True)


def run_config(run_dir):
    """The run's config.yaml (written when the workflow starts, every default filled), or {} without one."""
    path = Path(run_dir) / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


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
