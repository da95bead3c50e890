"""LLM-Pruner's channel mode (Ma et al., 2023): prune the hidden size d of the whole model.

The hidden channels form one coupled group through the residual stream: column c of the token
embedding (and of an untied lm_head), entry c of every RMSNorm weight, input column c of q, k,
v, gate and up, output row c of o and down. Channel c's importance is LLM-Pruner's first-order
Taylor score (`--taylor param_first`, group reduction `sum`): Σ |w · ∂L/∂w| over every weight of the
group at channel c, ∂L/∂w the gradient of the LM loss summed over the calibration sequences. The
least important channels are removed everywhere; attention heads, head_dim and the FFN width D
stay, so the result is a plain, narrower model of the same class (config `hidden_size` = d',
`head_dim` kept explicit), which `AutoModelForCausalLM` loads. RMSNorm then normalises over the d'
kept channels, as in LLM-Pruner. One deviation: transformers' LlamaConfig (5.x) refuses a hidden
size that is not a multiple of num_attention_heads, even with head_dim explicit, so d' is rounded
to the nearest such multiple (LLaMA-3.2-1B, 32 heads: the paper's d = 1215 becomes 1216; SmolLM2,
9 heads: steps of 9 channels).

Written by hand rather than with torch-pruning (the dependency-graph library LLM-Pruner is built
on): for a LLaMA-style model the group is fixed and known (the list above), so slicing the state
dict into a freshly built config is shorter than tracing the model, and gives a model that saves
and reloads with plain transformers. LLM-Pruner's block mode (per-layer heads and FFN channels) is
`llm_pruner_block.py`.
"""

import torch

from ..model import decoder_layers
from .taylor import calibration_gradients

INPUT_SIDE = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
OUTPUT_SIDE = ("o_proj.weight", "down_proj.weight")


def hidden_axis(name, shape, hidden):
    """The axis of parameter `name` that indexes hidden channels, or None; raises on an unknown coupling."""
    if name.endswith(("embed_tokens.weight", "lm_head.weight")) or name.endswith(INPUT_SIDE):
        axis = 1
    elif name.endswith("norm.weight") or name.endswith(OUTPUT_SIDE):
        axis = 0
    elif hidden not in shape:
        return None
    else:
        raise TypeError(f"parameter {name!r} {tuple(shape)} has a hidden-size axis that LLM-Pruner channel "
                        "pruning does not know: only LLaMA-style models without biases are supported")
    if shape[axis] != hidden:
        raise TypeError(f"parameter {name!r} {tuple(shape)}: expected the hidden size {hidden} on axis {axis}")
    return axis


def hidden_params_per_channel(model):
    """Parameters that one hidden channel carries (every parameter of a LLaMA-style model scales with d)."""
    hidden = model.config.hidden_size
    return sum(p.numel() // hidden for name, p in model.named_parameters()
               if hidden_axis(name, p.shape, hidden) is not None)


def hidden_channel_importance(model, calibration, batch_size=1):
    """First-order Taylor importance of every hidden channel (a d-vector, float64)."""
    hidden = model.config.hidden_size
    coupled = [(p, hidden_axis(name, p.shape, hidden)) for name, p in model.named_parameters()]
    coupled = [(p, axis) for p, axis in coupled if axis is not None]
    score = torch.zeros(hidden, dtype=torch.float64)
    with calibration_gradients(model, calibration, [p for p, _ in coupled], batch_size):
        for p, axis in coupled:
            contribution = (p * p.grad).abs().double()
            score += contribution.sum(1 - axis) if contribution.dim() == 2 else contribution
    return score


def prune_hidden(model, keep):
    """A new model of the same class with only the hidden channels `keep` (sorted indices)."""
    config = model.config
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    state = {}
    for name, tensor in model.state_dict().items():
        axis = hidden_axis(name, tensor.shape, hidden)
        state[name] = tensor if axis is None else tensor.index_select(axis, keep.to(tensor.device))
    new_config = type(config).from_dict({**config.to_dict(), "hidden_size": len(keep), "head_dim": head_dim})
    new_config._attn_implementation = config._attn_implementation
    weight = next(model.parameters())
    pruned = type(model)(new_config).to(device=weight.device, dtype=weight.dtype)  # built on CPU: RoPE buffers need data
    pruned.load_state_dict(state, strict=True)
    if getattr(new_config, "tie_word_embeddings", False):
        pruned.tie_weights()
    pruned.generation_config = model.generation_config
    return pruned.to(weight.dtype).train(model.training)


def llm_pruner_channel(model, n_remove, calibration, batch_size=1):
    """LLM-Pruner channel pruning: remove the `n_remove` least important hidden channels, rounded so
    that the kept ones are a multiple of num_attention_heads. Returns `(pruned_model, removed_indices)`."""
    hidden, heads = model.config.hidden_size, model.config.num_attention_heads
    decoder_layers(model)
    if not 0 <= n_remove < hidden:
        raise ValueError(f"cannot remove {n_remove} of {hidden} hidden channels")
    n_remove = hidden - max(heads, int(round((hidden - n_remove) / heads)) * heads)
    score = hidden_channel_importance(model, calibration, batch_size)
    removed = torch.sort(torch.argsort(score, stable=True)[:n_remove]).values
    keep = torch.ones(hidden, dtype=torch.bool)
    keep[removed] = False
    return prune_hidden(model, torch.nonzero(keep).flatten()), removed


__all__ = ["hidden_axis", "hidden_channel_importance", "hidden_params_per_channel", "llm_pruner_channel", "prune_hidden"]
