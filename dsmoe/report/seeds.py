"""The seed spread of one model across runs that differ only in `train.seed` (`dsmoe report seeds`).

Each run evaluates on the same validation windows (the data section is the same), so the runs are
compared window by window as two models of one run are: each later run against the first, with a
paired bootstrap interval (`dsmoe.report.bootstrap`). Runs whose settings that make the model and
its validation windows (`MODEL_KEYS`: base model, dtype, the dsmoe and data sections, the model's train
section with its train_overrides, less `seed` and the keys that only log or checkpoint) differ are refused:
their spread would not be a seed's. Other rows and baselines may differ.
"""

from pathlib import Path

import pandas as pd

from ..config import variant_train
from ..names import LOG_ONLY_KEYS
from .bootstrap import paired_bootstrap, windows_of
from .run_data import load_run, overall, run_config

MODEL_KEYS = ("base_model", "dtype", "dsmoe", "data", "train")
COLUMNS = ["run", "seed", "model", "activated_params_pct", "ppl", "diff_vs_first", "ci_low", "ci_high"]


def _settings(run, model, varying, ignored=()):
    """The settings of a run's `model` (`MODEL_KEYS`, its train section with the run's train_overrides of it,
    less train.`varying` and the train keys in `ignored`) and its train.`varying`."""
    config = run_config(run)
    if not config:
        raise ValueError(f"run {str(run)!r} has no config.yaml")
    settings = {key: config.get(key) for key in MODEL_KEYS}
    overrides = config.get("train_overrides") or {}
    train = variant_train({"train": settings["train"] or {}, "train_overrides": overrides}, model)
    settings["train"] = {k: v for k, v in train.items() if k not in ignored}
    return settings, settings["train"].pop(varying, None)


def _differences(a, b, prefix=""):
    """The dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(f"{prefix}{key}")
    return keys


def check_same_but(runs, varying, ignored=LOG_ONLY_KEYS, model="dsmoe"):
    """Each run's train.`varying`; a clear error if two runs' `model` settings differ in anything else (but
    the train keys in `ignored`: those that only log or checkpoint), or if two runs share a value of it."""
    first, values = None, []
    for run in runs:
        settings, value = _settings(run, model, varying, ignored)
        if first is None:
            first = settings
        elif settings != first:
            raise ValueError(f"run {str(run)!r} differs from {str(runs[0])!r} in {_differences(first, settings)}, "
                             f"not only in train.{varying}")
        values.append(value)
    if len(set(values)) != len(values):
        raise ValueError(f"the runs share a train.{varying} ({values}): nothing varies between them")
    return values


def check_same_but_seed(runs, model="dsmoe"):
    """The runs' seeds; a clear error if two runs' `model` settings differ in anything but train.seed."""
    return check_same_but(runs, "seed", model=model)


def model_point(ours, run, model):
    """`model`'s activated params (%) and perplexity in a run's overall rows; a clear error where it is missing."""
    if model not in ours.index:
        raise ValueError(f"run {str(run)!r} has no model {model!r} in data/ppl.csv")
    return float(ours.loc[model, "activated_params_pct"]), float(ours.loc[model, "ppl"])


def seed_table(runs, model="dsmoe"):
    """One row per run: `model`'s activated params (%) and perplexity at its τ; for every run after the
    first, its ppl minus the first run's and the 95% paired bootstrap interval of that difference."""
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise ValueError("a seed spread needs at least two runs")
    seeds = check_same_but_seed(runs, model)
    rows, first_windows = [], None
    for run, seed in zip(runs, seeds):
        data = load_run(run)
        pct, ppl = model_point(overall(data["ppl"]), run, model)
        windows = windows_of(data["windows"], model=model)
        row = {"run": run.name, "seed": seed, "model": model, "activated_params_pct": pct, "ppl": ppl}
        if first_windows is None:
            first_windows = windows
        else:
            diff = paired_bootstrap(windows, first_windows, (run.name, runs[0].name))
            row.update(diff_vs_first=diff.diff, ci_low=diff.ci_low, ci_high=diff.ci_high)
        rows.append(row)
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


__all__ = ["check_same_but", "check_same_but_seed", "seed_table"]
