"""Static pruning baselines at matched activated parameters (paper Tables 1-2), and `prune()`.

- `sparsegpt` (the paper's SparseGPT row): every decoder linear layer, unstructured, with OBS
  reconstruction layer by layer (`sparsegpt.py`).
- `llm_pruner_channel` (the paper's LLM-Pruner-channel row): the hidden size d of the whole model,
  by first-order Taylor importance (`llm_pruner.py`): a narrower model of the same class.
- `llm_pruner_block` (the paper's LLM-Pruner-block row): KV groups and FFN units of every layer but
  the first 4 and last 2, by first-order Taylor importance (`llm_pruner_block.py`): a LLaMA with
  per-layer sizes. Its fraction is of the pruned layers' attention and FFN weights.
- `ffn_channel` (not a paper row): remove the same number of intermediate units from every FFN,
  chosen per layer by first-order Taylor importance: for unit j, Σ |w·∂L/∂w| over row j of
  gate_proj and up_proj and column j of down_proj, with ∂L/∂w the gradient of the LM loss summed
  over the calibration sequences. The result is a narrower dense model (uniform intermediate_size).
  LLM-Pruner's channel mode prunes the hidden size instead (`llm_pruner.py`).
- `wanda` (not a paper row; Wanda on the FFNs only): in every FFN projection, per output row, zero
  the weights with the smallest |W_ij|·‖X_j‖₂, X the projection's input over all calibration tokens
  (gathered in one pass of the unpruned model, not layer by layer). Shapes are unchanged.

Activated parameters follow Table 1: every parameter of the pruned model except zeroed decoder
weights, as a percentage of the unpruned model's total (so a structured pruning's total shrinks with it).
"""

import torch
from tqdm.auto import tqdm

from ..model import check_swiglu, decoder_layers
from ..names import PRUNE_KINDS as KINDS
from ..names import UNSTRUCTURED_PRUNE_KINDS
from .llm_pruner import hidden_params_per_channel, llm_pruner_channel
from .llm_pruner_block import block_prunable_param_count, llm_pruner_block
from .sparsegpt import decoder_linear_param_count, layer_linears, sparsegpt
from .taylor import calibration_gradients

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def check_fraction(fraction):
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"pruning fraction must lie in [0, 1), got {fraction}")
    return float(fraction)


def ffn_mlps(model):
    """The decoder MLPs of a dense LLaMA-style causal LM (checked to be SwiGLU)."""
    mlps = [layer.mlp for layer in decoder_layers(model)]
    for i, mlp in enumerate(mlps):
        check_swiglu(mlp, f"model.layers.{i}.mlp")
    return mlps


def ffn_param_count(model):
    return sum(getattr(mlp, name).weight.numel() for mlp in ffn_mlps(model) for name in PROJECTIONS)


def prunable_param_count(model, kind, block_layers=None):
    """The parameters that pruning `kind` removes a fraction of: every decoder linear (sparsegpt), every
    parameter carried by a hidden channel (llm_pruner_channel), the pruned layers' attention and FFN
    weights (llm_pruner_block) or the FFNs."""
    if kind == "llm_pruner_block":
        return block_prunable_param_count(model, block_layers)
    if kind == "llm_pruner_channel":
        return hidden_params_per_channel(model) * model.config.hidden_size
    return decoder_linear_param_count(model) if kind == "sparsegpt" else ffn_param_count(model)


def fraction_for_activated_pct(model, pct, kind="ffn_channel", block_layers=None):
    """The fraction of `kind`'s prunable params to remove so that `pct` % of `model`'s params stay."""
    total, prunable = sum(p.numel() for p in model.parameters()), prunable_param_count(model, kind, block_layers)
    if not 0.0 < float(pct) <= 100.0:
        raise ValueError(f"activated params percentage must lie in (0, 100], got {pct}")
    fraction = (1.0 - float(pct) / 100.0) * total / prunable
    if fraction >= 1.0:
        floor = 100.0 * (total - prunable) / total
        raise ValueError(f"cannot reach {pct}% activated params by {kind} pruning: removing all it prunes leaves {floor:.2f}%")
    return fraction


def pruned_activated_params(model, reference_total):
    """Table 1 count of a pruned model: its parameters minus zeroed decoder linear weights, vs `reference_total`."""
    total = sum(p.numel() for p in model.parameters())
    zeros = sum(int((m.weight == 0).sum()) for layer in decoder_layers(model) for m in layer_linears(layer).values())
    activated = total - zeros
    return {"total_params": total, "reference_total_params": reference_total,
            "activated_params": float(activated), "activated_params_pct": 100.0 * activated / reference_total}


def _batches(calibration, batch_size, desc):
    return tqdm(calibration.split(batch_size), desc=desc, leave=False)


def taylor_channel_importance(model, calibration, batch_size=1):
    """First-order Taylor importance of every intermediate unit: a list (one per layer) of D-vectors."""
    mlps = ffn_mlps(model)
    weights = [getattr(mlp, name).weight for mlp in mlps for name in PROJECTIONS]
    scores = []
    with calibration_gradients(model, calibration, weights, batch_size):
        for mlp in mlps:
            gate, up, down = (getattr(mlp, name).weight for name in PROJECTIONS)
            score = (gate * gate.grad).abs().sum(1) + (up * up.grad).abs().sum(1) + (down * down.grad).abs().sum(0)
            scores.append(score.detach().double())
    return scores


def prune_channels(model, fraction, importance):
    """Remove round(fraction·D) least important intermediate units from every FFN, in place.

    Returns the removed unit indices per layer (sorted)."""
    fraction = check_fraction(fraction)
    mlps = ffn_mlps(model)
    widths = {mlp.gate_proj.out_features for mlp in mlps}
    if len(widths) != 1:
        raise ValueError(f"channel pruning needs one intermediate size across layers, got {sorted(widths)}")
    width = widths.pop()
    n_remove = int(round(fraction * width))
    if n_remove >= width:
        raise ValueError(f"fraction {fraction} would remove all {width} intermediate units")
    removed = []
    for mlp, score in zip(mlps, importance):
        drop = torch.sort(torch.argsort(score, stable=True)[:n_remove]).values
        keep = torch.ones(width, dtype=torch.bool)
        keep[drop] = False
        for name in ("gate_proj", "up_proj"):
            setattr(mlp, name, _sliced_linear(getattr(mlp, name), rows=keep))
        mlp.down_proj = _sliced_linear(mlp.down_proj, cols=keep)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width - n_remove
        removed.append(drop)
    model.config.intermediate_size = width - n_remove
    return removed


def _sliced_linear(linear, rows=None, cols=None):
    weight = linear.weight.detach()
    weight = weight[rows] if rows is not None else weight[:, cols]
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    return out


def wanda_input_norms(model, calibration, batch_size=1):
    """‖X_j‖₂ over all calibration tokens of the input of every FFN projection: {(layer, name): vector}."""
    sums, hooks = {}, []

    def hook(key):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
        return accumulate

    for i, mlp in enumerate(ffn_mlps(model)):
        for name in PROJECTIONS:
            hooks.append(getattr(mlp, name).register_forward_pre_hook(hook((i, name))))
    try:
        with torch.no_grad():
            for batch in _batches(calibration, batch_size, "wanda activations"):
                model(input_ids=batch)
    finally:
        for handle in hooks:
            handle.remove()
    return {key: value.sqrt() for key, value in sums.items()}


def prune_wanda(model, fraction, input_norms):
    """Per output row of every FFN projection, zero the round(fraction·in) weights with the
    smallest |W|·‖X‖, in place. Returns the boolean masks of zeroed weights {(layer, name): mask}."""
    fraction = check_fraction(fraction)
    masks = {}
    for i, mlp in enumerate(ffn_mlps(model)):
        for name in PROJECTIONS:
            weight = getattr(mlp, name).weight
            k = int(round(fraction * weight.shape[1]))
            mask = torch.zeros_like(weight, dtype=torch.bool)
            if k:
                score = weight.detach().abs().double() * input_norms[(i, name)].to(weight.device)
                mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
            with torch.no_grad():
                weight.masked_fill_(mask, 0.0)
            masks[(i, name)] = mask
    return masks


def prune(model, kind, fraction, calibration, batch_size=1, block_layers=None):
    """Prune a dense causal LM; returns `(pruned_model, summary)`, the summary written as pruning.json.

    The model is pruned in place, except for the llm_pruner kinds, which build a new model.
    `block_layers` (start, end): the layers llm_pruner_block prunes (default: see `llm_pruner_block.py`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown pruning kind {kind!r}; choose one of {', '.join(KINDS)}")
    fraction = check_fraction(fraction)
    reference_total = sum(p.numel() for p in model.parameters())
    if kind == "llm_pruner_channel":
        hidden = model.config.hidden_size
        model, removed = llm_pruner_channel(model, int(round(fraction * hidden)), calibration, batch_size)
        detail = {"importance": "first-order taylor |w*dL/dw| summed over the hidden-channel group (param_first, sum)",
                  "removed_hidden_channels": len(removed), "hidden_size": model.config.hidden_size}
    elif kind == "llm_pruner_block":
        model, detail = llm_pruner_block(model, fraction, calibration, block_layers, batch_size)
        detail = {"importance": "first-order taylor |w*dL/dw| summed over each KV group and FFN unit (param_first, sum), "
                                "ranked per layer", **detail}
    elif kind == "sparsegpt":
        masks = sparsegpt(model, fraction, calibration, batch_size)
        zeros = sum(int(m.sum()) for m in masks.values())
        detail = {"importance": "sparsegpt OBS w^2/[H^-1]_jj^2, blocks of 128, 1% damping, sequential layers",
                  "zeroed_decoder_linear_fraction": zeros / sum(m.numel() for m in masks.values())}
    elif kind == "ffn_channel":
        removed = prune_channels(model, fraction, taylor_channel_importance(model, calibration, batch_size))
        detail = {"importance": "first-order taylor |w*dL/dw| over gate/up rows and down column",
                  "removed_units_per_layer": len(removed[0]) if removed else 0,
                  "intermediate_size": model.config.intermediate_size}
    elif kind == "wanda":
        masks = prune_wanda(model, fraction, wanda_input_norms(model, calibration, batch_size))
        zeros = sum(int(m.sum()) for m in masks.values())
        detail = {"importance": "wanda |W|*||X|| per output row", "zeroed_ffn_fraction": zeros / sum(m.numel() for m in masks.values())}
    return model, {"kind": kind, "fraction": fraction, "calibration_sequences": len(calibration),
                   "calibration_seq_len": calibration.shape[1], **detail, **pruned_activated_params(model, reference_total)}


__all__ = ["KINDS", "UNSTRUCTURED_PRUNE_KINDS", "check_fraction", "prunable_param_count", "fraction_for_activated_pct", "prune", "prune_channels",
           "prune_wanda", "pruned_activated_params", "taylor_channel_importance", "wanda_input_norms"]
