"""Stopping a training job early and cleanly, so that the next job resumes where it stopped.

A cluster job ends before the token budget is spent when its walltime runs out, when SLURM sends
the signal asked for with `--signal=USR1@SECONDS` (the workflow profile's `slurm_extra`: to the job
steps, whose snakemake processes ignore it; docs/cluster.md), when it is cancelled with
`scancel --signal=USR1`, or when the node is preempted (SIGTERM, then SIGKILL after
the cluster's KillWait). `StopRequest` turns each of these into one decision taken between two
optimizer steps, the same on every rank: finish the current step, write a checkpoint, and leave with
`Preempted` -> exit status `RESUBMIT_EXIT` (75, EX_TEMPFAIL: "try again").

The next job of the same run (Snakemake's `retries` of rule pretrain) resumes from that checkpoint.
So that a real error is not retried for ever, every exit of this kind is recorded in
`RUN/resubmit.json` ({"attempt": k, "step": s, "reason": ...}); `check_attempt` refuses to start
attempt k when more than `retry_failures` attempts in a row before it ended without such a record
(a crash, an error, a kill before the checkpoint), naming the log to read. Attempt 1 (a fresh
`snakemake` run) forgets the record. The exit status alone could not carry this: a launcher
(`accelerate launch`, torchrun) reports any failed worker as exit 1.
"""

import json
import logging
import os
import signal
import time
from pathlib import Path

logger = logging.getLogger(__name__)

RESUBMIT_EXIT = 75  # EX_TEMPFAIL (sysexits.h): stopped early, checkpoint written, run again to resume
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
RECORD = "resubmit.json"


class Preempted(Exception):
    """Training stopped early after writing the checkpoint of `step`; the next job resumes from it."""

    def __init__(self, step, reason):
        super().__init__(f"stopped at step {step} ({reason}) after writing its checkpoint: "
                         f"exit {RESUBMIT_EXIT}, the next job resumes from it")
        self.step, self.reason = step, reason


class StopRequest:
    """Whether to stop after this step: a signal arrived, or the next step would pass the time limit.

    `time_limit_s`: seconds this process may run (the job's walltime); the run stops while there is
    still `margin_s` left for the checkpoint and the exit, and one step more than the slowest so far."""

    def __init__(self, time_limit_s=None, margin_s=0.0, signals=SIGNALS):
        self.started = time.monotonic()
        self.deadline = None if time_limit_s is None else self.started + time_limit_s - margin_s
        self.reason = None
        self.slowest_step = 0.0
        self._last = self.started
        self._previous = {}
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.reason is None:
            logger.warning("received %s: stopping after this step, with a checkpoint", signal.Signals(signum).name)
        self.reason = signal.Signals(signum).name

    def step_done(self, accelerator):
        """Called after each optimizer step; True when every rank must checkpoint and stop now."""
        now = time.monotonic()
        self.slowest_step = max(self.slowest_step, now - self._last)
        self._last = now
        if self.reason is None and self.deadline is not None and now + self.slowest_step > self.deadline:
            self.reason = "time limit"
        return _any_rank(accelerator, self.reason is not None)

    def close(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def _any_rank(accelerator, flag):
    """True on every rank when `flag` is True on any (a signal may reach one node first)."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    import torch

    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def record_resubmit(out, attempt, step, reason):
    """Written by the main process when it leaves with RESUBMIT_EXIT."""
    path = Path(out) / RECORD
    tmp = path.with_name(f".{RECORD}.{os.getpid()}")
    tmp.write_text(json.dumps({"attempt": attempt, "step": step, "reason": reason}))
    os.replace(tmp, path)


def check_attempt(out, attempt, retry_failures):
    """Before anything is loaded: may attempt `attempt` of this run start? ValueError when not."""
    path = Path(out) / RECORD
    if attempt <= 1:
        path.unlink(missing_ok=True)
        return
    last = json.loads(path.read_text())["attempt"] if path.is_file() else 0
    failed = attempt - 1 - last  # attempts in a row, just before this one, that ended without a checkpoint exit
    if failed > retry_failures:
        raise ValueError(f"attempt {attempt}: the {failed} attempt(s) before it failed without stopping for a "
                         f"resubmit (cluster.retry_failures={retry_failures}); not retrying an error: read the "
                         "training log, fix the cause and run snakemake again")
