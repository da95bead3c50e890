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
# # τ curves (Table 4, Fig. 2)
#
# Left: the trained DSMoE model evaluated at each τ without retraining (Table 4), the paper's
# LLaMA-1B/7B dashed. Then Fig. 2: the model trained without G(x) (Eq. 20, no n/k) and thresholded
# only at inference, over a fine τ grid, with DSMoE's own point starred. The paper does not say
# whether Eq. 8's n/k rescale applies at that inference, so both are drawn: with it (solid, sweep
# `no_gx`) and without it (dashed, `no_gx_unscaled`, the scale the model was trained with).

# %% tags=["parameters"]
run_dir = "../results/default"
paper_results = None  # default: dsmoe/paper_results.yaml

# %%
from pathlib import Path

import matplotlib.pyplot as plt

from dsmoe import report

run = report.find_run(run_dir)
data = report.load_run(run.dir)
paper = report.load_paper(paper_results or report.PAPER_RESULTS)
figures_dir = run.out / "figures"
sweep = data["sweep"]

# %%
if (sweep["variant"] == "dsmoe").any():
    fig = report.tau_curves(sweep, paper)
    report.save_figure(fig, figures_dir, "tau_curves")
    plt.show()

# %%
if (sweep["variant"] == "no_gx").any():
    dsmoe_point = report.overall(data["ppl"]).loc["dsmoe"]
    fig = report.no_gx_curve(sweep, dsmoe_point)
    report.save_figure(fig, figures_dir, "no_gx_curve")
    plt.show()
