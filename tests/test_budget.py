"""`dsmoe report budget`: DSMoE against another model across runs that differ only in train.tokens, on
synthetic runs, against the perplexities written out plainly and a brute-force bootstrap (tests/test_seeds.py)."""

import numpy as np
import pandas as pd
import pytest
import yaml

from dsmoe.report.budget import budget_table
from test_seeds import assert_the_cli_writes_the_first_runs_table, brute_force_interval

SOURCES = {"code": 6, "prose": 4}


def write_run(root, name, tokens, rng, pct=(80.0, 80.5), **train):
    """A run with a dsmoe and a prune_sparsegpt model, each with random per-window NLLs."""
    run = root / name
    (run / "data").mkdir(parents=True)
    config = {"run_name": name, "base_model": "tiny", "dtype": "float32", "dsmoe": {"n_experts": 4, "tau": 0.5},
              "data": {"seq_len": 8}, "train": {"tokens": tokens, "lr": 1e-4, "seed": 1, **train}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    frames = {model: pd.DataFrame([{"model": model, "variant": model, "tau": 0.5, "source": source, "window": i,
                                    "nll": rng.uniform(10, 20), "tokens": 8}
                                   for source, n in SOURCES.items() for i in range(n)])
              for model in ("dsmoe", "prune_sparsegpt")}
    pd.concat(frames.values()).to_csv(run / "data" / "windows.csv", index=False)
    pd.DataFrame([{"model": model, "variant": model, "tau": 0.5, "source": "all", "ppl": np.exp(w.nll.sum() / w.tokens.sum()),
                   "tokens": int(w.tokens.sum()), "activated_params_pct": p, "mean_active_experts": 2.0}
                  for (model, w), p in zip(frames.items(), pct)]).to_csv(run / "data" / "ppl.csv", index=False)
    return run, frames


def test_budget_table_equals_the_perplexities_and_a_brute_force_interval(tmp_path):
    rng = np.random.default_rng()
    long, long_frames = write_run(tmp_path, "level-3x", 3000, rng, pct=(70.0, 75.0), checkpoint_every=60)
    short, short_frames = write_run(tmp_path, "level", 1000, rng)
    table = budget_table([long, short])  # rows ordered by budget
    assert list(table.run) == ["level", "level-3x"] and list(table.train_tokens) == [1000, 3000]
    assert list(table.matched) == [True, False]  # 0.5 and 5 points apart (tolerance 2)
    for i, frames in enumerate((short_frames, long_frames)):
        ours, other = (frames[m].sort_values(["source", "window"]).reset_index(drop=True) for m in ("dsmoe", "prune_sparsegpt"))
        ppl = [np.exp(w.nll.sum() / w.tokens.sum()) for w in (ours, other)]
        np.testing.assert_allclose([table.ppl[i], table.other_ppl[i], table["diff"][i]], [*ppl, ppl[0] - ppl[1]], rtol=1e-9)
        np.testing.assert_allclose([table.ci_low[i], table.ci_high[i]], brute_force_interval(ours, other), rtol=1e-9)


@pytest.mark.parametrize("train, named", [({"lr": 2e-4}, "train.lr"), ({"seed": 2}, "train.seed")])
def test_runs_that_differ_beyond_the_budget_are_refused(tmp_path, train, named):
    rng = np.random.default_rng(0)
    first, _ = write_run(tmp_path, "a", 1000, rng)
    second, _ = write_run(tmp_path, "b", 3000, rng, **train)
    with pytest.raises(ValueError, match=named):
        budget_table([first, second])
    same, _ = write_run(tmp_path, "c", 1000, rng)
    with pytest.raises(ValueError, match=r"share a train.tokens"):
        budget_table([first, same])
    with pytest.raises(ValueError, match="no model 'topk'"):
        budget_table([first, write_run(tmp_path, "d", 2000, rng)[0]], other="topk")


def test_the_cli_writes_the_first_runs_budget_table(tmp_path):
    rng = np.random.default_rng(1)
    runs = [write_run(tmp_path, name, tokens, rng)[0] for name, tokens in (("a", 1000), ("b", 3000))]
    assert_the_cli_writes_the_first_runs_table("budget", runs, budget_table)
