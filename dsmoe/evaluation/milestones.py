"""Perplexity against continued-pretraining tokens (paper Appendix B, Tables 5-6).

Evaluates every model a run kept at its token milestones (RUN/milestones/step_N, written by `dsmoe
train --milestones`) and the run's final model (RUN/model) on the same validation data as Table 1.
"""

import csv
import math
from pathlib import Path

import pandas as pd

from ..train.milestones import milestone_dirs

COLUMNS = ["model", "variant", "step", "train_tokens", "milestone_tokens", "final"]
WINDOW_COLUMNS = ["step", "train_tokens", "final", "source", "window", "nll", "tokens"]  # after model, variant


def final_point(run_dir):
    """Step and training tokens of a run's final model, from the last row of RUN/train_log.csv."""
    log = Path(run_dir) / "train_log.csv"
    if not log.is_file():
        return {"step": math.nan, "train_tokens": math.nan}
    with open(log, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {"step": math.nan, "train_tokens": math.nan}
    return {"step": int(rows[-1]["step"]), "train_tokens": float(rows[-1]["tokens"])}


def milestone_points(run_dir):
    """`[(model dir, {step, train_tokens, milestone_tokens, final})]`: the kept milestones, then the final model."""
    run_dir = Path(run_dir)
    points = [(path, {"step": info["step"], "train_tokens": float(info["tokens"]),
                      "milestone_tokens": float(info["milestone_tokens"]), "final": False})
              for path, info in milestone_dirs(run_dir)]
    final = run_dir / "model"
    if final.is_dir():
        points.append((final, {**final_point(run_dir), "milestone_tokens": math.nan, "final": True}))
    if not points:
        raise FileNotFoundError(f"{run_dir} holds neither milestones/ nor model/: train it first")
    return points


def evaluate_milestones(run_dir, validation, load, batch_size=8, max_sequences=None):
    """One row per model and validation source ("all" included): `evaluate_ppl`'s columns plus step,
    train_tokens, milestone_tokens (NaN for the final model) and final. `load(path)` returns a model.

    `df.attrs["windows"]`: each model's per-window NLL (WINDOW_COLUMNS), the model named by step and train_tokens."""
    from .perplexity import evaluate_ppl

    frames, windows = [], []
    for path, point in milestone_points(run_dir):
        model = load(path)
        df = evaluate_ppl(model, validation, batch_size, max_sequences, progress=False)
        windows.append(df.attrs["windows"].assign(step=point["step"], train_tokens=point["train_tokens"], final=point["final"]))
        df.attrs = {}  # the per-model tables: concat would compare them across frames
        frames.append(df.assign(**point))
        del model
    df = pd.concat(frames, ignore_index=True)
    df.attrs["windows"] = pd.concat(windows, ignore_index=True)[WINDOW_COLUMNS]
    return df
