"""LLM-Pruner's block mode (Ma et al., 2023): per decoder layer, prune attention heads and FFN units.

- Layers: only the layers in `[start, end)` are pruned; the others stay whole. LLM-Pruner's LLaMA
  scripts prune layers 4..29 of 32 (`--block_*_layer_start 4 --block_*_layer_end 30`), and the
  paper's Table 1 rows fit exactly that rule, first 4 and last 2 layers whole: LLaMA-7B's 3.94B and
  average D = 6256.5 are layers 4..29 with 17 of 32 heads removed and D' = 5160; LLaMA-1B's 735M and
  D = 3896.4 are layers 4..13 with 6 of 8 KV groups removed and D' = 1319 (recounted in
  tests/test_llm_pruner_block.py). So the default keeps the first 4 and the last 2 layers (models of
  6 layers or fewer: the first and the last); `block_layers` overrides it.
- Attention, with grouped-query attention: whole KV groups are removed, a group being one key/value
  head with the query heads that share it (rows of q, k, v; columns of o). The q heads within a
  group could be pruned instead, but LLaMA's attention needs the same number of q heads per KV head,
  so that would only move in steps of one q head per group (SmolLM2: 3 of 9 q heads at a time, the
  same step as a whole group) and never removes k/v; removing whole groups is the coupled group of
  torch-pruning's dependency graph under `repeat_kv`, and it fits the paper's LLaMA-1B count above.
  Without GQA a group is one head, as in LLM-Pruner's LLaMA-1/2 runs.
- FFN: intermediate unit j of a layer couples row j of gate and up with column j of down.
- Importance: LLM-Pruner's `--taylor param_first`, group reduction `sum`: Σ |w · ∂L/∂w| over every
  weight of the group, ∂L/∂w the gradient of the LM loss summed over the calibration sequences.
  Ranked within each layer (LLM-Pruner's default, not `--global_pruning`).
- Size: as LLM-Pruner, one ratio r for every pruned layer and for heads and units alike: each pruned
  layer loses round(r · n_kv) KV groups (at least one kept); then the FFN units removed are chosen so
  that the parameter count meets the target within one unit (3·d parameters), spread evenly over the
  pruned layers (counts differ by at most one, the lower layers losing the extra units).

Layers thus differ in heads and FFN width, which transformers' LlamaConfig cannot express: the
result is a `PrunedLlamaForCausalLM` (`dsmoe.model`), a LLaMA with per-layer sizes that saves its
config and modeling files beside the weights (`AutoModelForCausalLM`, `trust_remote_code=True`
without dsmoe). Uniform per-layer sizes would have had to prune the first and last layers too.
Written by hand rather than with torch-pruning, for the reasons given in `llm_pruner.py`.
"""

import torch

from ..model import PrunedLlamaConfig, PrunedLlamaForCausalLM, check_swiglu, decoder_layers
from .taylor import calibration_gradients

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


def default_block_layers(n_layers):
    """The pruned layers `[start, end)`: all but the first 4 and last 2 (6 layers or fewer: the first and last)."""
    return (4, n_layers - 2) if n_layers > 6 else (1, n_layers - 1)


def geometry(model):
    """(hidden, q heads, kv heads, head_dim, FFN width) of a dense LLaMA; raises for anything else."""
    config = model.config
    if config.model_type != "llama":
        raise TypeError(f"LLM-Pruner block mode takes a dense LLaMA (model_type 'llama'), got {config.model_type!r}")
    for i, layer in enumerate(decoder_layers(model)):
        check_swiglu(layer.mlp, f"model.layers.{i}.mlp")
        if any(getattr(layer.self_attn, name).bias is not None for name in ATTENTION):
            raise TypeError(f"model.layers.{i}.self_attn has biases: LLM-Pruner block mode supports bias-free LLaMA")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim, config.intermediate_size


def block_layer_range(model, block_layers=None):
    n_layers = len(decoder_layers(model))
    start, end = default_block_layers(n_layers) if block_layers is None else map(int, block_layers)
    if not 0 <= start < end <= n_layers:
        raise ValueError(f"block layers [{start}, {end}) must be a non-empty range of the {n_layers} decoder layers")
    return range(start, end)


def unit_params(model):
    """Parameters of one KV group (its k/v heads and q heads, q/k/v rows and o columns) and of one FFN unit."""
    hidden, heads, kv_heads, head_dim, _ = geometry(model)
    return hidden * head_dim * 2 * (heads // kv_heads + 1), 3 * hidden


def block_prunable_param_count(model, block_layers=None):
    """Attention and FFN weights of the pruned layers."""
    _, _, kv_heads, _, width = geometry(model)
    group, unit = unit_params(model)
    return len(block_layer_range(model, block_layers)) * (kv_heads * group + width * unit)


def block_removal(model, fraction, block_layers=None):
    """(KV groups removed per pruned layer, FFN units removed over all pruned layers) for removing
    `fraction` of the prunable parameters: groups as near r·n_kv as the FFN can make up the rest."""
    _, _, kv_heads, _, width = geometry(model)
    group, unit = unit_params(model)
    n_layers = len(block_layer_range(model, block_layers))
    target = fraction * block_prunable_param_count(model, block_layers)
    for groups in sorted(range(kv_heads), key=lambda g: (abs(g - fraction * kv_heads), g)):
        units = int(round((target - n_layers * groups * group) / unit))
        if 0 <= units <= n_layers * (width - 1):
            return groups, units
    raise ValueError(f"cannot remove {fraction:.3f} of the pruned layers' parameters while keeping a head and a unit per layer")


def block_importance(model, calibration, block_layers=None, batch_size=1):
    """First-order Taylor importance per pruned layer: {layer: (KV-group scores, FFN-unit scores)}, float64."""
    _, heads, kv_heads, head_dim, _ = geometry(model)
    layers = {i: decoder_layers(model)[i] for i in block_layer_range(model, block_layers)}
    weights = [getattr(layer.self_attn, n).weight for layer in layers.values() for n in ATTENTION]
    weights += [getattr(layer.mlp, n).weight for layer in layers.values() for n in FFN]
    taylor = lambda module, name: (getattr(module, name).weight * getattr(module, name).weight.grad).abs().double()
    scores = {}
    with calibration_gradients(model, calibration, weights, batch_size):
        for i, layer in layers.items():
            attn, mlp = layer.self_attn, layer.mlp
            groups = sum(taylor(attn, n).reshape(kv_heads, -1).sum(1) for n in ("q_proj", "k_proj", "v_proj"))
            groups = groups + taylor(attn, "o_proj").reshape(-1, kv_heads, heads // kv_heads * head_dim).sum((0, 2))
            units = taylor(mlp, "gate_proj").sum(1) + taylor(mlp, "up_proj").sum(1) + taylor(mlp, "down_proj").sum(0)
            scores[i] = (groups.detach(), units.detach())
    return scores


def kept_indices(score, n_remove):
    """Sorted indices of the entries kept when the `n_remove` smallest scores are removed."""
    keep = torch.ones(len(score), dtype=torch.bool)
    keep[torch.argsort(score, stable=True)[:n_remove]] = False
    return torch.nonzero(keep).flatten()


def prune_blocks(model, kept):
    """A PrunedLlamaForCausalLM with, in each layer i of `kept`, only the KV groups and FFN units
    `kept[i] = (group indices, unit indices)` (sorted); other layers are copied whole."""
    hidden, heads, kv_heads, head_dim, width = geometry(model)
    n_rep, n_layers = heads // kv_heads, len(decoder_layers(model))
    sizes = {"layer_num_attention_heads": [heads] * n_layers, "layer_num_key_value_heads": [kv_heads] * n_layers,
             "layer_intermediate_sizes": [width] * n_layers}
    state = model.state_dict()
    for i, (groups, units) in kept.items():
        kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
        q_rows = (groups[:, None] * n_rep * head_dim + torch.arange(n_rep * head_dim)).flatten()
        prefix = f"model.layers.{i}."
        for name, axis, index in (("self_attn.q_proj", 0, q_rows), ("self_attn.k_proj", 0, kv_rows),
                                  ("self_attn.v_proj", 0, kv_rows), ("self_attn.o_proj", 1, q_rows),
                                  ("mlp.gate_proj", 0, units), ("mlp.up_proj", 0, units), ("mlp.down_proj", 1, units)):
            key = f"{prefix}{name}.weight"
            state[key] = state[key].index_select(axis, index.to(state[key].device))
        sizes["layer_num_attention_heads"][i] = len(groups) * n_rep
        sizes["layer_num_key_value_heads"][i] = len(groups)
        sizes["layer_intermediate_sizes"][i] = len(units)
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    new_config = PrunedLlamaConfig.from_dict({**config, "head_dim": head_dim, **sizes})
    new_config._attn_implementation = model.config._attn_implementation
    weight = next(model.parameters())
    pruned = PrunedLlamaForCausalLM(new_config).to(device=weight.device, dtype=weight.dtype)
    pruned.load_state_dict(state, strict=True)
    if getattr(new_config, "tie_word_embeddings", False):
        pruned.tie_weights()
    pruned.generation_config = model.generation_config
    return pruned.to(weight.dtype).train(model.training)


def llm_pruner_block(model, fraction, calibration, block_layers=None, batch_size=1):
    """LLM-Pruner block pruning of `fraction` of the pruned layers' attention and FFN weights.

    Returns `(pruned_model, detail)`, detail being the layers pruned and their sizes."""
    layers = block_layer_range(model, block_layers)
    _, _, kv_heads, _, width = geometry(model)
    groups, units = block_removal(model, fraction, block_layers)
    scores = block_importance(model, calibration, block_layers, batch_size)
    base, extra = divmod(units, len(layers))
    kept = {i: (kept_indices(scores[i][0], groups), kept_indices(scores[i][1], base + (k < extra)))
            for k, i in enumerate(layers)}
    pruned = prune_blocks(model, kept)
    config = pruned.config
    detail = {"pruned_layers": [layers.start, layers.stop], "removed_kv_groups_per_layer": groups,
              "removed_ffn_units": units, "layer_num_attention_heads": config.layer_num_attention_heads,
              "layer_num_key_value_heads": config.layer_num_key_value_heads,
              "layer_intermediate_sizes": config.layer_intermediate_sizes,
              "mean_intermediate_size": sum(config.layer_intermediate_sizes) / len(config.layer_intermediate_sizes)}
    return pruned, detail


__all__ = ["block_importance", "block_prunable_param_count", "block_removal", "default_block_layers",
           "llm_pruner_block", "prune_blocks"]
