"""Auxiliary losses read from the latest forward of every DSMoE layer inside a module."""

import torch

from .model import NoisyTopKGate, cv_squared, dsmoe_layers


def _layers_with_forward(module, what):
    layers = dsmoe_layers(module)
    if not layers:
        raise ValueError(f"{what}: no DSMoEMLP layer inside {type(module).__name__}")
    if any(layer.last_gate_probs is None for layer in layers):
        raise RuntimeError(f"{what}: run a forward pass first; some DSMoE layer has no routing yet")
    return layers


def _counted(values, token_mask):
    """The rows (tokens) of `values` (T x n) where `token_mask` (B x S with B*S = T, or None) is set."""
    if token_mask is None:
        return values
    return values[token_mask.reshape(-1).to(device=values.device, dtype=torch.bool)]


def sparsity_loss(module, token_mask=None):
    """Eq. 19: mean over DSMoE layers, tokens and experts of G(σ(h·Y)) from the latest forward.

    G keeps σ above τ and zeroes the rest, so gradient reaches only active gate values. For the
    no_gx variant in training every expert is active, so the term is the mean of σ itself.
    `token_mask` (the attention mask of padded, truncate-mode batches) leaves padding out.
    """
    layers = _layers_with_forward(module, "sparsity_loss")
    terms = [_counted(layer.last_gate_probs * layer.last_active, token_mask).mean() for layer in layers]
    return torch.stack(terms).mean()


def cv_balance_loss(module):
    """LLaMA-MoE's balance loss, summed over layers as its model sums it: Σ_l CV²(importance_l) + CV²(load_l).

    Unweighted: LLaMA-MoE's weight 1e-2 is `train.load_balancing_coef` (default 0.01). Importance and
    load are the gate's own, over every token of the batch (padding included, as LLaMA-MoE has them)."""
    layers = _layers_with_forward(module, "cv_balance_loss")
    if not all(isinstance(layer.gate, NoisyTopKGate) for layer in layers):
        raise ValueError("cv_balance_loss: needs the LLaMA-MoE gate of the topk variant on every DSMoE layer")
    return torch.stack([cv_squared(l.gate.last_importance) + cv_squared(l.gate.last_load) for l in layers]).sum()


def load_balancing_loss(module, token_mask=None):
    """Switch-Transformer load-balancing loss of the topk_switch router, averaged over layers:
    n · Σ_i f_i · P_i, with f_i the fraction of routed slots sent to expert i and P_i the
    mean router probability of expert i (Fedus et al., 2022, Eq. 4); padding left out as above."""
    layers = _layers_with_forward(module, "load_balancing_loss")
    terms = []
    for layer in layers:
        active = _counted(layer.last_active, token_mask).float()
        fraction = active.sum(0) / active.sum()
        mean_prob = _counted(layer.last_gate_probs, token_mask).mean(0)
        terms.append(layer.n_experts * (fraction * mean_prob).sum())
    return torch.stack(terms).mean()
