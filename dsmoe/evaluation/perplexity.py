"""Validation perplexity with activated parameters, and τ-sweeps (paper Tables 1 and 4, Figs. 2 and 3).

Perplexity is token-weighted: every validation row is one window of `seq_len` tokens; the NLL of
each predicted token (positions 1..seq_len-1) is summed over a source and divided by their count,
and ppl = exp of that mean. Padding (`dsmoe.data.PAD`, truncate-mode rows) is neither predicted nor
counted, in the NLL or in the routing statistics. The "all" row pools the tokens of every source. Activated parameters are
counted as in Table 1 (`dsmoe.accounting.activated_params`) from the routing recorded while evaluating;
a model without DSMoE layers (dense, pruned) counts all of its parameters.
"""

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..accounting import RoutingRecorder, RoutingStats, activated_params, counted_tokens
from ..config import schema_default
from ..model import TOPK_VARIANTS, check_tau, dsmoe_layers, set_tau

TABLE4_TAUS = tuple(schema_default("eval.tau_sweep"))  # the grid of Table 4


def token_nll(model, input_ids):
    """Summed next-token NLL of a batch of windows (B x T) in float64, and the number of predicted tokens."""
    from ..data import model_inputs

    inputs = model_inputs(input_ids)
    with counted_tokens(inputs.get("attention_mask")):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False).logits
    targets = inputs["labels"][:, 1:].reshape(-1)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, reduction="none", ignore_index=-100)
    predicted = targets != -100
    return nll[predicted].double().sum().item(), int(predicted.sum())


def routing_summary(model, stats):
    """Activated params and per-layer mean active experts from per-layer RoutingStats (empty: dense)."""
    per_layer = [s.mean_active for s in stats]
    counts = activated_params(model, per_layer if stats else None)
    mean = float(np.mean(per_layer)) if per_layer else math.nan
    return {"activated_params": counts["activated_params"], "activated_params_pct": counts["activated_params_pct"],
            "mean_active_experts": mean}, per_layer


@torch.no_grad()
def evaluate_ppl(model, validation, batch_size=8, max_sequences=None, progress=True):
    """Per-source perplexity and activated params: one row per source plus "all".

    Columns: source, ppl, tokens, activated_params, activated_params_pct, mean_active_experts (mean over
    layers; NaN for a dense model). `df.attrs["layers"]` holds the per-layer means (source, layer,
    mean_active_experts) for the Fig. 3 heatmaps.
    """
    if not validation:
        raise ValueError("no validation source to evaluate")
    model.eval()
    device = next(model.parameters()).device
    rows, layer_rows, all_stats = [], [], []
    total_nll, total_tokens = 0.0, 0
    for source, sequences in validation.items():
        sequences = sequences[:max_sequences]
        if len(sequences) == 0 or sequences.shape[-1] < 2:
            raise ValueError(f"validation source {source!r} has no window of 2 tokens or more")
        nll, tokens = 0.0, 0
        with RoutingRecorder(model) as recorder:
            for start in tqdm(range(0, len(sequences), batch_size), desc=f"ppl {source}", disable=not progress):
                batch = torch.from_numpy(np.array(sequences[start:start + batch_size], dtype=np.int64)).to(device)
                batch_nll, batch_tokens = token_nll(model, batch)
                nll, tokens = nll + batch_nll, tokens + batch_tokens
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
        all_stats.append(recorder.stats)
        rows.append((source, nll, tokens, recorder.stats))
    rows.append(("all", total_nll, total_tokens, [RoutingStats.pooled(layer) for layer in zip(*all_stats)]))
    summary = []
    for source, nll, tokens, stats in rows:
        routing, per_layer = routing_summary(model, stats)
        summary.append({"source": source, "ppl": math.exp(nll / tokens), "tokens": tokens, **routing})
        layer_rows += [{"source": source, "layer": i, "mean_active_experts": k} for i, k in enumerate(per_layer)]
    df = pd.DataFrame(summary)
    df.attrs["layers"] = pd.DataFrame(layer_rows, columns=["source", "layer", "mean_active_experts"])
    return df


def sweep_tau(model, validation, taus=TABLE4_TAUS, batch_size=8, max_sequences=None, progress=True):
    """Evaluate a DSMoE model at each τ (set in place, restored after): one row per τ.

    Columns: tau, ppl (the "all" ppl), activated_params, activated_params_pct, mean_active_experts,
    then ppl_<source> per source; `df.attrs["layers"]` has (tau, source, layer, mean_active_experts).
    """
    if not dsmoe_layers(model):
        raise ValueError(f"{type(model).__name__} is a dense model: a τ-sweep needs a DSMoE model")
    if model.config.variant in TOPK_VARIANTS:
        raise ValueError("τ has no effect on the topk variant (fixed top-k routing): nothing to sweep")
    for tau in taus:
        check_tau(tau)
    original = dsmoe_layers(model)[0].tau
    rows, layers = [], []
    try:
        for tau in tqdm(taus, desc="tau sweep", disable=not progress):
            set_tau(model, tau)
            df = evaluate_ppl(model, validation, batch_size, max_sequences, progress=False)
            summary = df.set_index("source")
            row = {"tau": float(tau), **summary.loc["all", ["ppl", "activated_params", "activated_params_pct", "mean_active_experts"]].to_dict()}
            row.update({f"ppl_{source}": summary.loc[source, "ppl"] for source in validation})
            rows.append(row)
            layers.append(df.attrs["layers"].assign(tau=float(tau)))
    finally:
        set_tau(model, original)
    df = pd.DataFrame(rows)
    df.attrs["layers"] = pd.concat(layers, ignore_index=True)[["tau", "source", "layer", "mean_active_experts"]]
    return df


def read_activated_pct(ppl_csv):
    """Activated params (% of total) of a model over all validation sources, from its ppl.csv."""
    df = pd.read_csv(ppl_csv)
    rows = df[df["source"] == "all"]
    if rows.empty:
        raise ValueError(f"{ppl_csv} has no row with source 'all'")
    return float(rows["activated_params_pct"].iloc[0])
