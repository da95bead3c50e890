"""Inference FFN whose cost follows the experts actually used.

`sparse_expert_ffn` computes Σ_i coef_i · o_i over active (token, expert) pairs only, where
o_i = (act(x W_i) ⊙ x U_i) V_i uses expert i's slice of the dense weights (Eq. 6-7).
`masked_expert_ffn` is the simple reference: the dense FFN with each expert's slice weighted.

Expert i's rows of `w_gate` and `w_up` are already one contiguous block each; its slice of
`w_down` is a column block, so `expert_down_weights` stores V_iᵀ contiguously per expert
(DSMoEMLP caches it for inference). Two schedules, both with one Python step per expert:
  - one token (decode at batch 1): multiply by its active experts' weights directly, one GEMV
    trio per run of neighbouring active experts (all on = the dense FFN). Cost is memory-bound:
    k/n of the dense FFN's weight traffic.
  - more tokens (batched decode, prefill, scoring): (token, expert) pairs are grouped by expert
    with one gather, each expert runs one GEMM trio on its own tokens, one index_add scatters
    back. (Even for 2-8 tokens this beats running the union of their experts on all of them:
    CPU GEMMs with a few rows cost more per weight byte than with one.)
This file may import only torch (it is copied next to checkpoints for trust_remote_code).
"""

import torch

FEW_TOKENS = 1  # up to this many tokens: the union of their active experts runs on all of them


def masked_expert_ffn(x, w_gate, w_up, w_down, coef, act_fn):
    """Reference: all experts computed, expert i's intermediate slice scaled by coef[:, i]."""
    n = coef.shape[-1]
    inter = act_fn(x @ w_gate.t()) * (x @ w_up.t())
    inter = inter.view(x.shape[0], n, -1) * coef.unsqueeze(-1)
    return inter.view(x.shape[0], -1) @ w_down.t()


def expert_down_weights(w_down, n_experts):
    """V_iᵀ for every expert as one contiguous n x D/n x d tensor (w_down is d x D)."""
    return w_down.t().reshape(n_experts, -1, w_down.shape[0]).contiguous()


def sparse_expert_ffn(x, w_gate, w_up, w_down, coef, active, act_fn, down_t=None):
    """x: T x d; w_gate, w_up: D x d; w_down: d x D; coef: T x n; active: bool T x n.

    Experts outside `active` contribute nothing. `down_t` (from `expert_down_weights`) is
    optional: without it, expert i's V_iᵀ is a strided view of `w_down` (no copy).
    """
    n = coef.shape[-1]
    if down_t is None:
        down_t = w_down.t().view(n, -1, w_down.shape[0])
    if torch.is_autocast_enabled(x.device.type):  # mixed precision: the autocast dtype, expert slices cast on use
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(torch.get_autocast_dtype(x.device.type))
            return sparse_expert_ffn(x, w_gate, w_up, w_down, coef, active, act_fn, down_t)
    coef = coef.to(x.dtype)
    if x.shape[0] <= FEW_TOKENS:
        return _union_of_experts(x, w_gate, w_up, down_t, coef * active, active.any(0), act_fn)
    return _grouped_by_expert(x, w_gate, w_up, down_t, coef, active, act_fn)


def _runs(indices):
    """Sorted expert indices as half-open runs of neighbours: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    runs = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def _union_of_experts(x, w_gate, w_up, down_t, coef, used, act_fn):
    # Neighbouring experts are neighbouring weight rows: each run of them is one GEMM trio.
    n, size, d = down_t.shape
    out = x.new_zeros(x.shape)
    for first, stop in _runs(used.nonzero().flatten().tolist()):
        rows = slice(first * size, stop * size)
        h = act_fn(x @ w_gate[rows].to(x.dtype).t()) * (x @ w_up[rows].to(x.dtype).t())
        h = h.view(-1, stop - first, size) * coef[:, first:stop, None]
        out = out.addmm_(h.view(x.shape[0], -1), down_t[first:stop].view(-1, d).to(x.dtype))
    return out


def _grouped_by_expert(x, w_gate, w_up, down_t, coef, active, act_fn):
    # Row-major nonzero of the n x T mask lists pairs sorted by expert, tokens ascending.
    size = down_t.shape[1]
    expert_major = active.t()
    token_idx = expert_major.nonzero()[:, 1]
    weights = coef.t()[expert_major].unsqueeze(-1)
    counts = expert_major.sum(1).tolist()
    xs = x.index_select(0, token_idx)
    in_place = not torch.is_grad_enabled()  # no autograd: reuse buffers, write into one output
    ys, start = torch.empty_like(xs) if in_place else [], 0
    for i, count in enumerate(counts):
        if count == 0:
            continue
        pairs, rows = slice(start, start + count), slice(i * size, (i + 1) * size)
        xi, down_i = xs[pairs], down_t[i].to(x.dtype)
        w_gate_i, w_up_i = w_gate[rows].to(x.dtype), w_up[rows].to(x.dtype)
        if in_place:
            h = act_fn(xi @ w_gate_i.t()).mul_(xi @ w_up_i.t()).mul_(weights[pairs])
            torch.mm(h, down_i, out=ys[pairs])
        else:
            h = act_fn(xi @ w_gate_i.t()) * (xi @ w_up_i.t()) * weights[pairs]
            ys.append(h @ down_i)
        start += count
    if start == 0:
        return x.new_zeros(x.shape)
    return x.new_zeros(x.shape).index_add_(0, token_idx, ys if in_place else torch.cat(ys))
