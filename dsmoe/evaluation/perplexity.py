"""Validation perplexity with activated parameters, and τ-sweeps (paper Tables 1 and 4, Figs. 2 and 3).

Perplexity is token-weighted: every validation row is one window of `seq_len` tokens; the NLL of
each predicted token (positions 1..seq_len-1) is summed over a source and divided by their count,
and ppl = exp of that mean. Padding (`dsmoe.data.PAD`, truncate-mode rows) is neither predicted nor
counted, in the NLL or in the routing statistics. The "all" row pools the tokens of every source. Activated parameters are
counted as in Table 1 (`dsmoe.accounting.activated_params`) from the routing recorded while evaluating;
a model without DSMoE layers (dense, pruned) counts all of its parameters.
"""

import contextlib
import functools
import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..accounting import MARGIN_EDGES, GateMarginStats, RoutingRecorder, activated_params, counted_tokens
from ..config import schema_default
from ..model import TOPK_VARIANTS, check_tau, dsmoe_layers, set_tau

TABLE4_TAUS = tuple(schema_default("eval.tau_sweep"))  # the grid of Table 4
WINDOW_COLUMNS = ["source", "window", "nll", "tokens"]  # df.attrs["windows"] of evaluate_ppl
MARGIN_COLUMNS = ["source", "layer", "bin_low", "bin_high", "count", "near_tau_share"]  # df.attrs["gate_margins"]


def window_nll(model, input_ids):
    """Summed next-token NLL of each window of a batch (B x T) in float64, and each window's predicted tokens."""
    from ..data import model_inputs

    inputs = model_inputs(input_ids)
    with counted_tokens(inputs.get("attention_mask")):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False).logits
    targets = inputs["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none",
                          ignore_index=-100).view(targets.shape)
    predicted = targets != -100
    nll = torch.where(predicted, nll.double(), 0.0).sum(dim=1)
    return nll.cpu().numpy(), predicted.sum(dim=1).cpu().numpy().astype(np.int64)


def routing_summary(model, stats):
    """Activated params and per-layer mean active experts from per-layer RoutingStats (empty: dense)."""
    per_layer = [s.mean_active for s in stats]
    counts = activated_params(model, per_layer if stats else None)
    mean = float(np.mean(per_layer)) if per_layer else math.nan
    return {"activated_params": counts["activated_params"], "activated_params_pct": counts["activated_params_pct"],
            "mean_active_experts": mean}, per_layer


def _recorded_all_on(layer, forward, hidden_states):
    out = forward(hidden_states)
    if layer.routing_stats is not None:
        layer.routing_stats.update(torch.ones(out.reshape(-1, out.shape[-1]).shape[0], layer.n_experts, dtype=torch.bool,
                                              device=out.device))
    return out


@contextlib.contextmanager
def all_experts_on_recorded(model):
    """`dsmoe.convert.all_experts_on`, with every expert recorded as active (the dense FFN's activated params)."""
    from ..convert import all_experts_on

    with all_experts_on(model):
        for layer in dsmoe_layers(model):
            layer.forward = functools.partial(_recorded_all_on, layer, layer.forward)
        yield model


def margin_rows(source, stats):
    """The σ(h·Y) − τ histogram rows of one source's per-layer stats (GateMarginStats only)."""
    rows = []
    for i, s in enumerate(stats):
        if isinstance(s, GateMarginStats):
            share = s.near / max(int(s.counts.sum()), 1)
            rows += [{"source": source, "layer": i, "bin_low": float(lo), "bin_high": float(hi), "count": int(c),
                      "near_tau_share": share} for lo, hi, c in zip(MARGIN_EDGES[:-1], MARGIN_EDGES[1:], s.counts)]
    return rows


def source_nll(model, sequences, batch_size, desc, progress, gate_margins=False):
    """Per-window summed NLL and predicted tokens of one source's windows, and its per-layer RoutingStats."""
    device = next(model.parameters()).device
    nll, tokens = [], []
    with RoutingRecorder(model, gate_margins=gate_margins) as recorder:
        for start in tqdm(range(0, len(sequences), batch_size), desc=desc, disable=not progress):
            batch = torch.from_numpy(np.array(sequences[start:start + batch_size], dtype=np.int64)).to(device)
            batch_nll, batch_tokens = window_nll(model, batch)
            nll.append(batch_nll)
            tokens.append(batch_tokens)
    return np.concatenate(nll), np.concatenate(tokens), recorder.stats


@torch.no_grad()
def evaluate_ppl(model, validation, batch_size=8, max_sequences=None, progress=True, gate_margins=False, all_on=False):
    """Per-source perplexity and activated params: one row per source plus "all".

    Columns: source, ppl, tokens, activated_params, activated_params_pct, mean_active_experts (mean over
    layers; NaN for a dense model). `df.attrs["layers"]` holds the per-layer means (source, layer,
    mean_active_experts) for the Fig. 3 heatmaps; `df.attrs["windows"]` the summed NLL and predicted
    tokens of each window (source, window: its index within the source, nll, tokens), for bootstraps.
    `gate_margins`: `df.attrs["gate_margins"]` holds, per source and sigmoid-gated layer, the histogram of
    σ(h·Y) − τ over tokens × experts (bins of 0.01 on [-1, 1]) and the share within ±0.05 of τ.
    `all_on`: every expert of every DSMoE layer on at coefficient 1 (`dsmoe.convert.all_experts_on`).
    """
    if not validation:
        raise ValueError("no validation source to evaluate")
    model.eval()
    with all_experts_on_recorded(model) if all_on else contextlib.nullcontext():
        return _evaluate(model, validation, batch_size, max_sequences, progress, gate_margins and not all_on)


def _evaluate(model, validation, batch_size, max_sequences, progress, gate_margins):
    rows, layer_rows, window_frames = [], [], []
    for source, sequences in validation.items():
        sequences = sequences[:max_sequences]
        if len(sequences) == 0 or sequences.shape[-1] < 2:
            raise ValueError(f"validation source {source!r} has no window of 2 tokens or more")
        nll, tokens, stats = source_nll(model, sequences, batch_size, f"ppl {source}", progress, gate_margins)
        window_frames.append(pd.DataFrame({"source": source, "window": np.arange(len(nll)), "nll": nll, "tokens": tokens}))
        rows.append((source, float(nll.sum()), int(tokens.sum()), stats))
    pooled = [type(layer[0]).pooled(layer) for layer in zip(*(stats for *_, stats in rows))]
    rows.append(("all", sum(r[1] for r in rows), sum(r[2] for r in rows), pooled))
    summary, margins = [], []
    for source, nll, tokens, stats in rows:
        margins += margin_rows(source, stats)
        routing, per_layer = routing_summary(model, stats)
        summary.append({"source": source, "ppl": math.exp(nll / tokens), "tokens": tokens, **routing})
        layer_rows += [{"source": source, "layer": i, "mean_active_experts": k} for i, k in enumerate(per_layer)]
    df = pd.DataFrame(summary)
    df.attrs["layers"] = pd.DataFrame(layer_rows, columns=["source", "layer", "mean_active_experts"])
    df.attrs["windows"] = pd.concat(window_frames, ignore_index=True)[WINDOW_COLUMNS]
    df.attrs["gate_margins"] = pd.DataFrame(margins, columns=MARGIN_COLUMNS)
    return df


def sweep_tau(model, validation, taus=TABLE4_TAUS, batch_size=8, max_sequences=None, progress=True):
    """Evaluate a DSMoE model at each τ (set in place, restored after): one row per τ.

    Columns: tau, ppl (the "all" ppl), activated_params, activated_params_pct, mean_active_experts,
    then ppl_<source> per source; `df.attrs["layers"]` has (tau, source, layer, mean_active_experts),
    `df.attrs["windows"]` (tau, source, window, nll, tokens).
    """
    if not dsmoe_layers(model):
        raise ValueError(f"{type(model).__name__} is a dense model: a τ-sweep needs a DSMoE model")
    if model.config.variant in TOPK_VARIANTS:
        raise ValueError("τ has no effect on the topk variant (fixed top-k routing): nothing to sweep")
    for tau in taus:
        check_tau(tau)
    original = dsmoe_layers(model)[0].tau
    rows, layers, windows = [], [], []
    try:
        for tau in tqdm(taus, desc="tau sweep", disable=not progress):
            set_tau(model, tau)
            df = evaluate_ppl(model, validation, batch_size, max_sequences, progress=False)
            summary = df.set_index("source")
            row = {"tau": float(tau), **summary.loc["all", ["ppl", "activated_params", "activated_params_pct", "mean_active_experts"]].to_dict()}
            row.update({f"ppl_{source}": summary.loc[source, "ppl"] for source in validation})
            rows.append(row)
            layers.append(df.attrs["layers"].assign(tau=float(tau)))
            windows.append(df.attrs["windows"].assign(tau=float(tau)))
    finally:
        set_tau(model, original)
    df = pd.DataFrame(rows)
    df.attrs["layers"] = pd.concat(layers, ignore_index=True)[["tau", "source", "layer", "mean_active_experts"]]
    df.attrs["windows"] = pd.concat(windows, ignore_index=True)[["tau", *WINDOW_COLUMNS]]
    return df


def read_activated_pct(ppl_csv):
    """Activated params (% of total) of a model over all validation sources, from its ppl.csv."""
    df = pd.read_csv(ppl_csv)
    rows = df[df["source"] == "all"]
    if rows.empty:
        raise ValueError(f"{ppl_csv} has no row with source 'all'")
    return float(rows["activated_params_pct"].iloc[0])
