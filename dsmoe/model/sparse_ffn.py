"""Inference FFN whose cost follows the experts actually used.

`sparse_expert_ffn` computes Σ_i coef_i · o_i over active (token, expert) pairs only, where
o_i = (act(x W_i) ⊙ x U_i) V_i uses expert i's slice of the dense weights (Eq. 6-7).
`masked_expert_ffn` is the simple reference: the dense FFN with each expert's slice weighted.

Expert i's rows of `w_gate` and `w_up` are already one contiguous block each; its slice of
`w_down` is a column block. Two kinds of cached expert weights, both built once per weight
version by DSMoEMLP in eval mode (the checkpoint format is unchanged):
  - `expert_down_weights`: V_iᵀ contiguous per expert (a third of the FFN weights again);
  - `pack_expert_weights` (CPU, fp32 and bf16 where oneDNN runs them): each expert's W_i, U_i
    and V_i reordered once into oneDNN's blocked layout (the FFN weights again). A plain GEMM
    re-packs its weight on every call, which costs most when an expert has few tokens.
Schedules, one Python step per expert (`schedule` picks one per call):
  - union: the union of the tokens' active experts runs on all of them, one GEMM trio per run of
    neighbouring experts (the coefficient is 0 where an expert is off). For one token (decode at
    batch 1) that reads only its k experts' weights: k/n of the dense FFN's weight traffic.
  - grouped: (token, expert) pairs are grouped by expert with one gather, each expert runs one
    GEMM trio on its own tokens, one index_add scatters back.
  - packed: grouped (or, for one token, expert by expert) on the oneDNN-packed weights.
  - grouped_mm (CUDA, bf16, where torch has `_grouped_mm` and its fast kernel runs: compute capability
    9.0 or 10.0, see GROUPED_MM_CAPABILITIES): grouped, each projection one grouped GEMM over all
    experts, no Python loop. On other CUDA GPUs bf16 forwards of 2+ tokens take the masked schedule.
    Tested on CPU via torch's fallback; on a GPU by `pytest -m gpu` (tests/test_sparse_ffn.py).
  - masked: every expert on every token with the dense GEMMs, the inactive ones weighted 0.
Which is fastest depends on the expert's size, the dtype and T: per-call overheads (10-35 µs)
dominate small experts (SmolLM2: 192 x 576) at a few tokens, re-packing weights large ones
(LLaMA-1B: 1024 x 2048). The thresholds below were measured on 2 Zen 4 cores, each layer's weights
read from memory as in a real forward pass (benchmarks/README.md).
This file may import only torch (it is copied next to checkpoints for trust_remote_code).
"""

import os

import torch

FEW_TOKENS = 1  # up to this many tokens the union schedule runs, where no threshold below applies
LARGE_EXPERT = 1 << 20  # weights in one expert matrix from which an expert counts as large
# Small experts with packed weights at hand: the masked schedule for 2 up to this many tokens, by dtype.
SMALL_EXPERT_MASKED_MAX_TOKENS = {torch.bfloat16: 96}  # benchmarks/schedules.py: crossover at 64-128


def is_large_expert(expert_weights):
    return expert_weights >= LARGE_EXPERT


def schedule(tokens, expert_weights, dtype, packed, grouped_mm=False):
    """The schedule (see above) for `tokens` tokens and experts of `expert_weights` weights each.

    `grouped_mm`: True where the grouped_mm schedule runs, "masked" on a CUDA device without it."""
    if grouped_mm and tokens > FEW_TOKENS:
        return "grouped_mm" if grouped_mm is True else grouped_mm
    if packed and not is_large_expert(expert_weights) and 2 <= tokens <= SMALL_EXPERT_MASKED_MAX_TOKENS.get(dtype, 0):
        return "masked"
    if packed:
        return "packed"
    return "union" if tokens <= FEW_TOKENS else "grouped"


def masked_expert_ffn(x, w_gate, w_up, w_down, coef, act_fn):
    """Reference: all experts computed, expert i's intermediate slice scaled by coef[:, i]."""
    n = coef.shape[-1]
    inter = act_fn(x @ w_gate.t()) * (x @ w_up.t())
    inter = inter.view(x.shape[0], n, -1) * coef.unsqueeze(-1)
    return inter.view(x.shape[0], -1) @ w_down.t()


def expert_down_weights(w_down, n_experts):
    """V_iᵀ for every expert as one contiguous n x D/n x d tensor (w_down is d x D)."""
    return w_down.t().reshape(n_experts, -1, w_down.shape[0]).contiguous()


def onednn_runs(dtype, device="cpu"):
    """Whether `pack_expert_weights` and the packed schedules can run `dtype` on `device`."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and onednn_bf16())


def onednn_bf16():
    """Whether oneDNN runs bf16 linears on this CPU (AVX-512 at least). DSMOE_CPU_KIND=avx2 acts as a CPU
    without (dsmoe/cpu.py holds the kinds; this file imports only torch)."""
    return os.environ.get("DSMOE_CPU_KIND", "").strip() != "avx2" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_expert_weights(w_gate, w_up, w_down, n_experts, dtype=None):
    """Per expert, oneDNN-packed linear weights in `dtype` (default: theirs): (W_i, U_i, V_i) for
    large experts, whose GEMMs then fuse the activation and the product with x U_i; ([W_i; U_i], V_i)
    for small ones, one GEMM fewer per expert (a single token's small experts pay most per call)."""
    dtype = dtype or w_gate.dtype
    size = w_gate.shape[0] // n_experts
    stack = not is_large_expert(size * w_gate.shape[1])
    reorder = torch.ops.mkldnn._reorder_linear_weight

    def expert(rows):
        blocks = [torch.cat([w_gate[rows], w_up[rows]])] if stack else [w_gate[rows], w_up[rows]]
        return tuple(reorder(w.to(dtype).contiguous(), None) for w in (*blocks, w_down[:, rows]))

    with torch.no_grad():
        return [expert(slice(i * size, (i + 1) * size)) for i in range(n_experts)]


def sparse_expert_ffn(x, w_gate, w_up, w_down, coef, active, act_fn, down_t=None, packed=None):
    """x: T x d; w_gate, w_up: D x d; w_down: d x D; coef: T x n; active: bool T x n.

    Experts outside `active` contribute nothing. `down_t` (from `expert_down_weights`) is
    optional: without it, expert i's V_iᵀ is a strided view of `w_down` (no copy). `packed`
    (from `pack_expert_weights`, in the compute dtype; needs no autograd) is used where
    `schedule` says so.
    """
    n = coef.shape[-1]
    if down_t is None:
        down_t = w_down.t().view(n, -1, w_down.shape[0])
    if torch.is_autocast_enabled(x.device.type):  # mixed precision: the autocast dtype, expert slices cast on use
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(torch.get_autocast_dtype(x.device.type))
            return sparse_expert_ffn(x, w_gate, w_up, w_down, coef, active, act_fn, down_t, packed)
    coef = coef.to(x.dtype)
    plan = schedule(x.shape[0], down_t.shape[1] * down_t.shape[2], x.dtype, packed is not None, cuda_schedule(x))
    if plan == "grouped_mm":
        return _grouped_mm_by_expert(x, w_gate, w_up, down_t.to(x.dtype), coef, active, act_fn)
    if plan == "packed" and x.shape[0] == 1:
        return _packed_one_token(x, packed, coef, active, act_fn)
    if plan == "packed":
        return _packed_grouped_by_expert(x, packed, coef, active, act_fn)
    if plan == "masked":  # the reference itself, in the compute dtype
        return masked_expert_ffn(x, *(w.to(x.dtype) for w in (w_gate, w_up, w_down)), coef * active, act_fn)
    if plan == "union":
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
    token_idx, weights, counts = _pairs_by_expert(coef, active)
    counts = counts.tolist()
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


def _pairs_by_expert(coef, active):
    """Active (token, expert) pairs sorted by expert: token indices, coefficients (P x 1), counts per expert (a tensor)."""
    expert_major = active.t()  # row-major nonzero of the n x T mask: by expert, tokens ascending
    token_idx = expert_major.nonzero()[:, 1]
    return token_idx, coef.t()[expert_major].unsqueeze(-1), expert_major.sum(1)


_linear = torch.ops.mkldnn._linear_pointwise if hasattr(torch.ops, "mkldnn") else None


def _packed_swiglu(x, expert, act_fn):
    """act(x W_i) ⊙ x U_i for a packed expert (see `pack_expert_weights`)."""
    if len(expert) == 2:  # [W_i; U_i] stacked
        h = _linear(x, expert[0], None, "none", [], "")
        size = h.shape[-1] // 2
        return act_fn(h[:, :size]).mul_(h[:, size:])
    if isinstance(act_fn, torch.nn.SiLU) or type(act_fn).__name__ == "SiLUActivation" or act_fn is torch.nn.functional.silu:
        h = _linear(x, expert[0], None, "swish", [], "")
    else:
        h = act_fn(_linear(x, expert[0], None, "none", [], ""))
    return _linear.binary(x, h, expert[1], None, "mul")


def packed_expert_ffn(x, expert, act_fn):
    """o_i = (act(x W_i) ⊙ x U_i) V_i for one packed expert (n = 1: the dense FFN)."""
    return _linear(_packed_swiglu(x, expert, act_fn), expert[-1], None, "none", [], "")


def _packed_one_token(x, packed, coef, active, act_fn):
    out = None
    for expert, on, weight in zip(packed, active[0].tolist(), coef[0].tolist()):
        if on:
            y = packed_expert_ffn(x, expert, act_fn)
            out = y.mul_(weight) if out is None else out.add_(y, alpha=weight)
    return x.new_zeros(x.shape) if out is None else out


def _packed_grouped_by_expert(x, packed, coef, active, act_fn):
    token_idx, weights, counts = _pairs_by_expert(coef, active)
    xs, out, start = x.index_select(0, token_idx), x.new_zeros(x.shape), 0
    for expert, count in zip(packed, counts.tolist()):
        if count:
            pairs = slice(start, start + count)
            h = _packed_swiglu(xs[pairs], expert, act_fn).mul_(weights[pairs])
            out.index_add_(0, token_idx[pairs], _linear(h, expert[-1], None, "none", [], ""))
            start += count
    return out


GROUPED_MM_DEVICES = {"cuda"}  # where `torch._grouped_mm` (one kernel for every expert's GEMM) replaces the loop


# torch's _grouped_mm runs its CUTLASS kernel only on compute capability 9.0 and 10.0 (aten/src/ATen/native/cuda/
# GroupedBlas.cpp, _grouped_mm_cuda: `_scaled_mm_allowed_device(sm90_only, sm100_only)`); elsewhere it loops
# over the groups with a host sync for the offsets, slower than the masked schedule.
GROUPED_MM_CAPABILITIES = {(9, 0), (10, 0)}


def device_capability(device):
    """(major, minor) of a CUDA device; None for other devices."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def grouped_mm_runs(x):
    """Whether the grouped_mm schedule runs `x`: bf16 on a GROUPED_MM_DEVICES device, a torch with `_grouped_mm`
    and, on CUDA, a compute capability with its fast kernel."""
    if x.device.type not in GROUPED_MM_DEVICES or x.dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    capability = device_capability(x.device)
    return capability is None or tuple(capability) in GROUPED_MM_CAPABILITIES


def cuda_schedule(x):
    """For `schedule`: True where grouped_mm runs; "masked" for bf16 on a GROUPED_MM_DEVICES device without it."""
    if grouped_mm_runs(x):
        return True
    return "masked" if x.device.type in GROUPED_MM_DEVICES and x.dtype == torch.bfloat16 else False


def _grouped_mm_by_expert(x, w_gate, w_up, down_t, coef, active, act_fn):
    # The grouped schedule with each projection one torch._grouped_mm over all experts: no loop over them.
    n, size, d = down_t.shape
    token_idx, weights, counts = _pairs_by_expert(coef, active)
    if token_idx.numel() == 0:  # no active (token, expert) pair (a high τ): nothing to add, no empty GEMM
        return x.new_zeros(x.shape)
    offsets = counts.cumsum(0).to(torch.int32)  # kept on the device: no host sync for the counts
    xs = x.index_select(0, token_idx)
    gate = torch._grouped_mm(xs, w_gate.to(x.dtype).view(n, size, d).transpose(1, 2), offs=offsets)
    up = torch._grouped_mm(xs, w_up.to(x.dtype).view(n, size, d).transpose(1, 2), offs=offsets)
    h = act_fn(gate) * up * weights
    return x.new_zeros(x.shape).index_add_(0, token_idx, torch._grouped_mm(h, down_t, offs=offsets))
