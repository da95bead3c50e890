"""Routing diagnostics of a run (issue 28) as tables: each trained sigmoid-gated model's perplexity at its τ and
with every expert on, and how many gate values sit near τ, beside the dense rows; the massive activations."""

import math

import pandas as pd

from ..names import ALL_ON, DENSE, DENSE_CONTINUED, SIGMOID_VARIANTS
from .run_data import overall

COLUMNS = ["model", "variant", "tau", "activated_params_pct", "ppl", "ppl_all_on", "all_on_over_dense",
           "near_tau_share"]


def near_tau_shares(gate_margins, source="all"):
    """Per model, the mean over its sigmoid-gated layers of the share of σ(h·Y) within ±0.05 of τ (source `source`)."""
    if gate_margins is None or gate_margins.empty or "near_tau_share" not in gate_margins:
        return pd.Series(dtype=float)
    rows = gate_margins[gate_margins["source"] == source]
    return rows.groupby(["model", "layer"])["near_tau_share"].first().groupby(level="model").mean()


def all_on_ppl(all_on):
    """Per model (the MODEL of its MODEL@all_on rows), the overall perplexity with every expert on."""
    if all_on is None or all_on.empty or "ppl" not in all_on:
        return pd.Series(dtype=float)
    rows = all_on[all_on["source"] == "all"]
    return pd.Series(rows["ppl"].to_numpy(), index=rows["model"].str.removesuffix(ALL_ON).to_numpy())


def diagnostics_table(ppl, all_on=None, gate_margins=None):
    """One row per dense model (dense, dense_continued) and per trained sigmoid-gated model (dsmoe, no_ste,
    no_gx) of `ppl`: its perplexity at its τ (`ppl`), with every expert on at coefficient 1 (`ppl_all_on`,
    from data/all_on.csv; its ratio to the dense model's perplexity: near 1 unless training damaged the
    weights) and the mean share of its gate values within ±0.05 of τ (`near_tau_share`, data/gate_margins.csv).
    Empty where `ppl` holds none of them; NaN where a run lacks the all-on or gate-margin data."""
    rows = overall(ppl).reset_index() if not ppl.empty else pd.DataFrame(columns=["model", "variant"])
    keep = rows["model"].isin([DENSE, DENSE_CONTINUED]) | rows["variant"].isin(SIGMOID_VARIANTS)
    rows = rows[keep]
    on, near = all_on_ppl(all_on), near_tau_shares(gate_margins)
    dense = rows.loc[rows["model"] == DENSE, "ppl"]
    dense_ppl = float(dense.iloc[0]) if len(dense) else math.nan
    df = pd.DataFrame({
        "model": rows["model"].to_numpy(),
        "variant": rows["variant"].to_numpy(),
        "tau": rows["tau"].to_numpy() if "tau" in rows else math.nan,
        "activated_params_pct": rows["activated_params_pct"].to_numpy() if "activated_params_pct" in rows else math.nan,
        "ppl": rows["ppl"].to_numpy() if "ppl" in rows else math.nan,
    })
    df["ppl_all_on"] = df["model"].map(on).astype(float)
    df["all_on_over_dense"] = df["ppl_all_on"] / dense_ppl
    df["near_tau_share"] = df["model"].map(near).astype(float)
    return df[COLUMNS].reset_index(drop=True)


def has_diagnostics(data):
    """Whether a run's collected data (`load_run`) holds any routing diagnostics (gate margins or all-on rows)."""
    return not near_tau_shares(data["gate_margins"]).empty or not all_on_ppl(data["all_on"]).empty


def massive_table(massive):
    """The base model's massive activations (data/massive.csv: `dsmoe eval massive-activations`) in layer and
    rank order; an empty frame without them."""
    if massive is None or massive.empty or "layer" not in massive:
        return pd.DataFrame()
    return massive.sort_values(["layer", "rank"]).reset_index(drop=True)
