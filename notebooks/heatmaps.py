# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
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
