"""Checkpoints of a run directory: RUN/checkpoints/step_N, what a run resumes from, atomic saves.

A checkpoint is `accelerator.save_state` (model, optimizer, schedule, RNG states) plus
trainer_state.json: step, λ, data position and the run's fingerprint. A run resumes only from a
checkpoint with its own fingerprint: the newest one that loads. Damaged newer ones (no readable
trainer state, a file that does not load) are skipped with a warning naming the cause, and set aside
as `checkpoints/damaged-step_N` so that rotation never keeps them in place of a good one.
"""

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import NamedTuple

import torch

from ..names import LOG_ONLY_KEYS  # changing them keeps a run resumable

logger = logging.getLogger(__name__)


def run_fingerprint(config, variant, manifest, model):
    """What makes two runs the same run: training settings, data, variant and the init model's shape."""
    train = {k: v for k, v in config["train"].items() if k not in LOG_ONLY_KEYS}
    # the recipe options of issue 28 enter only when on: runs from before them keep their fingerprint
    if not train.get("gate_warmup_steps"):
        train.pop("gate_warmup_steps", None)
    if not (train.get("distill") or {}).get("weight"):
        train.pop("distill", None)
    init = {"model_type": model.config.model_type, "params": sum(p.numel() for p in model.parameters()),
            "n_experts": getattr(model.config, "n_experts", None), "tau": getattr(model.config, "tau", None)}
    spec = {"train": train, "variant": variant, "data": manifest["fingerprint"], "init": init}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def checkpoints(run_dir):
    """Finished checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path):
    return int(Path(path).name[5:])


def read_trainer_state(checkpoint):
    """A checkpoint's trainer_state.json; ValueError saying what is wrong with it."""
    path = Path(checkpoint) / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError("trainer_state.json is missing") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"trainer_state.json is unreadable ({err})") from None
    if not isinstance(state, dict) or not {"step", "fingerprint"} <= set(state):
        raise ValueError("trainer_state.json lacks its step or fingerprint")
    return state


class Resume(NamedTuple):
    """How a run starts: from the first of `checkpoints` that loads, newest first (none: from the
    init model), after deleting the old checkpoints if `discard`."""

    checkpoints: tuple
    discard: bool


def resume_point(run_dir, fingerprint, resume=True, overwrite=False):
    """The checkpoints of the same run to resume from; refuse a run directory of a different config.

    The newest checkpoint with a readable trainer state decides; unreadable ones are skipped.
    `overwrite` discards checkpoints of a different config; `resume=False` discards any."""
    found = checkpoints(run_dir)[::-1]
    if not found:
        return Resume((), discard=False)
    readable = []
    for checkpoint in found:
        try:
            readable.append((checkpoint, read_trainer_state(checkpoint)["fingerprint"]))
        except ValueError as err:
            if resume:
                logger.warning("skipping checkpoint %s: %s", checkpoint, err)
    if not readable and resume and not overwrite:
        raise ValueError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} has a readable trainer state; "
                         "pass --no-resume to start over")
    saved = readable[0][1] if readable else None
    if saved not in (fingerprint, None) and not overwrite:
        raise ValueError(f"{run_dir} holds checkpoints of a different config (fingerprint {saved}, "
                         f"this run {fingerprint}); pass --overwrite to discard them, or choose another --out")
    if saved != fingerprint or not resume:
        return Resume((), discard=True)
    return Resume(tuple(checkpoint for checkpoint, saved in readable if saved == fingerprint), discard=False)


def clear_checkpoints(accelerator, run_dir, discard):
    """Delete the half-written checkpoints of a killed run, and all of them if `discard`."""
    root = Path(run_dir) / "checkpoints"
    if accelerator.is_main_process:
        if discard:
            shutil.rmtree(root)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


def _loads(accelerator, checkpoint):
    """Try `accelerator.load_state`; `None` if every process loaded it, else the cause."""
    try:
        accelerator.load_state(str(checkpoint))
        reason = None
    except Exception as err:  # noqa: BLE001  (any damage: truncated, missing or foreign files)
        reason = f"{type(err).__name__}: {str(err).strip() or 'no message'}"
    failed = torch.tensor([0.0 if reason is None else 1.0], device=accelerator.device)
    if accelerator.reduce(failed, "sum").item() > 0 and reason is None:
        reason = "it does not load on another process"
    return reason


def set_aside_newer(accelerator, run_dir, step):
    """Rename the checkpoints newer than `step` (damaged ones) to checkpoints/damaged-step_N."""
    if accelerator.is_main_process:
        for checkpoint in checkpoints(run_dir):
            if checkpoint_step(checkpoint) > step:
                aside = checkpoint.with_name(f"damaged-{checkpoint.name}")
                shutil.rmtree(aside, ignore_errors=True)
                checkpoint.rename(aside)
                logger.warning("moved the damaged checkpoint %s aside to %s", checkpoint, aside.name)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, run_dir, candidates):
    """Restore the prepared model, optimizer, schedule and RNG states from the newest of `candidates`
    that loads; return `(its trainer state, its path)`. Says which it skipped, and why."""
    failures = []
    for checkpoint in candidates:
        reason = _loads(accelerator, checkpoint)
        if reason is None:
            state = read_trainer_state(checkpoint)
            set_aside_newer(accelerator, run_dir, state["step"])
            logger.info("resuming from %s", checkpoint)
            return state, checkpoint
        logger.warning("skipping checkpoint %s: it does not load (%s)", checkpoint, reason)
        failures.append(f"{checkpoint.name}: {reason}")
    raise ValueError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} loads ({'; '.join(failures)}); "
                     "pass --no-resume to start over")


def save_checkpoint(accelerator, run_dir, step, trainer_state, keep):
    """accelerator.save_state into RUN/checkpoints/step_N, atomically; keep the newest `keep`.

    Rotation deletes only checkpoints older than this one: the one just written (the caller checked
    that its weights are finite) is never deleted."""
    root = Path(run_dir) / "checkpoints"
    tmp, final = root / f".tmp-step_{step}", root / f"step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # save_state ends with no barrier: each process writes its own RNG state file (and re-creates the
    # folder first). Renaming before every process is done left `.tmp-step_N` behind, holding rank N's
    # RNG state that the finished checkpoint then lacked.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        older = [p for p in checkpoints(run_dir) if checkpoint_step(p) < step]
        for old in older[:max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
