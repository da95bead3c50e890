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
# # Tables 1–6 beside the paper
#
# Reads a run's collected results (`results/<run>/data/`, written by the workflow's `collect` rule)
# and writes each table as CSV and Markdown to `results/<run>/tables/` (with no run there yet, it shows
# the committed CPU study's paper level, `results/cpu-study-paper/`, and writes to a scratch folder). The paper's numbers come from
# `dsmoe/report/paper_results.yaml` (LLaMA-1B and LLaMA-7B; the embedded default uses SmolLM2-135M
# and the offline stdlib tasks, so compare trends, not values).

# %% tags=["parameters"]
run_dir = "../results/default"
paper_results = None  # default: dsmoe/paper_results.yaml

# %%
from pathlib import Path

from IPython.display import Markdown, display

from dsmoe import report
from dsmoe.report import matched

run = report.find_run(run_dir)
data = report.load_run(run.dir)
paper = report.load_paper(paper_results or report.PAPER_RESULTS)
tables_dir = run.out / "tables"
train_tokens = report.run_config(run.dir).get("train", {}).get("tokens")


def show(df, name):
    report.save_table(df, tables_dir, name)
    display(Markdown(f"**{name}**\n\n" + df.to_markdown(index=False, floatfmt=".4g")))


# %% [markdown]
# ## Table 1: perplexity and activated parameters
# `paper_*` columns: the row of the paper that each model plays (SparseGPT is played by Wanda);
# `paper_notes`: where the paper's own numbers contradict each other. Rows `drop_oracle_top<K>` (where the
# run has them, config `baselines.drop_keep_experts`): the training-free per-token top-k drop, each token
# keeping its K experts of largest output norm, at its own activation (no router, no training).

# %%
show(report.table1(data["ppl"], paper, data["drop"]), "table1")

# %% [markdown]
# ## Table 2: downstream tasks (primary metric, %)
# Columns are lm-eval tasks; the paper's columns are mapped onto them (`dsmoe.names.PAPER_TASKS`),
# and each task's metric is the one that reproduces the paper's dense rows (`table2.metric_reasons`).

# %%
show(report.table2(data["bench"], paper), "table2")

# %% [markdown]
# ## Table 3: the straight-through estimator ablation

# %%
show(report.table3(data["ppl"], data["bench"], paper), "table3")

# %% [markdown]
# ## Table 4: the τ-sweep of the trained DSMoE model

# %%
show(report.table4(data["sweep"], paper), "table4")

# %% [markdown]
# ## Tables 5–6: perplexity against continued-pretraining tokens
# This run's DSMoE model at its `eval.milestone_tokens` and at the end, then the paper's LLaMA-1B and
# LLaMA-7B (Appendix B); the curve puts each on its own axes.

# %%
table56 = report.table5_6(data["milestones"], paper)
show(table56, "table5_6")
fig = report.token_curve(table56)
report.save_figure(fig, run.out / "figures", "token_curve")

# %% [markdown]
# ## Does the reproduction hold?
# Each perplexity comparison carries a paired bootstrap 95% interval over the validation windows
# (`diff` = `ppl_a` − `ppl_b`, `ci_low`..`ci_high`; 2,000 replicates, a fixed seed): A is better
# than B only when the interval lies entirely below 0. Two models are judged only at matched activation
# (`activated_pct_a`, `activated_pct_b`; `dsmoe/report/matched.py`): "yes" only where DSMoE is better
# at equal or lower activation, "no" only where it is not better at equal or higher activation,
# "not testable" otherwise. A short run (the demo) makes no quality comparison: "not testable in the
# demo". Without per-window data (an older run) a comparison is "n/a".

# %%
claims = report.run_claims(data, train_tokens)
print(f"The rule: {matched.RULE}.")
show(claims, "claims")
for row in claims.itertuples():
    print(f"{row.claim}: reproduced: {row.reproduced}  ({row.evidence})")
