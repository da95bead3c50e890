"""The paired bootstrap over validation windows (dsmoe.report.bootstrap) against a plain loop, and its
intervals on cases whose answer is known."""

import math
import random
import statistics

import numpy as np
import pandas as pd
import pytest

from dsmoe.report import bootstrap
from dsmoe.report.bootstrap import interpolation, paired_bootstrap, resample_indices, windows_of

SOURCES = {"code": 7, "docs": 4, "prose": 11}  # unequal window counts per source


def random_windows(rng, sources=SOURCES, shift=0.0):
    """A windows frame (source, window, nll, tokens) in shuffled row order: tokens vary per window."""
    rows = [{"source": s, "window": w, "tokens": int(rng.integers(5, 30))} for s, n in sources.items() for w in range(n)]
    df = pd.DataFrame(rows)
    df["nll"] = df["tokens"] * (rng.uniform(1.5, 3.0, len(df)) + shift)
    return df.sample(frac=1.0, random_state=int(rng.integers(1 << 30))).reset_index(drop=True)


def brute_force(a, b, draws):
    """The same statistic with a plain loop: `draws[r][source]` lists the windows replicate r draws."""
    def ppl(terms, picked):
        total = 0.0
        for weight, frame in terms:
            rows = {(s, w): (nll, tokens) for s, w, nll, tokens in frame[["source", "window", "nll", "tokens"]].values}
            nll = sum(rows[key][0] for key in picked)
            tokens = sum(rows[key][1] for key in picked)
            total += weight * math.exp(nll / tokens)
        return total

    everything = [(s, w) for s, n in SOURCES.items() for w in range(n)]
    diffs = []
    for draw in draws:
        picked = [(s, w) for s, windows in draw.items() for w in windows]
        diffs.append(ppl(a, picked) - ppl(b, picked))
    cuts = statistics.quantiles(diffs, n=40, method="inclusive")  # 2.5%, 5%, ..., 97.5%
    return ppl(a, everything) - ppl(b, everything), cuts[0], cuts[-1]


def draws_and_indices(n_boot, seed):
    """Replicate draws from random.Random, and the same draws as a windows x replicates index matrix
    (windows in (source, window) order)."""
    rand = random.Random(seed)
    draws = [{s: [rand.randrange(n) for _ in range(n)] for s, n in SOURCES.items()} for _ in range(n_boot)]
    offsets = dict(zip(sorted(SOURCES), np.cumsum([0] + [SOURCES[s] for s in sorted(SOURCES)])))
    indices = np.array([[offsets[s] + w for s in sorted(SOURCES) for w in draw[s]] for draw in draws]).T
    return draws, indices


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_a_plain_loop_on_random_windows(seed):
    rng = np.random.default_rng(seed)
    a = random_windows(rng)
    b = a.sample(frac=1.0, random_state=seed)  # the same windows in another row order, another model's NLL
    b = b.assign(nll=b["nll"] * rng.uniform(0.9, 1.1, len(b)))
    draws, indices = draws_and_indices(200, seed)
    for side_a in (a, [(0.3, a), (0.7, a.assign(nll=a["nll"] * 1.05))]):  # one model; an interpolated point
        result = paired_bootstrap(side_a, b, ("a", "b"), indices=indices)
        terms = [(1.0, side_a)] if isinstance(side_a, pd.DataFrame) else side_a
        diff, low, high = brute_force(terms, [(1.0, b)], draws)
        assert result.diff == pytest.approx(diff, rel=1e-9, abs=1e-12)
        assert result.ppl_a - result.ppl_b == pytest.approx(result.diff)
        assert (result.ci_low, result.ci_high) == pytest.approx((low, high), rel=1e-9, abs=1e-12)


def test_resampling_is_stratified_reproducible_and_chunked(monkeypatch):
    sources = np.repeat(sorted(SOURCES), [SOURCES[s] for s in sorted(SOURCES)])
    indices = resample_indices(sources, n_boot=300, seed=5)
    assert indices.shape == (len(sources), 300)
    assert (sources[indices] == sources[:, None]).all()  # every source keeps its own windows, and its count
    assert len(np.unique(indices[:, 0])) < len(sources)  # with replacement
    assert np.array_equal(indices, resample_indices(list(sources), n_boot=300, seed=5))
    assert not np.array_equal(indices, resample_indices(sources, n_boot=300, seed=6))
    with pytest.raises(ValueError, match="contiguous"):
        resample_indices(["a", "b", "a"])
    rng = np.random.default_rng(0)
    a = random_windows(rng)
    b = a.assign(nll=a["nll"] * rng.uniform(0.95, 1.05, len(a)))
    whole = paired_bootstrap(a, b)
    assert whole == paired_bootstrap(a.sample(frac=1.0, random_state=1), b)  # row order plays no part
    monkeypatch.setattr(bootstrap, "CHUNK", 50)  # a few replicates per gather
    assert paired_bootstrap(a, b) == pytest.approx(whole, rel=1e-12)


def test_identical_models_give_zero_interval():
    a = random_windows(np.random.default_rng(4))
    result = paired_bootstrap(a, a.copy())
    assert result.ppl_a == result.ppl_b and (result.diff, result.ci_low, result.ci_high) == (0.0, 0.0, 0.0)


def test_lower_nll_in_every_window_gives_interval_below_zero():
    a = random_windows(np.random.default_rng(5))
    better = a.assign(nll=a["nll"] - 0.01 * a["tokens"] * np.random.default_rng(6).uniform(0.1, 1.0, len(a)))
    result = paired_bootstrap(better, a)
    assert result.diff < 0 and result.ci_low <= result.diff <= result.ci_high < 0


def test_interval_coverage_on_a_synthetic_population():
    """Windows drawn from a population whose ppl difference is known: the 95% interval covers it about 95% of the time."""
    rng = np.random.default_rng(7)
    mu, delta, tokens, n = 2.0, 0.03, 20, 30
    truth = math.exp(mu + delta) - math.exp(mu)
    frame = pd.DataFrame({"source": np.repeat(["x", "y"], n), "window": np.tile(np.arange(n), 2), "tokens": tokens})
    covered, trials = 0, 200
    for _ in range(trials):
        shared = rng.normal(0.0, 0.3, 2 * n)  # window difficulty, common to both models (the pairing)
        a = frame.assign(nll=tokens * (mu + delta + shared + rng.normal(0.0, 0.1, 2 * n)))
        b = frame.assign(nll=tokens * (mu + shared))
        result = paired_bootstrap(a, b, n_boot=400)
        covered += result.ci_low <= truth <= result.ci_high
    assert 0.88 <= covered / trials <= 0.99, covered


def test_mismatched_windows_are_refused_naming_the_models():
    a = random_windows(np.random.default_rng(8))
    with pytest.raises(ValueError, match="dsmoe and no_ste.*do not match"):
        paired_bootstrap(a, a.iloc[1:], ("dsmoe", "no_ste"))
    with pytest.raises(ValueError, match="dsmoe and topk"):
        paired_bootstrap(a, a.assign(tokens=a["tokens"] + 1), ("dsmoe", "topk"))
    shifted = a.assign(window=a["window"] + 1)
    with pytest.raises(ValueError, match="no_gx and dsmoe"):
        paired_bootstrap([(0.5, a), (0.5, shifted)], a, ("no_gx", "dsmoe"))


def test_interpolation_weights_and_window_selection():
    curve = pd.DataFrame({"tau": [0.3, 0.5, 0.7], "activated_params_pct": [65.0, 60.0, 55.0], "ppl": [9.0, 10.0, 12.0]})
    for pct in (55.0, 57.5, 60.0, 62.5, 65.0):
        weights = interpolation(curve, pct)
        by_tau = curve.set_index("tau")["ppl"]
        assert sum(w for w, _ in weights) == pytest.approx(1.0)
        assert sum(w * by_tau[t] for w, t in weights) == pytest.approx(np.interp(pct, [55, 60, 65], [12, 10, 9]))
    assert interpolation(curve, 62.5) == [(0.5, 0.5), (0.5, 0.3)]
    assert interpolation(curve, 54.9) is None and interpolation(curve, 65.1) is None
    windows = pd.DataFrame({"model": ["m", "m", "m", "n"], "tau": [0.5, 0.5, 0.7, 0.5], "source": ["b", "a", "a", "a"],
                            "window": [0, 1, 0, 0], "nll": [1.0, 2.0, 3.0, 4.0], "tokens": [1, 1, 1, 1]})
    picked = windows_of(windows, model="m", tau=0.5 + 1e-12)
    assert picked[["source", "window"]].values.tolist() == [["a", 1], ["b", 0]]
    assert windows_of(None, model="m").empty
