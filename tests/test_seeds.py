"""`dsmoe report seeds`: one model's seed spread across runs, on synthetic runs (config.yaml, data/ppl.csv,
data/windows.csv) against the perplexities written out plainly and a brute-force bootstrap."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from dsmoe.report.bootstrap import N_BOOT, SEED, resample_indices
from dsmoe.report.seeds import seed_table

SOURCES = {"code": 6, "prose": 4}


def write_run(root, name, seed, rng, shift=0.0, **overrides):
    """A run whose dsmoe model has random per-window NLLs (mean raised by `shift`)."""
    run = root / name
    (run / "data").mkdir(parents=True)
    config = {"run_name": name, "base_model": "tiny", "dtype": "float32", "dsmoe": {"n_experts": 4, "tau": 0.5},
              "data": {"seq_len": 8}, "train": {"tokens": 1000, "lr": 1e-4, "seed": seed}, "variants": ["dsmoe"]}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        config[section] = {**config[section], field: value} if field else value
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    windows = pd.DataFrame([{"model": "dsmoe", "variant": "dsmoe", "tau": 0.5, "source": source, "window": i,
                             "nll": rng.uniform(10, 20) + shift, "tokens": 8}
                            for source, n in SOURCES.items() for i in range(n)])
    windows.to_csv(run / "data" / "windows.csv", index=False)
    ppl = pd.DataFrame([{"model": "dsmoe", "variant": "dsmoe", "tau": 0.5, "source": "all",
                         "ppl": np.exp(windows.nll.sum() / windows.tokens.sum()), "tokens": int(windows.tokens.sum()),
                         "activated_params_pct": 60.0 + seed, "mean_active_experts": 2.0}])
    ppl.to_csv(run / "data" / "ppl.csv", index=False)
    return run, windows


def brute_force_interval(a, b):
    """ppl(a) − ppl(b) over the same stratified resamples, looped replicate by replicate."""
    indices = resample_indices(tuple(a.source), N_BOOT, SEED)
    diffs = [np.exp(a.nll.to_numpy()[col].sum() / a.tokens.to_numpy()[col].sum())
             - np.exp(b.nll.to_numpy()[col].sum() / b.tokens.to_numpy()[col].sum()) for col in indices.T]
    return np.percentile(diffs, [2.5, 97.5])


def test_seed_table_equals_the_perplexities_and_a_brute_force_interval(tmp_path):
    rng = np.random.default_rng()
    first, a = write_run(tmp_path, "level", 1234, rng)
    second, b = write_run(tmp_path, "level-seed2", 2, rng, shift=0.5, **{"eval": {"batch_size": 4}})
    table = seed_table([first, second])
    assert list(table.run) == ["level", "level-seed2"] and list(table.seed) == [1234, 2]
    ppl = [np.exp(w.nll.sum() / w.tokens.sum()) for w in (a, b)]
    np.testing.assert_allclose(table.ppl, ppl, rtol=1e-12)
    np.testing.assert_allclose(table.activated_params_pct, [1294.0, 62.0])
    assert np.isnan(table.diff_vs_first[0])
    np.testing.assert_allclose(table.diff_vs_first[1], ppl[1] - ppl[0], rtol=1e-9)
    ordered = [w.sort_values(["source", "window"]).reset_index(drop=True) for w in (b, a)]
    np.testing.assert_allclose([table.ci_low[1], table.ci_high[1]], brute_force_interval(*ordered), rtol=1e-9)


@pytest.mark.parametrize("override, named", [({"train.lr": 2e-4}, "train.lr"), ({"dsmoe.tau": 0.6}, "dsmoe.tau"),
                                             ({"data.seq_len": 16}, "data.seq_len"),
                                             ({"train_overrides": {"dsmoe": {"lr": 2e-4}}}, "train.lr")])
def test_runs_that_differ_beyond_the_seed_are_refused(tmp_path, override, named):
    rng = np.random.default_rng(0)
    first, _ = write_run(tmp_path, "a", 1, rng)
    second, _ = write_run(tmp_path, "b", 2, rng, **override)
    with pytest.raises(ValueError, match=named):
        seed_table([first, second])


def test_one_run_a_shared_seed_or_a_missing_model_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    first, _ = write_run(tmp_path, "a", 1, rng)
    same, _ = write_run(tmp_path, "b", 1, rng)
    with pytest.raises(ValueError, match="at least two runs"):
        seed_table([first])
    with pytest.raises(ValueError, match="share a train.seed"):
        seed_table([first, same])
    other, _ = write_run(tmp_path, "c", 3, rng)
    with pytest.raises(ValueError, match="no model 'topk'"):
        seed_table([first, other], model="topk")


def assert_the_cli_writes_the_first_runs_table(kind, runs, build):
    """`dsmoe report KIND --runs ...` writes tables/KIND.csv and .md of the first run: the table `build` makes."""
    subprocess.run([sys.executable, "-m", "dsmoe", "report", kind, "--runs", *map(str, runs)], check=True,
                   capture_output=True)
    written = pd.read_csv(runs[0] / "tables" / f"{kind}.csv")
    pd.testing.assert_frame_equal(written, build(runs), check_dtype=False)
    assert (runs[0] / "tables" / f"{kind}.md").is_file()


def test_the_cli_writes_the_first_runs_seed_table(tmp_path):
    rng = np.random.default_rng(1)
    runs = [write_run(tmp_path, name, seed, rng)[0] for name, seed in (("a", 1), ("b", 2))]
    assert_the_cli_writes_the_first_runs_table("seeds", runs, seed_table)
