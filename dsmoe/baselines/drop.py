"""Training-free partition and drop (no router, no training), after DualSparse-MoE; not a paper row.

It looks at the dense FFN's own expert outputs to decide which to drop: every expert is computed, so
its rows (method `drop_oracle`) save no compute. They are the training-free reference at a given
activation, not a bound on what a router could reach: a trained router also changes the weights
(continued pretraining) and may beat it, and a per-token rule that ignores how the kept outputs
add up may do worse than a simple one.

Each dense SwiGLU FFN is split into `n_experts` experts along its intermediate dimension, exactly
as DSMoE splits it (expert i owns units [i*D/n, (i+1)*D/n)); o_i = (act(x W_i) ⊙ x U_i) V_i. Rules:

- "topk" (use this one): per token, keep the `keep_experts` K experts of largest ‖o_i‖₂ (ties: the
  lower index); K = n is the dense FFN, K = 0 is refused;
- "expert": drop expert i when ‖o_i‖₂ / ‖Σ_j o_j‖₂ < threshold. Thresholds must lie below 1/n: where
  the experts add up coherently every ratio is near 1/n, so a threshold at or above it drops the
  whole FFN (issue 28: layers 0, 28, 29 of SmolLM2 at 0.3-0.4 with n = 8, perplexity 2.4e5);
- "cumulative": drop, smallest ‖o_i‖ first, the largest set of experts whose norms sum to less than
  threshold·‖Σ_j o_j‖, which bounds the FFN's relative error per token by the threshold (at most 1:
  by the triangle inequality the ratios sum to at least 1, so no token loses its whole FFN).

The kept outputs are summed with no rescaling, so threshold 0 keeps every expert: the dense FFN
exactly. The norms are computed exactly (one extra down-projection's worth of FLOPs): this baseline
measures quality against activated parameters, not speed; a deployment would need a cheaper proxy.

Activated parameters follow the paper's Table 1 rule (`activated_params`): non-FFN parameters plus
each layer's FFN parameters times its mean fraction of kept experts. `DropRecorder` records them.
"""

import math

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import accounting
from ..convert import check_partitionable
from ..model import check_n_experts, check_swiglu, decoder_layers
from ..names import DROP

RULES = ("expert", "cumulative", "topk")
THRESHOLD_RULES = ("expert", "cumulative")


class PartitionedDropMLP(nn.Module):
    """A dense SwiGLU MLP seen as `n_experts` experts; per token, some are dropped by `rule` (see the module)."""

    def __init__(self, gate_proj, up_proj, down_proj, act_fn, n_experts, threshold=0.0, rule="expert", keep_experts=None):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn
        self.n_experts = n_experts
        self.expert_size = gate_proj.out_features // n_experts
        self.threshold = float(threshold)
        self.rule = check_rule(rule)
        self.keep_experts = n_experts if keep_experts is None else check_keep_experts(keep_experts, n_experts)
        self.last_importance = None  # T x n, ‖o_i‖ / ‖Σ o_j‖ from the latest forward
        self.last_active = None  # bool T x n, the kept experts of the latest forward
        self.routing_stats = None  # set by DropRecorder

    @classmethod
    def from_dense(cls, mlp, n_experts, threshold=0.0, rule="expert", name="mlp", keep_experts=None):
        """Wrap a dense SwiGLU MLP; its Linear modules are reused, not copied."""
        check_swiglu(mlp, name)
        check_n_experts(n_experts, mlp.gate_proj.out_features, f" of {name}")
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn, n_experts, threshold, rule, keep_experts)

    def expert_importance(self, inter):
        """‖o_i‖ / ‖Σ_j o_j‖ per token (T x n) from the intermediate activations (T x D)."""
        w_down = self.down_proj.weight.view(-1, self.n_experts, self.expert_size)  # d x n x e
        expert_out = torch.einsum("tne,dne->tnd", inter.view(-1, self.n_experts, self.expert_size), w_down)
        expert_out = expert_out.to(torch.promote_types(expert_out.dtype, torch.float32))
        total = expert_out.sum(1).norm(dim=-1, keepdim=True)
        return expert_out.norm(dim=-1) / total.clamp(min=torch.finfo(total.dtype).tiny)

    def kept(self, importance):
        """The experts each token keeps (bool T x n) under this layer's rule."""
        if self.rule == "expert":
            return importance >= self.threshold
        if self.rule == "topk":  # ‖o_i‖ is ‖Σ o_j‖ times importance_i: the same order; stable: ties keep the lower index
            order = importance.argsort(dim=-1, descending=True, stable=True)[:, :self.keep_experts]
            return torch.zeros_like(importance, dtype=torch.bool).scatter(-1, order, True)
        ordered, order = importance.sort(dim=-1)  # cumulative: drop the smallest while their sum stays below
        dropped = ordered.cumsum(-1) < self.threshold
        return torch.ones_like(dropped).scatter(-1, order, ~dropped)

    def forward(self, hidden_states):
        inter = self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)
        flat = inter.reshape(-1, inter.shape[-1])
        importance = self.expert_importance(flat)
        active = self.kept(importance)
        self.last_importance, self.last_active = importance, active
        if self.routing_stats is not None:
            self.routing_stats.update(active)
        mask = active.to(inter.dtype).repeat_interleave(self.expert_size, dim=-1).view(inter.shape)
        return self.down_proj(inter * mask)  # threshold 0 or K = n: mask is all ones, the dense FFN bit for bit

    def extra_repr(self):
        setting = f"keep_experts={self.keep_experts}" if self.rule == "topk" else f"threshold={self.threshold}"
        return f"n_experts={self.n_experts}, {setting}, rule={self.rule!r}"


def drop_layers(model):
    """Every PartitionedDropMLP inside `model`, in order."""
    return [m for m in model.modules() if isinstance(m, PartitionedDropMLP)]


def check_threshold(threshold, rule="expert", n_experts=None):
    """A threshold of a threshold rule: >= 0; below 1/n for rule expert, at most 1 for cumulative."""
    if not float(threshold) >= 0.0:
        raise ValueError(f"drop threshold must be a number >= 0, got {threshold}")
    if rule == "expert" and n_experts is not None and float(threshold) >= 1.0 / n_experts:
        raise ValueError(f"drop threshold {threshold} of rule expert is at or above 1/n = 1/{n_experts} = "
                         f"{1.0 / n_experts:.4g}: where the {n_experts} experts add up coherently each ratio "
                         "||o_i|| / ||sum_j o_j|| is near 1/n and the whole FFN would be dropped; use thresholds "
                         "below 1/n, or --rule topk --keep-experts K")
    if rule == "cumulative" and float(threshold) > 1.0:
        raise ValueError(f"drop threshold {threshold} of rule cumulative is above 1 (it bounds the relative error)")


def check_keep_experts(keep_experts, n_experts):
    """K of rule topk: an integer in [1, n]."""
    if isinstance(keep_experts, bool) or int(keep_experts) != keep_experts or not 1 <= keep_experts <= n_experts:
        raise ValueError(f"keep_experts must be an integer in [1, n_experts = {n_experts}], got {keep_experts!r}")
    return int(keep_experts)


def check_rule(rule):
    if rule not in RULES:
        raise ValueError(f"unknown drop rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


def partition_for_drop(model, n_experts, threshold=0.0, rule="expert", keep_experts=None):
    """Replace every decoder MLP of a dense LLaMA-style causal LM by a `PartitionedDropMLP`, in place.

    Rule topk keeps `keep_experts` (default n: dense) experts per token; the others take `threshold`.
    Validates everything before changing anything; returns the model."""
    check_rule(rule)
    check_partitionable(model, n_experts)
    check_threshold(threshold, rule, n_experts)
    if rule == "topk" and float(threshold) != 0.0:
        raise ValueError(f"drop rule topk takes keep_experts, not a threshold (got threshold {threshold})")
    if keep_experts is not None:
        check_keep_experts(keep_experts, n_experts)
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp = PartitionedDropMLP.from_dense(layer.mlp, n_experts, threshold, rule, f"model.layers.{i}.mlp",
                                                  keep_experts)
    return model


def _layers_of(model):
    layers = drop_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PartitionedDropMLP; call partition_for_drop first")
    return layers


def set_threshold(model, threshold):
    """Set the drop threshold of every PartitionedDropMLP in `model` (checked against each layer's rule and n)."""
    layers = _layers_of(model)
    for layer in layers:
        check_threshold(threshold, layer.rule, layer.n_experts)
    for layer in layers:
        layer.threshold = float(threshold)
    return model


def set_keep_experts(model, keep_experts):
    """Set K, the experts each token keeps, of every PartitionedDropMLP in `model` (rule topk)."""
    layers = _layers_of(model)
    for layer in layers:
        check_keep_experts(keep_experts, layer.n_experts)
    for layer in layers:
        layer.keep_experts = int(keep_experts)
    return model


def activated_params(model, mean_active_experts=None):
    """Table 1 count: non-FFN params + each drop layer's FFN params × its mean kept fraction."""
    return accounting.activated_params(model, mean_active_experts, drop_layers(model))


class DropRecorder(accounting.RoutingRecorder):
    """Record kept experts over any number of forward passes (a `dsmoe.RoutingRecorder` over drop layers)."""

    def __init__(self, model):
        layers = drop_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no PartitionedDropMLP to record")
        super().__init__(model, layers)


SETTING_COLUMNS = ["model", "variant", "rule", "threshold", "keep_experts", "activated_params_pct"]  # of attrs["windows"]


def drop_sweep(model, validation, settings, label, batch_size=8, max_sequences=None):
    """One row per setting (a threshold, or K for rule topk): ppl per source and pooled, activated params,
    mean kept experts. Columns: model, variant, rule, threshold (NaN for topk), ppl_<source>..., tokens,
    total_params, activated_params, activated_params_pct, mean_active_experts, keep_experts (NaN but for topk).
    `df.attrs["windows"]`: each setting's per-window NLL as `evaluate_ppl` gives it (source, window, nll,
    tokens), after the setting's `SETTING_COLUMNS`, for paired bootstraps against the trained models."""
    from ..evaluation.perplexity import WINDOW_COLUMNS, evaluate_ppl

    rule = _layers_of(model)[0].rule
    rows, windows = [], []
    for setting in tqdm(settings, desc="drop settings"):
        (set_keep_experts if rule == "topk" else set_threshold)(model, setting)
        with DropRecorder(model) as recorder:
            ppl = evaluate_ppl(model, validation, batch_size, max_sequences, progress=False)
        report = recorder.report()
        row = {"model": label, "variant": DROP, "rule": rule, "threshold": math.nan if rule == "topk" else float(setting)}
        row.update({f"ppl_{r.source}": r.ppl for r in ppl.itertuples()})
        row.update(tokens=int(ppl.loc[ppl.source == "all", "tokens"].iloc[0]), total_params=report["total_params"],
                   activated_params=report["activated_params"], activated_params_pct=report["activated_params_pct"],
                   mean_active_experts=float(np.mean(report["mean_active_experts"])),
                   keep_experts=int(setting) if rule == "topk" else math.nan)
        rows.append(row)
        windows.append(ppl.attrs["windows"].assign(**{column: row[column] for column in SETTING_COLUMNS}))
    df = pd.DataFrame(rows)
    df.attrs["windows"] = pd.concat(windows, ignore_index=True)[SETTING_COLUMNS + WINDOW_COLUMNS]
    return df


__all__ = ["DropRecorder", "PartitionedDropMLP", "activated_params", "drop_layers", "drop_sweep", "partition_for_drop",
           "set_keep_experts", "set_threshold"]
