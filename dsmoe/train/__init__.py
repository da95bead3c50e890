"""Continued pretraining: loss = LM loss + λ·sparsity loss (paper §4.3, Eq. 17-19).

trainer.py: setup, the loop and `dsmoe train`; step.py: one optimizer step; checkpoint.py: checkpoints
and the resume decision; divergence.py: stopping a diverged run; log.py: train_log.csv.
"""

from .step import TrainingDiverged, auxiliary_losses, param_groups
from .trainer import train

__all__ = ["TrainingDiverged", "auxiliary_losses", "param_groups", "train"]
