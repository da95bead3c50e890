"""Paired bootstrap intervals for perplexity differences over validation windows.

Every model of a run is evaluated on the same validation windows (`windows.csv`: source, window, nll,
tokens), so two models are compared window by window: a replicate resamples the windows with
replacement, each source keeping its window count (stratified), and applies the same resampled
windows to both models (paired). Its statistic is ppl = exp(Σ nll / Σ tokens) over the resampled
windows, for each model, and their difference. A side of a comparison may also be a weighted sum of
ppls, each over the same replicate: a τ-sweep curve interpolated between two of its τ rows; or one
frame of per-window NLL blended between two rows (`log_blend`): the top-k drop interpolated in
log-perplexity between two K.
"""

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import pandas as pd

N_BOOT = 2000  # replicates
SEED = 0  # fixed, so that tables are reproducible
LEVEL = 95  # percent: the interval is the 2.5 and 97.5 percentiles of the replicate differences
CHUNK = 4_000_000  # index-matrix entries gathered at once (windows x replicates per chunk)


class PairedDiff(NamedTuple):
    """ppl_a − ppl_b on the full sample, and its bootstrap interval."""

    ppl_a: float
    ppl_b: float
    diff: float
    ci_low: float
    ci_high: float


def windows_of(windows, **match):
    """The rows of a windows frame whose columns equal the given values (floats: np.isclose), sorted by
    (source, window); e.g. `windows_of(sweep_windows, model="dsmoe", tau=0.3)`."""
    if windows is None or windows.empty:
        return pd.DataFrame(columns=["source", "window", "nll", "tokens"])
    mask = np.ones(len(windows), dtype=bool)
    for column, value in match.items():
        values = windows[column]
        mask &= np.isclose(values.astype(float), value) if isinstance(value, float) else (values == value).to_numpy()
    return windows[mask].sort_values(["source", "window"]).reset_index(drop=True)


@lru_cache(maxsize=8)
def _stratified(counts, n_boot, seed):
    rng = np.random.default_rng(seed)
    dtype = np.int32 if sum(counts) < 2**31 else np.int64
    indices = np.empty((sum(counts), n_boot), dtype=dtype)
    start = 0
    for n in counts:
        indices[start:start + n] = start + rng.integers(0, n, size=(n, n_boot))
        start += n
    indices.flags.writeable = False
    return indices


def resample_indices(sources, n_boot=N_BOOT, seed=SEED):
    """A windows x replicates index matrix: column b resamples, with replacement, each source's windows
    among themselves. `sources`: the source of each window, each source's windows contiguous."""
    sources = np.asarray(sources)
    starts = np.flatnonzero(np.r_[True, sources[1:] != sources[:-1]])
    if len(set(sources[starts])) != len(starts):
        raise ValueError("each source's windows must be contiguous (sort the windows by source)")
    return _stratified(tuple(np.diff(np.r_[starts, len(sources)]).tolist()), n_boot, seed)


def interpolation(curve, activated_pct, key="tau"):
    """`[(weight, tau), (weight, tau)]`: the two neighbouring τ rows of a sweep `curve` around
    `activated_pct`, weighted linearly in activated params % (as np.interp); None outside its range.
    `key`: the column that names a row (τ; keep_experts for the top-k drop)."""
    curve = curve.sort_values("activated_params_pct")
    x, taus = curve["activated_params_pct"].to_numpy(float), curve[key].to_numpy(float)
    if len(x) == 0 or not x[0] <= activated_pct <= x[-1]:
        return None
    hi = max(int(np.searchsorted(x, activated_pct)), 1) if len(x) > 1 else 0
    lo = max(hi - 1, 0)
    weight = (activated_pct - x[lo]) / (x[hi] - x[lo]) if x[hi] > x[lo] else 1.0
    return [(1.0 - weight, float(taus[lo])), (weight, float(taus[hi]))]


def log_blend(terms, names=("A", "B")):
    """One windows frame whose nll is Σ weight × nll of `terms` (`[(weight, frame)]`, the same windows):
    over any resample its ppl is exp of the weighted log-ppls, an interpolation in log-perplexity."""
    sources, arrays = _aligned([frame for _, frame in terms], names)
    first = terms[0][1].sort_values(["source", "window"]).reset_index(drop=True)
    nll = sum(weight * term_nll for (weight, _), (term_nll, _) in zip(terms, arrays))
    return pd.DataFrame({"source": sources, "window": first["window"].to_numpy(), "nll": nll,
                         "tokens": first["tokens"].to_numpy()})


def _terms(side):
    """A side of a comparison as [(weight, windows frame)]: one frame is [(1, frame)]."""
    return [(1.0, side)] if isinstance(side, pd.DataFrame) else list(side)


def _aligned(frames, names):
    """Each frame's (nll, tokens) arrays in (source, window) order, checked to be the same windows."""
    frames = [f.sort_values(["source", "window"]).reset_index(drop=True) for f in frames]
    first = frames[0]
    for frame in frames[1:]:
        same = len(frame) == len(first) and (frame[["source", "window"]].to_numpy() == first[["source", "window"]].to_numpy()).all()
        if not same or not np.array_equal(frame["tokens"].to_numpy(), first["tokens"].to_numpy()):
            raise ValueError(f"{names[0]} and {names[1]}: their validation windows do not match ({len(first)} against "
                             f"{len(frame)} windows; the same (source, window) pairs with the same token counts are needed)")
    if first.empty:
        raise ValueError(f"{names[0]} and {names[1]}: no validation windows to compare")
    return first["source"].to_numpy(), [(f["nll"].to_numpy(float), f["tokens"].to_numpy(float)) for f in frames]


def _replicate_ppls(arrays, indices):
    """ppl of each (nll, tokens) pair over each replicate column of `indices`: len(arrays) x replicates."""
    out = np.empty((len(arrays), indices.shape[1]))
    step = max(1, CHUNK // max(1, len(indices)))
    for start in range(0, indices.shape[1], step):  # chunks of replicates, each gathered at once
        block = indices[:, start:start + step]
        for j, (nll, tokens) in enumerate(arrays):
            out[j, start:start + step] = np.exp(nll[block].sum(axis=0) / tokens[block].sum(axis=0))
    return out


def paired_bootstrap(a, b, names=("A", "B"), n_boot=N_BOOT, seed=SEED, indices=None):
    """`PairedDiff` of ppl(a) − ppl(b) with a paired, source-stratified bootstrap 95% interval.

    `a`, `b`: a windows frame (source, window, nll, tokens) of one model, or `[(weight, frame)]` for a
    weighted sum of ppls (an interpolated sweep point). `names` label the two sides in errors.
    `indices` (windows x replicates, windows in (source, window) order) replaces the resampling."""
    terms_a, terms_b = _terms(a), _terms(b)
    sources, arrays = _aligned([frame for _, frame in terms_a + terms_b], names)
    weights_a = np.array([w for w, _ in terms_a] + [0.0] * len(terms_b))
    weights_b = np.array([0.0] * len(terms_a) + [w for w, _ in terms_b])
    full = np.array([np.exp(nll.sum() / tokens.sum()) for nll, tokens in arrays])
    replicates = _replicate_ppls(arrays, resample_indices(sources, n_boot, seed) if indices is None else indices)
    diffs = weights_a @ replicates - weights_b @ replicates
    low, high = np.percentile(diffs, [(100 - LEVEL) / 2, (100 + LEVEL) / 2])
    ppl_a, ppl_b = float(weights_a @ full), float(weights_b @ full)
    return PairedDiff(ppl_a, ppl_b, ppl_a - ppl_b, float(low), float(high))
