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
# # Routing explorer
#
# Load a DSMoE checkpoint, type a text, and see how many experts each token activates in each
# layer. Change `text` (or `model_dir`) and rerun the cells. Without a trained model (a fresh clone;
# the committed CPU study keeps no weights) the embedded SmolLM2-135M, converted with the paper's
# random gate init and not trained, stands in, and the first output says so.

# %% tags=["parameters"]
run_dir = "../results/default"
model_dir = "../results/default/models/dsmoe/model"
text = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog."

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import dsmoe
from dsmoe import report

if Path(model_dir).is_dir():
    figures_dir = Path(run_dir) / "figures"
    model, tokenizer = dsmoe.load_model(model_dir)
    print(f"{model_dir}: {type(model).__name__}, {model.config.n_experts} experts per FFN, τ = {model.config.tau}")
else:
    figures_dir = Path(tempfile.gettempdir()) / "dsmoe-notebooks" / "explorer"
    print(f"{model_dir} does not exist (no `make demo` run yet; the committed CPU study keeps no weights): "
          "SmolLM2-135M converted with the paper's random gate init (N(0, 0.02²), seed 0), untrained, stands in "
          f"for a trained DSMoE model. The figure goes to {figures_dir}/.")
    torch.manual_seed(0)
    model, tokenizer = dsmoe.load_model("smollm2-135m")
    model = dsmoe.convert(model, n_experts=8, tau=0.5, variant="dsmoe")

# %%
tokens, activity = report.token_activity(model, tokenizer, text)
ax = report.explorer_heatmap(tokens, activity, model.config.n_experts)
ax.set_title(f"active experts per token and layer (mean {activity.mean():.2f} of {model.config.n_experts})")
report.save_figure(ax.figure, figures_dir, "explorer")
plt.show()
