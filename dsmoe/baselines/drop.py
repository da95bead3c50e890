"""Training-free partition and drop (no router, no training), after DualSparse-MoE; not a paper row.

It is an oracle on the dense FFN: it computes every expert's output to decide which to drop, so
its rows (method `drop_oracle`) bound what a router could reach at no saving in compute.

Each dense SwiGLU FFN is split into `n_experts` experts along its intermediate dimension, exactly
as DSMoE splits it (expert i owns units [i*D/n, (i+1)*D/n)). Per token, expert i is dropped when

    importance_i = ‖o_i‖₂ / ‖Σ_j o_j‖₂  <  threshold,    o_i = (act(x W_i) ⊙ x U_i) V_i,

i.e. when its output is small relative to the full FFN output (rule "expert", the default). Rule
"cumulative" instead drops, smallest ‖o_i‖ first, the largest set of experts whose norms sum to less
than threshold·‖Σ_j o_j‖, which bounds the FFN's relative error per token by the threshold. The kept
outputs are summed with no rescaling, so threshold 0 keeps every expert: the dense FFN exactly. The norms are computed
exactly (one extra down-projection's worth of FLOPs): this baseline measures quality against
activated parameters, not speed; a deployment would need a cheaper proxy.

Activated parameters follow the paper's Table 1 rule (`activated_params`): non-FFN parameters plus
each layer's FFN parameters times its mean fraction of kept experts. `DropRecorder` records them.
"""

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import accounting
from ..convert import check_partitionable
from ..model import check_n_experts, check_swiglu, decoder_layers
from ..names import DROP

RULES = ("expert", "cumulative")


class PartitionedDropMLP(nn.Module):
    """A dense SwiGLU MLP seen as `n_experts` experts; per token, experts below `threshold` are dropped."""

    def __init__(self, gate_proj, up_proj, down_proj, act_fn, n_experts, threshold=0.0, rule="expert"):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn
        self.n_experts = n_experts
        self.expert_size = gate_proj.out_features // n_experts
        self.threshold = float(threshold)
        self.rule = check_rule(rule)
        self.last_importance = None  # T x n, ‖o_i‖ / ‖Σ o_j‖ from the latest forward
        self.last_active = None  # bool T x n, the kept experts of the latest forward
        self.routing_stats = None  # set by DropRecorder

    @classmethod
    def from_dense(cls, mlp, n_experts, threshold=0.0, rule="expert", name="mlp"):
        """Wrap a dense SwiGLU MLP; its Linear modules are reused, not copied."""
        check_swiglu(mlp, name)
        check_n_experts(n_experts, mlp.gate_proj.out_features, f" of {name}")
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn, n_experts, threshold, rule)

    def expert_importance(self, inter):
        """‖o_i‖ / ‖Σ_j o_j‖ per token (T x n) from the intermediate activations (T x D)."""
        w_down = self.down_proj.weight.view(-1, self.n_experts, self.expert_size)  # d x n x e
        expert_out = torch.einsum("tne,dne->tnd", inter.view(-1, self.n_experts, self.expert_size), w_down).float()
        total = expert_out.sum(1).norm(dim=-1, keepdim=True)
        return expert_out.norm(dim=-1) / total.clamp(min=torch.finfo(total.dtype).tiny)

    def forward(self, hidden_states):
        inter = self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)
        flat = inter.reshape(-1, inter.shape[-1])
        importance = self.expert_importance(flat)
        if self.rule == "expert":
            active = importance >= self.threshold
        else:  # drop the smallest experts while their importances sum to less than the threshold
            ordered, order = importance.sort(dim=-1)
            dropped = ordered.cumsum(-1) < self.threshold
            active = torch.ones_like(dropped).scatter(-1, order, ~dropped)
        self.last_importance, self.last_active = importance, active
        if self.routing_stats is not None:
            self.routing_stats.update(active)
        mask = active.to(inter.dtype).repeat_interleave(self.expert_size, dim=-1).view(inter.shape)
        return self.down_proj(inter * mask)  # threshold 0: mask is all ones, the dense FFN bit for bit

    def extra_repr(self):
        return f"n_experts={self.n_experts}, threshold={self.threshold}, rule={self.rule!r}"


def drop_layers(model):
    """Every PartitionedDropMLP inside `model`, in order."""
    return [m for m in model.modules() if isinstance(m, PartitionedDropMLP)]


def check_threshold(threshold):
    if not float(threshold) >= 0.0:
        raise ValueError(f"drop threshold must be a number >= 0, got {threshold}")


def check_rule(rule):
    if rule not in RULES:
        raise ValueError(f"unknown drop rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


def partition_for_drop(model, n_experts, threshold=0.0, rule="expert"):
    """Replace every decoder MLP of a dense LLaMA-style causal LM by a `PartitionedDropMLP`, in place.

    Validates everything before changing anything; returns the model."""
    check_threshold(threshold)
    check_rule(rule)
    check_partitionable(model, n_experts)
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp = PartitionedDropMLP.from_dense(layer.mlp, n_experts, threshold, rule, f"model.layers.{i}.mlp")
    return model


def set_threshold(model, threshold):
    """Set the drop threshold of every PartitionedDropMLP in `model`."""
    check_threshold(threshold)
    layers = drop_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PartitionedDropMLP; call partition_for_drop first")
    for layer in layers:
        layer.threshold = float(threshold)
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


def drop_sweep(model, validation, thresholds, label, batch_size=8, max_sequences=None):
    """One row per threshold: ppl per source and pooled, activated params, mean kept experts."""
    from ..evaluation.perplexity import evaluate_ppl

    rows = []
    for threshold in tqdm(thresholds, desc="drop thresholds"):
        set_threshold(model, threshold)
        with DropRecorder(model) as recorder:
            ppl = evaluate_ppl(model, validation, batch_size, max_sequences, progress=False)
        report = recorder.report()
        row = {"model": label, "variant": DROP, "rule": recorder.layers[0].rule, "threshold": float(threshold)}
        row.update({f"ppl_{r.source}": r.ppl for r in ppl.itertuples()})
        row.update(tokens=int(ppl.loc[ppl.source == "all", "tokens"].iloc[0]), total_params=report["total_params"],
                   activated_params=report["activated_params"], activated_params_pct=report["activated_params_pct"],
                   mean_active_experts=float(np.mean(report["mean_active_experts"])))
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["DropRecorder", "PartitionedDropMLP", "activated_params", "drop_layers", "drop_sweep", "partition_for_drop", "set_threshold"]
