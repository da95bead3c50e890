"""Continued pretraining: loss = LM loss + λ·sparsity loss (paper §4.3, Eq. 17-19)."""

from .trainer import TrainingDiverged, auxiliary_losses, param_groups, train

__all__ = ["TrainingDiverged", "auxiliary_losses", "param_groups", "train"]
