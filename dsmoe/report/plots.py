"""Figures of a run: Fig. 3 heatmaps and layer profiles, Table 4 τ-curves, Fig. 2, Tables 5-6 as curves,
the routing explorer."""

import numpy as np
import pandas as pd

from ..names import FIXED_ROUTING, NEAR_TAU


def heatmap_grid(layers, model, column="source"):
    """Layers (rows) x `column` values (columns) of mean active experts, with an `average` column (mean
    over the columns) and an `average` row (mean over the layers); source "all" is left out."""
    df = layers[(layers["model"] == model)]
    df = df[df[column] != "all"] if column == "source" else df
    if df.empty:
        raise ValueError(f"no per-layer routing data by {column} for model {model!r}")
    grid = df.pivot_table(index="layer", columns=column, values="mean_active_experts")
    grid.columns = [str(c) for c in grid.columns]
    grid["average"] = grid.mean(axis=1)
    grid.index = [str(i) for i in grid.index]
    grid.loc["average"] = grid.mean(axis=0)
    return grid


def expert_scale(layers, n_experts=None):
    """The colour scale's top: `n_experts` (the run's dsmoe.n_experts), else the largest whole count the
    data reaches (every model of `layers` at once), so that every heatmap of a run shares one scale."""
    if n_experts is not None:
        if n_experts < 1:
            raise ValueError(f"n_experts must be at least 1, got {n_experts}")
        return int(n_experts)
    return max(1, int(np.ceil(layers["mean_active_experts"].max() - 1e-9)))


def heatmap(layers, model, column="source", ax=None, n_experts=None):
    """Fig. 3: mean active experts, layers (rows) x validation sources or benchmark tasks (`column`),
    of one model, with the average column and row, on the fixed colour scale 0..n experts (`n_experts`,
    see `expert_scale`) that every model's figure shares: a flat run looks flat, and models compare at
    a glance. A fixed-routing model (top-k) is titled as the reference it is: its count is k by
    construction, not a finding."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    grid = heatmap_grid(layers, model, column)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 2.5, 0.28 * grid.shape[0] + 1.5))
    sns.heatmap(grid, ax=ax, annot=grid.shape[0] <= 33, fmt=".1f", cmap="viridis", vmin=0,
                vmax=expert_scale(layers, n_experts), cbar_kws={"label": "mean active experts"})
    ax.axvline(grid.shape[1] - 1, color="white", lw=2)
    ax.axhline(grid.shape[0] - 1, color="white", lw=2)
    ax.set_xlabel("validation source" if column == "source" else "benchmark task")
    ax.set_ylabel("layer")
    variants = set(layers.loc[layers["model"] == model, "variant"]) if "variant" in layers else set()
    if variants & set(FIXED_ROUTING):
        ax.set_title(f"{model}: reference only: fixed top-k routing, every token k experts by construction")
    else:
        ax.set_title(f"{model}: active experts per layer and {'source' if column == 'source' else 'task'}")
    return ax


def layer_profile(layers, models, ax=None, n_experts=None):
    """Per-layer mean active experts (averaged over sources), one line per model, on the axis 0..n
    experts (`expert_scale`); fixed-routing models dashed and labelled as a reference."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    df = layers[layers["source"] != "all"]
    for model in models:
        rows = df[df["model"] == model]
        profile = rows.groupby("layer")["mean_active_experts"].mean()
        if len(profile):
            fixed = bool(set(rows.get("variant", [])) & set(FIXED_ROUTING))
            ax.plot(profile.index, profile.values, marker="o", linestyle="--" if fixed else "-",
                    label=f"{model} (reference: fixed k)" if fixed else model)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean active experts")
    ax.set_ylim(0, expert_scale(layers, n_experts) * 1.05)
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def tau_curves(sweep, paper=None):
    """Table 4 as curves: PPL and activated params against τ, the paper's LLaMA-1B/7B dashed."""
    import matplotlib.pyplot as plt

    curve = sweep[sweep["variant"] == "dsmoe"].sort_values("tau")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(curve["tau"], curve["ppl"], marker="o", label="this run")
    if curve["ppl"].max() > 100 * curve["ppl"].min():  # an untrained or short run spans decades
        left.set_yscale("log")
    left.set_xlabel("τ")
    left.set_ylabel("PPL (this run)")
    right.plot(curve["tau"], curve["activated_params_pct"], marker="o", label="this run")
    if paper is not None:
        theirs = pd.DataFrame(paper["table4"])
        twin = left.twinx()
        for tag, style in (("llama1b", "--"), ("llama7b", ":")):
            name = "paper LLaMA-" + tag[5:].upper()
            twin.plot(theirs["tau"], theirs[f"{tag}_ppl"], style, color="gray", label=name)
            right.plot(theirs["tau"], theirs[f"{tag}_activated_params_pct"], style, color="gray", label=name)
        twin.set_ylabel("PPL (paper)")
        twin.legend(loc="upper center")
    right.set_xlabel("τ")
    right.set_ylabel("activated params (%)")
    left.legend(loc="upper left")
    right.legend()
    fig.tight_layout()
    return fig


NO_GX_SWEEPS = (("no_gx", "-", "n/k at inference"), ("no_gx_unscaled", "--", "no n/k at inference"))


def no_gx_curve(sweep, dsmoe_point):
    """Fig. 2: the no-G model's PPL and active experts against τ, with Eq. 8's n/k at inference (solid)
    and without it (dashed, the scale it was trained with); DSMoE's point starred.

    `dsmoe_point`: a row (Series or dict) of the DSMoE model with tau, ppl, mean_active_experts.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    twin = ax.twinx()
    for label, style, how in NO_GX_SWEEPS:
        curve = sweep[sweep["model"] == label].sort_values("tau")
        if curve.empty:
            continue
        ax.plot(curve["tau"], curve["ppl"], style, marker="o", color="C0", label=f"no-G, {how}: PPL")
        twin.plot(curve["tau"], curve["mean_active_experts"], style, marker="s", color="C1",
                  label=f"no-G, {how}: active experts")
    ax.set_yscale("log")
    ax.set_xlabel("τ (applied at inference only)")
    ax.set_ylabel("PPL", color="C0")
    twin.set_ylabel("mean active experts", color="C1")
    ax.plot([dsmoe_point["tau"]], [dsmoe_point["ppl"]], "*", ms=18, color="C3", label="DSMoE: PPL")
    twin.plot([dsmoe_point["tau"]], [dsmoe_point["mean_active_experts"]], "*", ms=18, color="C2",
              label="DSMoE: active experts")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper center", fontsize=7)
    fig.tight_layout()
    return fig


def token_curve(table):
    """Tables 5-6 as curves: PPL against continued-pretraining tokens, this run (its milestones and
    final model) beside the paper's LLaMA-1B (Table 5) and LLaMA-7B (Table 6), each on its own axes.

    `table`: the output of `dsmoe.report.table5_6`."""
    import matplotlib.pyplot as plt

    sources = [s for s in dict.fromkeys(table["source"]) if s == "this run"]
    sources += [s for s in dict.fromkeys(table["source"]) if s != "this run"]
    fig, axes = plt.subplots(1, max(len(sources), 1), figsize=(4.2 * max(len(sources), 1), 3.6), squeeze=False)
    for ax, source in zip(axes[0], sources):
        rows = table[table["source"] == source].sort_values("tokens")
        ax.plot(rows["tokens"], rows["ppl"], marker="o", color="C0" if source == "this run" else "gray")
        final = rows[rows["final"].astype(bool)]
        if len(final):
            ax.plot(final["tokens"], final["ppl"], "*", ms=14, color="C3", label="final model")
            ax.legend(fontsize=8)
        ax.set_title(source)
        ax.set_xlabel("continued-pretraining tokens")
        ax.set_ylabel("validation PPL")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def pilot_curves(logs, path, adaptive=None):
    """`dsmoe pilot`'s PNG: activation, λ and LM loss against steps, one line per run (`{label: train_log}`).

    With `adaptive` (the first run's train.adaptive_sparsity), the controller's target ramp is drawn dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, log in logs.items():
        axes[0].plot(log["step"], log["mean_active_fraction"], label=label)
        axes[1].plot(log["step"], log["lambda"], label=label)
        axes[2].plot(log["step"], log["lm_loss"], label=label)
    if adaptive and adaptive.get("enabled"):
        first = next(iter(logs.values()))
        steps = first["step"].to_numpy()
        start, ramp = float(first["mean_active_fraction"].iloc[0]), max(adaptive["ramp_steps"], 1)
        target = start + (adaptive["target_fraction"] - start) * np.minimum(steps / ramp, 1.0)
        axes[0].plot(steps, target, "--", color="gray", label="target")
        for bound in (adaptive["lambda_min"], adaptive["lambda_max"]):
            axes[1].axhline(bound, ls=":", color="gray")
    axes[0].set_ylabel("active experts / n (mean over layers)")
    axes[0].set_ylim(0, 1.05)
    axes[1].set_ylabel("λ")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("LM loss (training batch)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- routing explorer ------------------------------------------------------------------------


def token_activity(model, tokenizer, text):
    """Tokens of `text` and a layers x tokens array of how many experts each token activates."""
    import torch

    from ..model import dsmoe_layers

    layers = dsmoe_layers(model)
    if not layers:
        raise ValueError("the model has no DSMoE layer; load a converted checkpoint")
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        model.eval()(ids)
    activity = np.stack([layer.last_active.reshape(-1, layer.n_experts).sum(-1).cpu().numpy() for layer in layers])
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    return [token.replace("Ġ", "␣").replace("Ċ", "⏎") for token in tokens], activity


def explorer_heatmap(tokens, activity, n_experts, ax=None):
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 0.32 * len(tokens)), 0.3 * activity.shape[0] + 1.8))
    sns.heatmap(activity, ax=ax, vmin=0, vmax=n_experts, cmap="magma", xticklabels=tokens,
                cbar_kws={"label": "active experts"})
    ax.set_xlabel("token")
    ax.set_ylabel("layer")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    return ax


def gate_margin_figure(margins, model=None, source="all"):
    """Per layer, the distribution of σ(h·Y) − τ (gate_margins.csv of `dsmoe eval ppl`): a layers x margin
    heatmap of the share of gate values in each bin, and per layer the share within ±0.05 of τ."""
    import matplotlib.pyplot as plt

    df = margins[margins["source"] == source]
    if model is not None:
        df = df[df["model"] == model]
    if df.empty:
        raise ValueError(f"no gate margins for model {model!r}, source {source!r}")
    if df["model"].nunique() > 1:
        raise ValueError(f"gate margins of several models ({', '.join(map(str, df['model'].unique()))}): pick one with model=")
    grid = df.pivot_table(index="layer", columns="bin_low", values="count", aggfunc="sum")
    share = grid.div(grid.sum(axis=1), axis=0)
    near = df.groupby("layer")["near_tau_share"].first()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    edges = list(grid.columns) + [df["bin_high"].max()]
    image = left.pcolormesh(edges, np.arange(len(grid.index) + 1) - 0.5, share.to_numpy(), cmap="viridis", shading="flat")
    left.axvline(0.0, color="white", lw=0.8)
    for edge in (-NEAR_TAU, NEAR_TAU):  # the band whose share the right panel gives
        left.axvline(edge, color="white", lw=0.8, ls="--")
    left.set_xlabel("σ(h·Y) − τ")
    left.set_ylabel("layer")
    fig.colorbar(image, ax=left, label="share of gate values")
    right.barh(near.index, near.to_numpy())
    right.set_xlabel(f"share within ±{NEAR_TAU:g} of τ")
    right.set_xlim(0, 1)
    right.set_ylim(left.get_ylim())  # the heatmap's layer rows
    right.axvline(near.mean(), color="black", lw=0.8, ls="--", label=f"mean {near.mean():.3f}")
    right.legend(loc="lower right", fontsize=8)
    left.set_title(f"{df['model'].iloc[0]}: σ(h·Y) − τ per layer ({source})")
    fig.tight_layout()
    return fig
