"""Massive activations of a dense base model at position 0, and which expert holds them (issue 28).

Per decoder layer: the FFN intermediate act(x W_gate) ⊙ x W_up at the first position of each
validation window, the units of largest mean |activation| over the windows, their expert under
DSMoE's contiguous partition (Eq. 6: unit u belongs to expert u // (D/n)), and the residual stream
after the layer at position 0 (mean over windows of its largest |value|).
"""

import numpy as np
import pandas as pd
import torch

from ..convert import check_partitionable
from ..model import decoder_layers, dsmoe_layers

COLUMNS = ["layer", "rank", "unit", "expert", "mean_abs_activation", "residual_max_abs"]


@torch.no_grad()
def massive_activations(model, windows, n_experts, top_units=3, batch_size=8):
    """One row per layer and rank (COLUMNS) from `windows` (N x T token ids) of a dense LLaMA-style model."""
    if dsmoe_layers(model):
        raise ValueError("massive activations are read on the dense base model; this one has DSMoE layers")
    check_partitionable(model, n_experts)
    if not 1 <= top_units:
        raise ValueError(f"top_units must be >= 1, got {top_units}")
    layers = decoder_layers(model)
    inter = [[] for _ in layers]
    residual = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.down_proj.register_forward_hook(
            lambda m, args, out, i=i: inter[i].append(args[0][:, 0].abs().float().cpu())))
        hooks.append(layer.register_forward_hook(
            lambda m, args, out, i=i: residual[i].append((out[0] if isinstance(out, tuple) else out)[:, 0].abs().amax(-1).float().cpu())))
    model.eval()
    try:
        device = next(model.parameters()).device
        for start in range(0, len(windows), batch_size):
            ids = torch.as_tensor(np.asarray(windows[start:start + batch_size], dtype=np.int64), device=device)
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for i, layer in enumerate(layers):
        mean_abs = torch.cat(inter[i]).mean(0)
        expert_size = mean_abs.numel() // n_experts
        res = float(torch.cat(residual[i]).mean())
        for rank, unit in enumerate(mean_abs.argsort(descending=True, stable=True)[:top_units].tolist()):
            rows.append({"layer": i, "rank": rank, "unit": unit, "expert": unit // expert_size,
                         "mean_abs_activation": float(mean_abs[unit]), "residual_max_abs": res})
    return pd.DataFrame(rows, columns=COLUMNS)
