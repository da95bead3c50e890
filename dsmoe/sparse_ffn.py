"""Inference FFN whose cost follows the experts actually used.

`sparse_expert_ffn` computes Σ_i coef_i · o_i over active (token, expert) pairs only, where
o_i = (act(x W_i) ⊙ x U_i) V_i uses expert i's slice of the dense weights (Eq. 6-7).
`masked_expert_ffn` is the simple reference: the dense FFN with each expert's slice weighted.
This file may import only torch (it is copied next to checkpoints for trust_remote_code).
"""

import torch


def masked_expert_ffn(x, w_gate, w_up, w_down, coef, act_fn):
    """Reference: all experts computed, expert i's intermediate slice scaled by coef[:, i]."""
    n = coef.shape[-1]
    inter = act_fn(x @ w_gate.t()) * (x @ w_up.t())
    inter = inter.view(x.shape[0], n, -1) * coef.unsqueeze(-1)
    return inter.view(x.shape[0], -1) @ w_down.t()


def sparse_expert_ffn(x, w_gate, w_up, w_down, coef, active, act_fn):
    """x: T x d; w_gate, w_up: D x d; w_down: d x D; coef: T x n; active: bool T x n."""
    n = coef.shape[-1]
    expert_size = w_gate.shape[0] // n
    out = torch.zeros_like(x)
    token_idx, expert_idx = active.nonzero(as_tuple=True)
    if token_idx.numel() == 0:
        return out
    counts = torch.bincount(expert_idx, minlength=n).tolist()
    order = torch.argsort(expert_idx, stable=True)
    token_idx, expert_idx = token_idx[order], expert_idx[order]
    weights = coef[token_idx, expert_idx].unsqueeze(-1)
    start = 0
    for i, count in enumerate(counts):
        if count == 0:
            continue
        idx = token_idx[start : start + count]
        rows = slice(i * expert_size, (i + 1) * expert_size)
        xi = x.index_select(0, idx)
        hi = act_fn(xi @ w_gate[rows].t()) * (xi @ w_up[rows].t())
        out.index_add_(0, idx, (hi @ w_down[:, rows].t()) * weights[start : start + count])
        start += count
    return out
