"""RUN/train_log.csv (and TensorBoard, when installed): one row per log interval."""

import csv
import time
from pathlib import Path

import torch

from ..atomic import atomic_file
from .step import active_fraction


def log_row(step, tokens, stats, layers, lam, lr, tokens_per_s):
    """One row of train_log.csv from the mean step statistics `[loss, lm, sparsity, balance, per-layer active]`."""
    per_layer = stats[4:].tolist()
    return {"step": step, "tokens": tokens, "lm_loss": stats[1].item(), "sparsity_loss": stats[2].item(),
            "load_balancing_loss": stats[3].item(), "lambda": lam, "lr": lr, "tokens_per_s": tokens_per_s,
            "mean_active_fraction": active_fraction(per_layer, layers),
            **{f"layer_{i}": k for i, k in enumerate(per_layer)}}


def drop_rows_after(path, step):
    """Rewrite a resumed run's CSV log without the rows of steps after its checkpoint."""
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
    with atomic_file(path) as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


class TrainLog:
    """Collects the step statistics of a log interval and writes their mean as one row.

    Every process calls `write`; the main process alone writes the CSV (accelerate, TensorBoard)."""

    def __init__(self, accelerator, run_dir, start_step, layers, tokens_per_step, tensorboard):
        self.accelerator, self.layers, self.tokens_per_step = accelerator, layers, tokens_per_step
        self.path = Path(run_dir) / "train_log.csv" if accelerator.is_main_process else None
        if self.path is not None and self.path.exists():
            drop_rows_after(self.path, start_step)
        self.tensorboard = tensorboard
        if tensorboard:
            accelerator.init_trackers("tensorboard")
        self.interval, self.tick = [], time.perf_counter()

    def add(self, step_stats):
        self.interval.append(step_stats)  # on the device: read back once per row, in `write`

    def write(self, step, lam, lr, extra=None):
        """Write the row of the interval ending at `step`, trained with `lam` and learning rate `lr`;
        `extra` adds columns (the distillation term when `train.distill` is on)."""
        elapsed, self.tick = time.perf_counter() - self.tick, time.perf_counter()
        row = log_row(step, step * self.tokens_per_step, torch.stack(self.interval).mean(0).cpu(), self.layers, lam, lr,
                      len(self.interval) * self.tokens_per_step / elapsed)
        row.update(extra or {})
        self.interval = []
        if self.path is not None:
            self.append_csv(row)
        if self.tensorboard:
            self.accelerator.log(row, step=step)
        return row

    def append_csv(self, row):
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
