"""Which way a gap moves with tokens: two models compared in runs that differ only in their token budget
(`dsmoe report budget`).

Each run compares DSMoE with another model of the same run (SparseGPT pruned to that run's DSMoE
activation, by default) window by window, as its claims do: ppl(DSMoE) − ppl(other) with a paired
bootstrap interval (`dsmoe.report.bootstrap`). The rows, one per run, put those gaps side by side.
Runs whose settings of either model (base model, dtype, the dsmoe and data sections, the model's train
section) differ in anything but `train.tokens` and the train keys that only log or checkpoint are refused:
their gaps would differ for another reason than the budget. The baselines section is not compared.
"""

from pathlib import Path

import pandas as pd

from .bootstrap import paired_bootstrap, windows_of
from .matched import TOLERANCE_PCT
from .run_data import load_run, overall
from .seeds import check_same_but, model_point

COLUMNS = ["run", "train_tokens", "model", "activated_params_pct", "ppl", "other", "other_activated_params_pct",
           "other_ppl", "matched", "diff", "ci_low", "ci_high"]


def budget_table(runs, model="dsmoe", other="prune_sparsegpt"):
    """One row per run, ordered by its train.tokens: `model` and `other`, each at its activated params (%)
    and perplexity; matched (activations within `TOLERANCE_PCT` points); ppl(model) − ppl(other) and the 95%
    paired bootstrap interval of that difference over the run's validation windows."""
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise ValueError("a budget comparison needs at least two runs")
    tokens = check_same_but(runs, "tokens", model=model)
    check_same_but(runs, "tokens", model=other)  # its train section too (a variant's train_overrides)
    rows = []
    for run, budget in sorted(zip(runs, tokens), key=lambda pair: pair[1]):
        data = load_run(run)
        ours = overall(data["ppl"])
        (pct, ppl), (other_pct, other_ppl) = model_point(ours, run, model), model_point(ours, run, other)
        diff = paired_bootstrap(windows_of(data["windows"], model=model), windows_of(data["windows"], model=other),
                                (model, other))
        rows.append({"run": run.name, "train_tokens": budget, "model": model, "activated_params_pct": pct, "ppl": ppl,
                     "other": other, "other_activated_params_pct": other_pct, "other_ppl": other_ppl,
                     "matched": abs(pct - other_pct) <= TOLERANCE_PCT, "diff": diff.diff, "ci_low": diff.ci_low,
                     "ci_high": diff.ci_high})
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


__all__ = ["budget_table"]
