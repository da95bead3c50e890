"""Figures of a run: Fig. 3 heatmaps and layer profiles, Table 4 τ-curves, Fig. 2, the routing explorer."""

import numpy as np
import pandas as pd


def heatmap(layers, model, ax=None):
    """Fig. 3: mean active experts, layers (rows) x validation sources (columns), of one model."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = layers[(layers["model"] == model) & (layers["source"] != "all")]
    if df.empty:
        raise ValueError(f"no per-layer routing data for model {model!r}")
    grid = df.pivot_table(index="layer", columns="source", values="mean_active_experts")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 2.5, 0.28 * grid.shape[0] + 1.5))
    sns.heatmap(grid, ax=ax, annot=grid.shape[0] <= 32, fmt=".1f", cmap="viridis",
                cbar_kws={"label": "mean active experts"})
    ax.set_title(f"{model}: active experts per layer")
    return ax


def layer_profile(layers, models, ax=None):
    """Per-layer mean active experts (averaged over sources), one line per model."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    df = layers[layers["source"] != "all"]
    for model in models:
        profile = df[df["model"] == model].groupby("layer")["mean_active_experts"].mean()
        if len(profile):
            ax.plot(profile.index, profile.values, marker="o", label=model)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean active experts")
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


def no_gx_curve(sweep, dsmoe_point):
    """Fig. 2: the no-G model's PPL and active experts against τ; DSMoE's point starred.

    `dsmoe_point`: a row (Series or dict) of the DSMoE model with tau, ppl, mean_active_experts.
    """
    import matplotlib.pyplot as plt

    curve = sweep[sweep["variant"] == "no_gx"].sort_values("tau")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(curve["tau"], curve["ppl"], marker="o", color="C0", label="no-G: PPL")
    ax.set_yscale("log")
    ax.set_xlabel("τ (applied at inference only)")
    ax.set_ylabel("PPL", color="C0")
    twin = ax.twinx()
    twin.plot(curve["tau"], curve["mean_active_experts"], marker="s", color="C1", label="no-G: active experts")
    twin.set_ylabel("mean active experts", color="C1")
    ax.plot([dsmoe_point["tau"]], [dsmoe_point["ppl"]], "*", ms=18, color="C3", label="DSMoE: PPL")
    twin.plot([dsmoe_point["tau"]], [dsmoe_point["mean_active_experts"]], "*", ms=18, color="C2",
              label="DSMoE: active experts")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper center", fontsize=8)
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
