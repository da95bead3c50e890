"""One optimizer step: the loss of each variant (Eq. 17-19), gradient accumulation, the update.

Step statistics are a vector `[loss, lm, sparsity, balance, per-layer active experts...]`, averaged
over the micro-batches and the processes; train_log.csv rows are their mean over a log interval.
"""

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..data import model_inputs
from ..losses import cv_balance_loss, load_balancing_loss, sparsity_loss
from ..model import TOPK_VARIANTS, VARIANTS, dsmoe_layers
from ..names import UNSTRUCTURED_PRUNE_KINDS

SPARSITY_VARIANTS = ("dsmoe", "no_ste", "no_gx")  # trained with λ·sparsity loss; the top-k variants with load balancing


class TrainingDiverged(ValueError):
    pass


def apply_variant(model, variant):
    """Set the training forward of every DSMoE layer to `variant`; `None` keeps the model's own.

    Returns the variant trained: `dense` for a model without DSMoE layers (or when asked)."""
    layers = dsmoe_layers(model)
    if variant is None:
        return model.config.variant if layers else "dense"
    if variant == "dense":
        return "dense"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of dense, {', '.join(VARIANTS)}")
    if not layers:
        raise ValueError(f"variant {variant!r} needs a DSMoE model but the init model is dense: "
                         "convert it first (dsmoe convert) or train it with --variant dense")
    if variant in TOPK_VARIANTS and not 1 <= model.config.num_experts_per_tok <= model.config.n_experts:
        raise ValueError(f"{variant} needs 1 <= num_experts_per_tok <= n_experts, got {model.config.num_experts_per_tok}")
    if (variant == "topk") != (model.config.variant == "topk"):
        raise ValueError(f"cannot train a {model.config.variant} model as {variant}: the topk variant has its own "
                         "gate (LLaMA-MoE's noisy MLP gate); convert with --variant topk instead")
    for layer in layers:
        layer.variant = variant
    model.config.variant = variant
    return variant


def param_groups(model, weight_decay, gate_lr=None):
    """AdamW groups: weight decay on matrices only (nanoGPT); the gates apart when `gate_lr` is set."""
    decay, no_decay, gates = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if gate_lr is not None and is_gate_parameter(name):
            gates.append(param)
        else:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if gates:
        groups.append({"params": gates, "weight_decay": weight_decay, "lr": gate_lr})
    return [group for group in groups if group["params"]]


def pruning_masks(model, init):
    """Masks that keep an unstructured-pruned (SparseGPT, Wanda) init's zeros at zero through training.

    `dsmoe baseline prune --kind sparsegpt|wanda` writes pruning.json beside the weights; the decoder
    linear weights that are zero at init stay zero, so the trained model keeps its matched activated params."""
    info = Path(init) / "pruning.json"
    if not info.is_file() or json.loads(info.read_text()).get("kind") not in UNSTRUCTURED_PRUNE_KINDS:
        return {}
    suffixes = tuple(f"{name}.weight" for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return {name: param != 0 for name, param in model.named_parameters() if name.endswith(suffixes)}


def auxiliary_losses(model, variant, token_mask=None):
    """`(sparsity, load_balancing)` of the latest forward; None where the variant has no such term.

    `token_mask`: the attention mask of a padded batch (truncate mode), so padding adds no term."""
    if variant == "dense":
        return None, None
    if variant == "topk":
        return None, cv_balance_loss(model)
    if variant == "topk_switch":
        return None, load_balancing_loss(model, token_mask)
    return sparsity_loss(model, token_mask), None


def trailing_padding_only(input_ids):
    """Whether each row's PAD (truncate mode) is one run at its end; on a CPU tensor: no device sync."""
    from ..data import PAD

    if input_ids.device.type != "cpu":
        return False
    pad = input_ids == PAD
    return bool((pad[:, 1:] >= pad[:, :-1]).all())  # once padding, padding to the end


def micro_batch_loss(model, input_ids, variant, lam, balance_coef, device=None, distill=None):
    """Forward one micro-batch: the loss to minimise and its terms `[loss, lm, sparsity, balance]` (detached),
    then the distillation term when `distill` (distill.Distill) is given.

    `input_ids` on the CPU and a `device`: the padding test runs on the host (no device sync), the
    inputs are then copied (non-blocking from pinned memory)."""
    inputs = model_inputs(input_ids)  # labels; a mask for truncate-mode padding
    if device is not None:
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    token_mask = inputs.get("attention_mask")
    if token_mask is not None and trailing_padding_only(input_ids):
        # causal attention alone keeps every real token from the padding after it: no mask, so attention
        # takes its causal (flash) kernel; padding stays out of the loss (labels) and of the auxiliary terms
        inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
    output = model(**inputs, use_cache=False)
    lm_loss = output.loss
    sparse, balance = auxiliary_losses(model, variant, token_mask)
    sparse = lm_loss.new_zeros(()) if sparse is None else sparse
    balance = lm_loss.new_zeros(()) if balance is None else balance
    loss = lm_loss + lam * sparse + balance_coef * balance
    terms = [lm_loss, sparse, balance]
    if distill is not None:
        kd = distill.term(output.logits, {**inputs, "attention_mask": token_mask})
        loss = loss + distill.weight * kd
        terms.append(kd)
    return loss, torch.stack([loss, *terms]).detach().float()


def mean_active_experts(layers):
    """Per-layer mean number of active experts per token in the latest forward.

    For no_gx, whose training forward runs every expert, count the experts with σ > τ, which
    inference would run."""
    counts = []
    for layer in layers:
        active = layer.last_gate_probs > layer.tau if layer.variant == "no_gx" else layer.last_active
        counts.append(active.float().sum(-1).mean())
    return torch.stack(counts).detach() if counts else torch.zeros(0)


def active_fraction(per_layer_active, layers):
    """Mean over layers of the fraction of experts active per token (1.0 for a dense model)."""
    if not layers:
        return 1.0
    return float(np.mean([k / layer.n_experts for k, layer in zip(per_layer_active, layers)]))


def accumulate_gradients(accelerator, model, input_ids, accumulation, layers, variant, lam, balance_coef, distill=None):
    """Forward and backward this process's batch in `accumulation` micro-batches; return the step statistics
    (with `distill`, its term appended after the per-layer active experts).

    Gradients are synchronised across processes on the last micro-batch only."""
    step_stats = torch.zeros(4 + len(layers) + (distill is not None), device=accelerator.device)
    for k, ids in enumerate(input_ids.chunk(accumulation)):  # on the host: see micro_batch_loss
        sync = k == accumulation - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            loss, terms = micro_batch_loss(model, ids, variant, lam, balance_coef, accelerator.device, distill)
            accelerator.backward(loss / accumulation)
        step_stats += torch.cat([terms[:4], mean_active_experts(layers).to(terms.device), terms[4:]]) / accumulation
    return accelerator.reduce(step_stats, "mean")


def is_gate_parameter(name):
    """A router parameter: DSMoE's gate Y, or LLaMA-MoE's noisy gate (named as in `param_groups`)."""
    return ".mlp.gate." in name


def gate_only_gradients(model):
    """Gate warm-up (`train.gate_warmup_steps`): drop every gradient but the gates', so the optimizer
    leaves the other parameters untouched (AdamW skips a parameter without a gradient: no decay either)."""
    for name, param in model.named_parameters():
        if not is_gate_parameter(name):
            param.grad = None


def clip_gradients(accelerator, model, grad_clip):
    """Clip the gradients to norm `grad_clip` (0: no clipping); return their total norm before clipping.

    Without clipping the norm comes from the same call with an infinite bound (it scales by exactly 1)."""
    return accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)


def optimizer_step(optimizer, scheduler, masked_params):
    """Update, re-zero a pruned init's weights, advance the schedule."""
    optimizer.step()
    with torch.no_grad():
        for param, mask in masked_params:
            param.mul_(mask)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

