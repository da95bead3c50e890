"""Models kept at token milestones of a run (paper Appendix B, Tables 5-6): RUN/milestones/step_N.

`dsmoe train --milestones` saves the model, in the run's dtype, at the first step whose tokens reach
each of `eval.milestone_tokens`, beside a milestone.json (step, tokens, the milestone asked for, the
run's fingerprint). Checkpoints (RUN/checkpoints/, of which `keep_checkpoints` are kept) are for
resuming; milestones stay. `dsmoe eval milestones` evaluates them (dsmoe/evaluation/milestones.py).
"""

import json
import logging
import math
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def milestone_steps(milestone_tokens, tokens_per_step, total_steps):
    """`{step: milestone}`: the first step whose tokens (step x tokens_per_step) reach each milestone.

    A milestone beyond the budget is left out with a warning; two milestones that fall on one step
    keep the smaller."""
    steps = {}
    for milestone in sorted(float(m) for m in milestone_tokens):
        step = max(1, math.ceil(milestone / tokens_per_step))
        if step > total_steps:
            logger.warning("milestone %.4g tokens lies beyond the budget (%d steps of %d tokens): not saved",
                           milestone, total_steps, tokens_per_step)
            continue
        steps.setdefault(step, milestone)
    return steps


def milestone_dirs(run_dir):
    """`[(path, milestone.json)]` of a run's saved milestones, by step."""
    root = Path(run_dir) / "milestones"
    found = [p for p in root.glob("step_*") if (p / "milestone.json").is_file()] if root.is_dir() else []
    return sorted(((p, json.loads((p / "milestone.json").read_text())) for p in found), key=lambda item: item[1]["step"])


def clear_stale_milestones(accelerator, run_dir, fingerprint, start_step):
    """Delete milestones of another config, and those after `start_step` (they will be saved again)."""
    if accelerator.is_main_process:
        for path, info in milestone_dirs(run_dir):
            if info.get("fingerprint") != fingerprint or info["step"] > start_step:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()


def warn_missed(milestones, run_dir, start_step):
    """Milestones before the step resumed from that were never saved (asked for after that training)."""
    saved = {info["step"] for _, info in milestone_dirs(run_dir)}
    for step, milestone in milestones.items():
        if step <= start_step and step not in saved:
            logger.warning("milestone %.4g tokens (step %d) lies before the resumed step %d and was not saved; "
                           "train again with --no-resume to keep it", milestone, step, start_step)


def save_model_copy(accelerator, model, tokenizer, path, dtype, extra_files=()):
    """The trained model, in `dtype`, via save_pretrained (atomic), leaving the live model as it is.

    Every process calls this: gathering FSDP shards (get_state_dict) is a collective."""
    from ..hub import save_model

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        state_dict = cast_shared(state_dict, dtype)
        save_model(accelerator.unwrap_model(model), tokenizer, path, extra_files, state_dict=state_dict)
    accelerator.wait_for_everyone()
    return path


def cast_shared(state_dict, dtype):
    """`state_dict` in `dtype`, tensors that share storage (a tied embedding and head) still shared."""
    cast = {}
    for tensor in state_dict.values():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride())
        if key not in cast:
            cast[key] = tensor.detach().to(dtype)
    return {name: cast[(t.data_ptr(), t.shape, t.stride())] for name, t in state_dict.items()}


def save_milestone(run, step, milestone, dtype):
    """Keep the model of `step` as RUN/milestones/step_N (every process calls this)."""
    path = Path(run.out) / "milestones" / f"step_{step}"
    save_model_copy(run.accelerator, run.model, run.tokenizer, path, dtype)
    if run.accelerator.is_main_process:
        info = {"step": step, "tokens": step * run.tokens_per_step, "milestone_tokens": milestone,
                "fingerprint": run.fingerprint, "variant": run.variant}
        (path / "milestone.json").write_text(json.dumps(info, indent=2) + "\n")
    run.accelerator.wait_for_everyone()
    logger.info("kept milestone %s (%d tokens)", path, step * run.tokens_per_step)
