"""Baselines: the training-free partition-and-drop sweep and static pruning at matched activated params.

The top-k (LLaMA-MoE) baseline is the `topk` variant of `dsmoe convert`, trained by `dsmoe train`.
"""

from .drop import DropRecorder, PartitionedDropMLP, drop_sweep, partition_for_drop, set_threshold
from .pruning import fraction_for_activated_pct, prune

__all__ = ["DropRecorder", "PartitionedDropMLP", "drop_sweep", "fraction_for_activated_pct", "partition_for_drop",
           "prune", "set_threshold"]
