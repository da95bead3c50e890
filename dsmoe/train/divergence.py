"""Stopping a diverged run before it spoils its checkpoints or its saved model.

Checked on every step on the device, read back on log, checkpoint and milestone steps (one host sync):
a non-finite loss or gradient norm stops the run
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
        self.off_for = 0  # consecutive steps with every expert of every layer off (a device tensor once counted)
        self.first = None  # the first failed step's [step, loss, norm, bad, all off, off_for, lm] since the last flush

    def stop(self, message):
        message = f"{message}; training stopped. Last good checkpoint: {self.last_checkpoint or 'none'}"
        logger.warning(message)
        raise TrainingDiverged(message)

    def check_step(self, step, step_stats, grad_norm, flush=True):
        """Before the optimizer step of `step`: a finite loss and gradient norm, some expert on.

        The checks run on the device; `flush` (the trainer: on log, checkpoint and milestone steps and
        the last) reads them back, one host sync, and stops at the first failed step since the last
        flush. Between flushes a non-finite update may reach the weights in memory, never a checkpoint
        or a saved model: every write is preceded by a flush."""
        device = step_stats.device
        checked_norm = grad_norm is not None and self.accelerator.scaler is None
        norm = torch.as_tensor(grad_norm if checked_norm else 0.0).to(device=device, dtype=torch.float32).reshape(())
        loss = step_stats[0].float()
        bad = ~torch.isfinite(loss) | ~torch.isfinite(norm)
        hit = torch.zeros((), dtype=torch.bool, device=device)
        if self.layers and self.all_off_steps is not None:
            self.off_for = (self.off_for + 1) * (step_stats[4:] == 0).all().float()  # int 0 at first, then a tensor
            hit = self.off_for >= self.all_off_steps
        event = torch.stack([torch.tensor(float(step), device=device), loss, norm, bad.float(), hit.float(),
                             torch.as_tensor(self.off_for, dtype=torch.float32, device=device).reshape(()),
                             step_stats[1].float()])
        first = self.first if self.first is not None else torch.zeros_like(event)
        self.first = torch.where((first[0] == 0) & (bad | hit), event, first)
        if flush:
            self.flush()

    def flush(self):
        """Read back the checks since the last flush; stop at the first step that failed one."""
        if self.first is None:
            return
        step, loss, norm, bad, hit, off_for, lm_loss = self.first.tolist()
        self.first = None
        if not step:
            return
        step, off_for = int(step), int(off_for)
        if bad and not math.isfinite(loss):
            self.stop(f"loss is {loss} at step {step}")
        if bad:
            self.stop(f"gradient norm is {norm} at step {step} (loss {loss:.4g})")
        self.stop(f"every expert of every layer has been off for {off_for} steps (to step {step}), "
                  f"LM loss {lm_loss:.3f} against ln(vocab) = {self.ln_vocab:.3f}: a silent "
                  "divergence, usually a learning rate (or λ) far too large (train.all_experts_off_steps)")

    def check_weights(self, model, step):
        """Before the checkpoint of `step`: finite weights, or no checkpoint."""
        if not weights_finite(self.accelerator, model):
            self.stop(f"weights are not finite after step {step}; no checkpoint written")

    def saved(self, checkpoint):
        self.last_checkpoint = str(checkpoint)
