"""Checkpoints of a run directory: RUN/checkpoints/step_N, what a run resumes from, atomic saves.

A checkpoint is `accelerator.save_state` (model, optimizer, schedule, RNG states) plus
trainer_state.json: step, λ, data position and the run's fingerprint. A run resumes only from a
checkpoint with its own fingerprint.
"""

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger(__name__)

LOG_ONLY_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "micro_batch_size")


def run_fingerprint(config, variant, manifest, model):
    """What makes two runs the same run: training settings, data, variant and the init model's shape."""
    train = {k: v for k, v in config["train"].items() if k not in LOG_ONLY_KEYS}
    init = {"model_type": model.config.model_type, "params": sum(p.numel() for p in model.parameters()),
            "n_experts": getattr(model.config, "n_experts", None), "tau": getattr(model.config, "tau", None)}
    spec = {"train": train, "variant": variant, "data": manifest["fingerprint"], "init": init}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def checkpoints(run_dir):
    """Finished checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


class Resume(NamedTuple):
    """How a run starts: from `checkpoint` (None: from the init model), after deleting the old
    checkpoints if `discard`."""

    checkpoint: Path | None
    discard: bool


def resume_point(run_dir, fingerprint, resume=True, overwrite=False):
    """Resume from the newest checkpoint of the same run; refuse a run directory of a different config.

    `overwrite` discards checkpoints of a different config; `resume=False` discards any."""
    found = checkpoints(run_dir)
    if not found:
        return Resume(None, discard=False)
    saved = json.loads((found[-1] / "trainer_state.json").read_text())["fingerprint"]
    if saved != fingerprint and not overwrite:
        raise ValueError(f"{run_dir} holds checkpoints of a different config (fingerprint {saved}, "
                         f"this run {fingerprint}); pass --overwrite to discard them, or choose another --out")
    if saved != fingerprint or not resume:
        return Resume(None, discard=True)
    return Resume(found[-1], discard=False)


def clear_checkpoints(accelerator, run_dir, discard):
    """Delete the half-written checkpoints of a killed run, and all of them if `discard`."""
    root = Path(run_dir) / "checkpoints"
    if accelerator.is_main_process:
        if discard:
            shutil.rmtree(root)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, checkpoint):
    """Restore the prepared model, optimizer, schedule and RNG states; return the trainer state."""
    accelerator.load_state(str(checkpoint))
    logger.info("resuming from %s", checkpoint)
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


def save_checkpoint(accelerator, run_dir, step, trainer_state, keep):
    """accelerator.save_state into RUN/checkpoints/step_N, atomically; keep the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    tmp, final = root / f".tmp-step_{step}", root / f"step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
