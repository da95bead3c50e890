"""Beyond the paper: a gate init fitted on calibration text, so that the converted model starts at
dense quality and its experts differ.

The paper initialises the gates Y at random: each expert opens for about half of the tokens and the
converted model starts far from its dense parent (SmolLM2-135M: perplexity ~10⁵ against 8.6).
Here each expert's gate is Y_i = y + α·S_i, fitted by ridge least squares on the FFN inputs h of a
few training windows (no bias: Eq. 7 has none):

- y opens every gate: h·y ≈ logit(target_prob) for every token, the tokens that fall below
  logit(margin_prob) up-weighted and the fit repeated until none does. The model starts as
  ≈ target_prob × each FFN, for every token, sinks included.
- S_i orders the experts of a token: h·S_i ≈ z_i(h), how much expert i contributes to this token's
  FFN output (log ‖o_i‖, centred over the token's experts, scaled to unit std, clipped to ±2),
  centred over the experts. The sparsity loss, lowering all logits, then closes the experts that
  matter least for each token first, different experts for different tokens, instead of all of
  them together as when every Y_i is the same.
- α is at most `spread`, and as large as keeps every calibration token above the margin: layers
  whose FFN inputs leave little room (in SmolLM2, layers 20-26) get less expert-specific gates.

The sink position (the first token of a window) has FFN inputs far from the others; a few long
windows hold few of them, so `dsmoe.convert.calibration_inputs` adds many short windows.
The README gives the measurements (held-out perplexity, open tokens, spread of k, co-activation).
"""

import math

import torch

SCORE_CLIP = 2.0
RIDGE, EXPERT_RIDGE = 0.5, 2.0  # ridge · tr(HᵀH)/d: the shared gate, the expert-specific directions


@torch.no_grad()
def capture_ffn_inputs(model, input_ids, batch_size=8):
    """Run `model` on `input_ids` (N x T, or a list of such batches) and return each decoder layer's
    FFN inputs (tokens x d, float32)."""
    batches = list(input_ids) if isinstance(input_ids, (list, tuple)) else [input_ids]
    layers = model.model.layers
    captured = [[] for _ in layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda module, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1]).float()))
        for i, layer in enumerate(layers)
    ]
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            for start in range(0, ids.shape[0], batch_size):
                model(ids[start : start + batch_size].to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [torch.cat(chunks) for chunks in captured]


@torch.no_grad()
def expert_scores(mlp, ffn_inputs, n_experts, chunk=2048):
    """z (tokens x n): log ‖o_i‖ of each expert's output, centred per token, scaled to unit std, clipped."""
    weight = mlp.down_proj.weight
    size = weight.shape[1] // n_experts
    down = weight.float().T.reshape(n_experts, size, -1)  # V_iᵀ: n x D/n x d
    logs = []
    for h in ffn_inputs.split(chunk):
        h = h.to(weight.dtype)
        inter = (mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)).float().view(len(h), n_experts, size)
        out = torch.einsum("tne,ned->tnd", inter, down)
        logs.append(out.norm(dim=-1).clamp(min=1e-12).log())
    z = torch.cat(logs)
    z = z - z.mean(-1, keepdim=True)
    return (z / z.std().clamp(min=1e-12)).clamp(-SCORE_CLIP, SCORE_CLIP)


def with_ridge(gram, ridge):
    """HᵀH + ridge · tr(HᵀH)/d · I."""
    return gram + ridge * torch.trace(gram) / len(gram) * torch.eye(len(gram), dtype=gram.dtype)


@torch.no_grad()
def fit_open_gate(h, gram, target, margin, boost=2.0, iterations=50):
    """y (d) with h·y ≈ `target` for every token h (float64 rows of `h`; `gram`: HᵀH with a ridge);
    tokens below `margin` are up-weighted by `boost` and the fit repeated until none is or
    `iterations` run out."""
    gram, rhs = gram.clone(), h.sum(0) * target
    weights = torch.ones(len(h), dtype=h.dtype)
    for _ in range(iterations):
        y = torch.linalg.solve(gram, rhs)
        low = (h @ y) < margin
        if not low.any():
            break
        extra = weights[low] * (boost - 1)
        gram += (h[low] * extra[:, None]).T @ h[low]
        rhs += (h[low] * extra[:, None]).sum(0) * target
        weights[low] *= boost
    return y


@torch.no_grad()
def fit_expert_directions(h, gram, scores):
    """S (d x n) with h·S_i ≈ scores_i (ridge least squares), centred over the experts (Σ_i S_i = 0)."""
    directions = torch.linalg.solve(gram, h.T @ scores.double())
    return directions - directions.mean(1, keepdim=True)


def largest_spread(base, specific, margin, cap):
    """The largest α in [0, cap] with base + α·specific >= min(margin, min(base)) for every token and expert."""
    floor = min(margin, base.min().item())
    lowest = lambda alpha: (base[:, None] + alpha * specific).min().item()
    if lowest(cap) >= floor:
        return cap
    low, high = 0.0, cap
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if lowest(mid) >= floor else (low, mid)
    return low


def logit(p):
    return math.log(p / (1 - p))


@torch.no_grad()
def calibrated_gate_weights(ffn_inputs, n_experts, mlp=None, target_prob=0.95, spread=0.5, margin_prob=0.8):
    """Y (n x d) for one layer from its FFN inputs (tokens x d): every gate open, experts ordered per token.

    Y_i = y + α·S_i: y opens every gate (h·y ≈ logit(target_prob), no token below logit(margin_prob));
    S_i orders the experts of a token by their scores z (`mlp`, the dense SwiGLU MLP, gives them);
    α <= `spread` is as large as keeps every calibration token above the margin. Without `mlp`, or
    with `spread` 0, every expert gets the same gate y."""
    if not 0.5 < target_prob < 1.0:
        raise ValueError(f"target_prob must lie in (0.5, 1) so that gates start open, got {target_prob}")
    if not 0.5 < margin_prob <= target_prob:
        raise ValueError(f"margin_prob must lie in (0.5, target_prob={target_prob}], got {margin_prob}")
    if spread < 0:
        raise ValueError(f"spread must be >= 0, got {spread}")
    margin, h = logit(margin_prob), ffn_inputs.double()
    gram = h.T @ h
    common = fit_open_gate(h, with_ridge(gram, RIDGE), logit(target_prob), margin)
    weights = common.expand(n_experts, -1).clone()
    if mlp is not None and spread > 0:
        directions = fit_expert_directions(h, with_ridge(gram, EXPERT_RIDGE), expert_scores(mlp, ffn_inputs, n_experts))
        alpha = largest_spread(h @ common, h @ directions, margin, spread)
        weights += alpha * directions.T
    return weights.float()
