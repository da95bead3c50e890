"""Routing statistics and activated parameters: active experts per token and layer (paper Table 1)."""

import contextlib
import contextvars

import torch

from .model import dsmoe_layers
from .names import NEAR_TAU

_COUNTED = contextvars.ContextVar("dsmoe_counted_tokens", default=None)


@contextlib.contextmanager
def counted_tokens(mask):
    """Inside this block, routing statistics count only the tokens where `mask` (B x T, or None: all)
    is true: padding of truncated documents is routed but not counted."""
    token = _COUNTED.set(None if mask is None else mask.reshape(-1).bool())
    try:
        yield
    finally:
        _COUNTED.reset(token)


class RoutingStats:
    """Running histogram of k, the number of active experts per token, for one layer."""

    def __init__(self, n_experts):
        self.n_experts = n_experts
        self.k_hist = torch.zeros(n_experts + 1, dtype=torch.long)

    def update(self, active):
        mask = _COUNTED.get()
        if mask is not None:
            if mask.numel() != active.shape[0]:
                raise ValueError(f"counted_tokens mask has {mask.numel()} tokens, the forward {active.shape[0]}")
            active = active[mask.to(active.device)]
        active = active.detach().cpu()
        self.k_hist += torch.bincount(active.sum(-1), minlength=self.n_experts + 1)

    @classmethod
    def pooled(cls, stats):
        """One RoutingStats holding the tokens of all of `stats` (same layer, several sources)."""
        merged = cls(stats[0].n_experts)
        for s in stats:
            merged.k_hist += s.k_hist
        return merged

    @property
    def tokens(self):
        return int(self.k_hist.sum())

    @property
    def mean_active(self):
        k = torch.arange(self.n_experts + 1, dtype=torch.float64)
        return float((self.k_hist.double() * k).sum() / max(self.tokens, 1))


MARGIN_EDGES = torch.linspace(-1.0, 1.0, 201, dtype=torch.float64)  # σ(h·Y) − τ lies in (−1, 1): bins of 0.01


class GateMarginStats(RoutingStats):
    """RoutingStats plus the histogram of σ(h·Y) − τ over tokens × experts of a sigmoid-gated layer.

    Reads the layer's `last_gate_probs`, which its forward sets just before it calls `update`."""

    def __init__(self, n_experts, layer):
        super().__init__(n_experts)
        self.layer = layer
        self.counts = torch.zeros(len(MARGIN_EDGES) - 1, dtype=torch.long)
        self.near = 0  # |σ − τ| <= NEAR_TAU

    def update(self, active):
        super().update(active)
        margins = self.layer.last_gate_probs.detach().double().cpu() - float(self.layer.tau)
        mask = _COUNTED.get()
        if mask is not None:
            margins = margins[mask.cpu()]
        bins = torch.bucketize(margins.reshape(-1), MARGIN_EDGES, right=True) - 1
        self.counts += torch.bincount(bins.clamp(0, len(self.counts) - 1), minlength=len(self.counts))
        self.near += int((margins.abs() <= NEAR_TAU).sum())

    @classmethod
    def pooled(cls, stats):
        merged = cls(stats[0].n_experts, stats[0].layer)
        for s in stats:
            merged.k_hist += s.k_hist
            merged.counts += s.counts
            merged.near += s.near
        return merged


def records_margins(layer):
    """Whether a layer's gate is σ(h·Y) against τ (the sigmoid variants), so that its margins mean something."""
    return getattr(layer, "variant", None) in ("dsmoe", "no_ste", "no_gx") and hasattr(layer, "last_gate_probs")


class RoutingRecorder:
    """Record routing over any number of forward passes.

    >>> with RoutingRecorder(model) as rec:
    ...     model(**batch)
    >>> rec.report()["activated_params_pct"]

    `gate_margins=True`: sigmoid-gated layers also histogram σ(h·Y) − τ (`GateMarginStats`).
    """

    def __init__(self, model, layers=None, gate_margins=False):
        self.model = model
        self.layers = dsmoe_layers(model) if layers is None else list(layers)
        self.stats = [GateMarginStats(layer.n_experts, layer) if gate_margins and records_margins(layer)
                      else RoutingStats(layer.n_experts) for layer in self.layers]

    def __enter__(self):
        for layer, stats in zip(self.layers, self.stats):
            layer.routing_stats = stats
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.routing_stats = None
        return False

    def mean_active_experts(self):
        """Per-layer mean number of active experts per token."""
        return [stats.mean_active for stats in self.stats]

    def report(self):
        counts = activated_params(self.model, self.mean_active_experts(), self.layers)
        return {
            "tokens": self.stats[0].tokens if self.stats else 0,
            "mean_active_experts": self.mean_active_experts(),
            "k_histogram": [stats.k_hist.tolist() for stats in self.stats],
            **counts,
        }


def ffn_params(layer):
    return sum(p.numel() for p in (layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight))


def activated_params(model, mean_active_experts=None, layers=None):
    """Count activated parameters as the paper's Table 1 does.

    Non-FFN parameters (embeddings, attention, norms, head) plus gate parameters, plus each
    layer's FFN parameters times the fraction of its experts used, averaged over tokens.
    A dense model (no DSMoE layer) activates all of its parameters. `layers` defaults to the
    model's DSMoE layers; any layer with `n_experts` and SwiGLU projections can be counted.
    """
    total = sum(p.numel() for p in model.parameters())
    layers = dsmoe_layers(model) if layers is None else layers
    if mean_active_experts is None:
        mean_active_experts = [layer.n_experts for layer in layers]
    if len(mean_active_experts) != len(layers):
        raise ValueError(f"got {len(mean_active_experts)} per-layer means for {len(layers)} expert layers")
    ffn = [ffn_params(layer) for layer in layers]
    activated = total - sum(ffn)
    activated += sum(f * k / layer.n_experts for f, k, layer in zip(ffn, mean_active_experts, layers))
    return {
        "total_params": total,
        "activated_params": float(activated),
        "activated_params_pct": 100.0 * activated / total,
    }
