"""Stopping a diverged run before it spoils its weights or its checkpoints.

Checked on every step, before the optimizer step: a non-finite loss or gradient norm stops the run
(under fp16 loss scaling an overflowing gradient is the scaler's to skip, as usual). Checked before
every checkpoint: non-finite weights stop the run and no checkpoint is written. A silent divergence
stops it too: every expert of every layer off for `train.all_experts_off_steps` steps in a row, the
LM loss near ln(vocab), usually from a learning rate far too large.
"""

import logging
import math

import torch

from .step import TrainingDiverged

logger = logging.getLogger(__name__)


def weights_finite(accelerator, model):
    """Whether every parameter of the (prepared) model is finite, on every process."""
    bad = sum(int(not torch.isfinite(p).all()) for p in model.parameters() if p.numel())
    return accelerator.reduce(torch.tensor([float(bad)], device=accelerator.device), "sum").item() == 0


class DivergenceGuard:
    """Raises TrainingDiverged, naming the step and the last good checkpoint."""

    def __init__(self, accelerator, layers, all_off_steps, vocab_size, last_checkpoint=None):
        self.accelerator, self.layers, self.all_off_steps = accelerator, layers, all_off_steps
        self.ln_vocab = math.log(vocab_size)
        self.last_checkpoint = last_checkpoint
        self.off_for = 0  # consecutive steps with every expert of every layer off

    def stop(self, message):
        message = f"{message}; training stopped. Last good checkpoint: {self.last_checkpoint or 'none'}"
        logger.warning(message)
        raise TrainingDiverged(message)

    def check_step(self, step, step_stats, grad_norm):
        """Before the optimizer step of `step`: a finite loss and gradient norm, some expert on.

        One host transfer for all three checks (loss, gradient norm, experts off)."""
        checked_norm = grad_norm is not None and self.accelerator.scaler is None
        norm = torch.as_tensor(grad_norm if checked_norm else 0.0, dtype=torch.float32).to(step_stats.device)
        all_off = (step_stats[4:] == 0).all() if self.layers else torch.zeros((), dtype=torch.bool, device=norm.device)
        loss, norm, all_off, lm_loss = torch.stack([step_stats[0].float(), norm.reshape(()), all_off.float(),
                                                    step_stats[1].float()]).tolist()
        if not math.isfinite(loss):
            self.stop(f"loss is {loss} at step {step}")
        if checked_norm and not math.isfinite(norm):
            self.stop(f"gradient norm is {norm} at step {step} (loss {loss:.4g})")
        if not self.layers or self.all_off_steps is None:
            return
        self.off_for = self.off_for + 1 if all_off else 0
        if self.off_for >= self.all_off_steps:
            self.stop(f"every expert of every layer has been off for {self.off_for} steps (to step {step}), "
                      f"LM loss {lm_loss:.3f} against ln(vocab) = {self.ln_vocab:.3f}: a silent "
                      "divergence, usually a learning rate (or λ) far too large (train.all_experts_off_steps)")

    def check_weights(self, model, step):
        """Before the checkpoint of `step`: finite weights, or no checkpoint."""
        if not weights_finite(self.accelerator, model):
            self.stop(f"weights are not finite after step {step}; no checkpoint written")

    def saved(self, checkpoint):
        self.last_checkpoint = str(checkpoint)
