"""Beyond the paper: a data-calibrated gate init that starts the converted model near dense.

The paper initialises the gates Y at random; each expert then opens for about half of the tokens
and the converted model starts far from its dense parent. The FFN inputs of LLaMA-style models
share a dominant direction (for SmolLM2-135M, h·μ > 0 for over 99.8% of tokens, μ the mean FFN
input), so Y_i = c·μ + ε opens every expert with σ ≈ `target_prob` for a typical token: the model
starts as ≈ target_prob × each FFN, and continued pretraining with the sparsity loss closes gates
from there. ε (relative std `noise`) breaks the symmetry between experts.
"""

import math

import torch


@torch.no_grad()
def capture_ffn_inputs(model, input_ids, batch_size=8):
    """Run `model` on `input_ids` (N x T) and return each decoder layer's FFN inputs (tokens x d)."""
    layers = model.model.layers
    captured = [[] for _ in layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda module, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(layers)
    ]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            model(input_ids[start : start + batch_size].to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [torch.cat(chunks).float() for chunks in captured]


@torch.no_grad()
def calibrated_gate_weights(ffn_inputs, n_experts, target_prob=0.9, noise=0.05, seed=0):
    """Y (n x d) with σ(h·Y_i) = target_prob at the median token of `ffn_inputs` (tokens x d)."""
    if not 0.5 < target_prob < 1.0:
        raise ValueError(f"target_prob must lie in (0.5, 1) so that gates start open, got {target_prob}")
    mean = ffn_inputs.mean(0)
    median_logit = (ffn_inputs @ mean).median()
    if median_logit <= 0:
        raise ValueError("FFN inputs have no dominant direction (median h·μ <= 0); use the normal init")
    direction = mean * (math.log(target_prob / (1 - target_prob)) / median_logit)
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(n_experts, mean.numel(), generator=generator) * noise * direction.norm() / math.sqrt(mean.numel())
    return direction.expand(n_experts, -1) + eps
