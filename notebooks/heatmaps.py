# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Layer-wise activation (Fig. 3)
#
# Mean number of active experts per layer and validation source, one heatmap per trained model, with
# the paper's average column (and an average row); then the same over the benchmark tasks (routing
# recorded while lm-eval ran them), and the per-layer profile as lines. The paper finds a W-shaped
# profile across depth; `tables` tests it (claims: five equal layer bands, bands 1, 3, 5 each above
# bands 2 and 4). Top-k routing is fixed (k experts for every token): its heatmap is drawn once, as a
# reference, not as a finding. Every heatmap shares one colour scale, 0 to n experts.

# %% tags=["parameters"]
run_dir = "../results/default"
models = "dsmoe no_ste no_gx topk"
task_models = "dsmoe no_ste no_gx"

# %%
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from dsmoe import report

run = report.find_run(run_dir)
data = report.load_run(run.dir)
figures_dir = run.out / "figures"
n_experts = report.run_config(run.dir).get("dsmoe", {}).get("n_experts")  # the shared colour scale's top
models = [m for m in models.split() if m in set(data["layers"]["model"])]
task_models = [m for m in task_models.split() if m in set(data["bench_layers"]["model"])]

# %% [markdown]
# ## Validation sources

# %%
for model in models:
    ax = report.heatmap(data["layers"], model, n_experts=n_experts)
    report.save_figure(ax.figure, figures_dir, f"heatmap_{model}")
    plt.show()

# %% [markdown]
# ## Benchmark tasks

# %%
for model in task_models:
    ax = report.heatmap(data["bench_layers"], model, column="task", n_experts=n_experts)
    report.save_figure(ax.figure, figures_dir, f"heatmap_tasks_{model}")
    plt.show()

# %%
ax = report.layer_profile(data["layers"], models, n_experts=n_experts)
ax.set_title("mean active experts per layer (all sources)")
report.save_figure(ax.figure, figures_dir, "layer_profile")
plt.show()

# %% [markdown]
# ## Routing diagnostics
# Per trained sigmoid-gated model: perplexity at its τ, with every expert on at coefficient 1 (`ppl_all_on`:
# the model's own dense FFN; `all_on_over_dense` near 1 means training kept the weights and any gap at τ is the
# routing), and the mean share of gate values σ(h·Y) within ±0.05 of τ (`near_tau_share`: where it is large, a
# small change of τ flips many experts), beside the dense rows. Then the DSMoE model's σ(h·Y) − τ histogram per
# layer, and the base model's massive activations at position 0 with the expert (Eq. 6) that holds each unit.
# A run collected before these diagnostics (data/gate_margins.csv, all_on.csv, massive.csv) shows a line instead.

# %%
tables_dir = run.out / "tables"
if report.has_diagnostics(data):
    diagnostics = report.diagnostics_table(data["ppl"], data["all_on"], data["gate_margins"])
    report.save_table(diagnostics, tables_dir, "diagnostics")
    display(Markdown(diagnostics.to_markdown(index=False, floatfmt=".4g")))
else:
    print(f"No routing diagnostics in {run.dir}/data (gate_margins.csv, all_on.csv): rerun the workflow to collect them.")

# %%
margins = data["gate_margins"]
if "model" in margins and (margins["model"] == "dsmoe").any():
    fig = report.gate_margin_figure(margins, model="dsmoe")
    report.save_figure(fig, figures_dir, "gate_margins")
    plt.show()
else:
    print(f"No gate margins of the DSMoE model in {run.dir}/data/gate_margins.csv.")

# %%
massive = report.massive_table(data["massive"])
if not massive.empty:
    report.save_table(massive, tables_dir, "massive")
    display(Markdown(massive.to_markdown(index=False, floatfmt=".4g")))
else:
    print(f"No massive-activation table in {run.dir}/data (massive.csv).")
