"""The paper's qualitative claims, "reproduced: yes / no / not testable", each perplexity comparison
with a paired bootstrap 95% interval over the validation windows (`dsmoe.report.bootstrap`).

"A beats B" (lower PPL) counts as better only when the interval of ppl(A) − ppl(B) lies entirely
below 0, "A is worse" only when it lies entirely above 0. A comparison of two models then gives
"yes", "no" or "not testable" by the matched-activation rule of `dsmoe.report.matched`, and each line
carries both activations (activated_pct_a, activated_pct_b). Without per-window data a comparison is "n/a".
"""

import math
from typing import NamedTuple

import numpy as np
import pandas as pd

from .bootstrap import PairedDiff, interpolation, log_blend, paired_bootstrap, windows_of
from .matched import (NOT_TESTABLE, RULE, TOLERANCE_PCT, short_run, verdict,  # noqa: F401 (RULE: the notebook states it)
                      why)
from .run_data import overall
from .shape import w_shape_claim

COLUMNS = ["claim", "reproduced", "evidence", "ppl_a", "ppl_b", "activated_pct_a", "activated_pct_b", "diff", "ci_low",
           "ci_high", "regime"]
NO_WINDOWS = "n/a: no per-window data"
MONOTONE = "PPL against activated params is monotone in τ"
DROP_CLAIM = "DSMoE beats the training-free top-k drop at matched activation"
TOKENS = "PPL falls with continued-pretraining tokens"


class Side(NamedTuple):
    """One side of a two-model comparison: its label, windows (a frame, or [(weight, frame)] for an
    interpolated sweep point), perplexity, activated params (%) and how it was read (e.g. a τ-sweep)."""

    label: str
    windows: object
    ppl: float
    pct: float
    how: str = ""


def _line(claim, outcome, evidence, result=None, pcts=(math.nan, math.nan)):
    numbers = result._asdict() if result is not None else dict.fromkeys(PairedDiff._fields, math.nan)
    return {"claim": claim, "reproduced": outcome, "evidence": evidence, "activated_pct_a": pcts[0],
            "activated_pct_b": pcts[1], **numbers}


def _yes_no(ok):
    return "n/a" if ok is None else ("yes" if ok else "no")


def _interval(result):
    return f"difference {result.diff:.3g}, 95% CI [{result.ci_low:.3g}, {result.ci_high:.3g}]"


def _missing(side):
    frames = [side] if isinstance(side, pd.DataFrame) else [frame for _, frame in side]
    return any(frame.empty for frame in frames)


def _compare(claim, ours, other, short=None, ours_first=True):
    """The line of "`ours` beats `other`" under the matched-activation rule (`dsmoe.report.matched`).

    `ours_first`: ppl_a is ours (the claim reads "ours beats other"); else ppl_a is the other's (the
    claim reads "other is worse"). `short`: the reason no verdict is given (a short run, a side out of
    range); the numbers stay for reading."""
    a, b = (ours, other) if ours_first else (other, ours)
    text = f"{a.label} {a.ppl:.4g}{a.how} vs {b.label} {b.ppl:.4g}{b.how}"
    pcts = (a.pct, b.pct)
    if _missing(a.windows) or _missing(b.windows):
        return _line(claim, "n/a", f"{NO_WINDOWS} ({a.label} or {b.label}); {text}",
                     PairedDiff(a.ppl, b.ppl, a.ppl - b.ppl, math.nan, math.nan), pcts)
    result = paired_bootstrap(a.windows, b.windows, (a.label, b.label))
    better = result.ci_high < 0 if ours_first else result.ci_low > 0
    outcome = verdict(better, ours.pct, other.pct)
    evidence = f"{text}: {_interval(result)}; {why(outcome, better, ours.pct, other.pct, name=ours.label.split(' (')[0])}"
    if short:
        outcome, evidence = NOT_TESTABLE, f"{short}; {evidence}"
    return _line(claim, outcome, evidence, result, pcts)


def _rows(frame, column, value):
    """Rows of `frame` with `column` == value; an empty frame for a missing frame or column."""
    if frame is None or frame.empty or column not in frame:
        return pd.DataFrame(columns=["source", "window", "nll", "tokens", "tau"])
    return frame[frame[column] == value]


def _sweep_side(label, curve, curve_windows, activated_pct):
    """The `Side` of a τ-sweep at an activated %: interpolated between its two neighbouring τ rows
    (matched), or its nearest τ row outside its range, at that row's own activation."""
    weights = interpolation(curve, activated_pct)
    ppl_at = curve.set_index("tau")["ppl"]
    if weights is None:
        nearest = curve.iloc[(curve["activated_params_pct"] - activated_pct).abs().argmin()]
        weights, pct = [(1.0, float(nearest["tau"]))], float(nearest["activated_params_pct"])
        how = f" (nearest τ {nearest['tau']:g}: outside the τ-sweep's range)"
    else:
        pct = float(activated_pct)
        how = f" (τ-sweep interpolated between τ {weights[0][1]:g} and {weights[1][1]:g})"
    side = [(w, windows_of(curve_windows, tau=tau)) for w, tau in weights]
    return Side(label, side, float(sum(w * ppl_at[tau] for w, tau in weights)), pct, how)


def _model_side(ours, windows, model, label=None):
    row = ours.loc[model]
    return Side(label or model, windows_of(windows, model=model), float(row["ppl"]), float(row["activated_params_pct"]))


def _monotone_claim(sweep, sweep_windows):
    """Table 4: activated params non-increasing in τ, ppl(largest τ) − ppl(smallest τ) above 0, and no
    adjacent step whose interval lies below 0."""
    curve = _rows(sweep, "variant", "dsmoe").sort_values("tau")
    if len(curve) < 2:
        return _line(MONOTONE, "n/a", "no DSMoE τ-sweep in this run")
    act_falls = bool((curve["activated_params_pct"].diff().dropna() <= 1e-9).all())
    first, last = curve.iloc[0], curve.iloc[-1]
    prefix = (f"τ {first['tau']:g}..{last['tau']:g}: activated params {first['activated_params_pct']:.1f}% → "
              f"{last['activated_params_pct']:.1f}% (non-increasing: {act_falls}); PPL {first['ppl']:.4g} → {last['ppl']:.4g}")
    curve_windows = _rows(sweep_windows, "variant", "dsmoe")
    at = {tau: windows_of(curve_windows, tau=float(tau)) for tau in curve["tau"]}
    if any(frame.empty for frame in at.values()):
        return _line(MONOTONE, "n/a", f"{NO_WINDOWS} (DSMoE τ-sweep); {prefix}",
                     PairedDiff(last["ppl"], first["ppl"], last["ppl"] - first["ppl"], math.nan, math.nan))
    rise = paired_bootstrap(at[last["tau"]], at[first["tau"]], (f"τ={last['tau']:g}", f"τ={first['tau']:g}"))
    drops = []
    for lo, hi in zip(curve["tau"].iloc[:-1], curve["tau"].iloc[1:]):
        step = paired_bootstrap(at[hi], at[lo], (f"τ={hi:g}", f"τ={lo:g}"))
        if step.ci_high < 0:
            drops.append(f"PPL falls from τ {lo:g} to {hi:g}: {_interval(step)}")
    ok = act_falls and rise.ci_low > 0 and not drops
    steps = "; ".join(drops) or "no adjacent step's interval lies below 0"
    return _line(MONOTONE, _yes_no(ok), f"{prefix}: {_interval(rise)}; {steps}", rise)


def _no_ste_claim(ours, windows, short):
    claim = "DSMoE beats no-STE"
    if not {"dsmoe", "no_ste"} <= set(ours.index):
        return _line(claim, "n/a", "dsmoe or no_ste missing from this run")
    return _compare(claim, _model_side(ours, windows, "dsmoe", "DSMoE"), _model_side(ours, windows, "no_ste", "no-STE"),
                    short)


def _topk_claim(ours, sweep, sweep_windows, windows, short):
    """DSMoE's τ-sweep at top-k's activated % (interpolated; its nearest τ outside its range), or DSMoE
    at its own τ where the run has no sweep."""
    claim = "DSMoE beats top-k at matched activation"
    if not {"dsmoe", "topk"} <= set(ours.index):
        return _line(claim, "n/a", "dsmoe or topk missing from this run")
    top = _model_side(ours, windows, "topk", "top-k")
    curve = _rows(sweep, "variant", "dsmoe")
    if curve.empty:
        dsmoe = _model_side(ours, windows, "dsmoe", "DSMoE")
    else:
        dsmoe = _sweep_side("DSMoE", curve, _rows(sweep_windows, "variant", "dsmoe"), top.pct)
    return _compare(claim, dsmoe, top, short)


def _prune_claims(ours, windows, short):
    """Table 1: one line per pruned baseline (pruned to DSMoE's activated %): a direct paired comparison."""
    labels = [m for m in ours.index if str(m).startswith("prune_")]
    if not labels or "dsmoe" not in ours.index:
        return [_line("DSMoE beats the pruning baselines at matched activation", "n/a",
                      "dsmoe or every prune_* baseline missing from this run")]
    dsmoe = _model_side(ours, windows, "dsmoe", "DSMoE")
    return [_compare(f"DSMoE beats {label} at matched activation", dsmoe, _model_side(ours, windows, label), short)
            for label in labels]


def _no_gx_claim(ours, sweep, sweep_windows, windows, label, how_scaled, short):
    """Fig. 2: the no-G sweep `label` at DSMoE's activated % (interpolated; its nearest τ outside its
    range) against DSMoE; ppl_a is no-G's, and "yes" needs the interval of ppl(no-G) − ppl(DSMoE) above 0."""
    claim = f"no-G ({how_scaled}) is worse at matched activation"
    no_gx = _rows(sweep, "model", label)
    if "dsmoe" not in ours.index or no_gx.empty:
        return _line(claim, "n/a", f"dsmoe or the {label} sweep missing from this run")
    dsmoe = _model_side(ours, windows, "dsmoe", "DSMoE")
    other = _sweep_side("no-G", no_gx, _rows(sweep_windows, "model", label), dsmoe.pct)
    return _compare(claim, dsmoe, other, short, ours_first=False)


def _drop_curve(drop):
    """The top-k drop's rows of a collected drop.csv (rule topk), one per K; an empty frame where it has none."""
    if drop is None or drop.empty or not {"rule", "keep_experts", "ppl_all", "activated_params_pct"} <= set(drop):
        return pd.DataFrame(columns=["keep_experts", "ppl_all", "activated_params_pct"])
    rows = drop[drop["rule"] == "topk"].drop_duplicates("keep_experts", keep="last")
    return rows.astype({"keep_experts": float, "ppl_all": float, "activated_params_pct": float})


def _drop_side(curve, drop_windows, weights, pct):
    """The `Side` of the top-k drop at `pct`: per window, its NLL blended between the K rows of `weights`
    (`[(weight, K)]`, one or two): linear in log-perplexity (`bootstrap.log_blend`)."""
    ppl_at = curve.set_index("keep_experts")["ppl_all"]
    frames = [(w, windows_of(_rows(drop_windows, "rule", "topk"), keep_experts=k)) for w, k in weights]
    ks = [f"{k:g}" for _, k in weights]
    windows = frames if _missing(frames) else log_blend(frames, (f"top-k drop K={ks[0]}", f"top-k drop K={ks[-1]}"))
    ppl = math.exp(sum(w * math.log(ppl_at[k]) for w, k in weights))
    how = f" (K {ks[0]})" if len(ks) == 1 else f" (interpolated in log-PPL between K {ks[0]} and {ks[1]})"
    return Side("top-k drop", windows, ppl, float(pct), how)


def _drop_claim(ours, windows, drop, drop_windows, short):
    """DSMoE at its own τ against the training-free top-k drop at DSMoE's activated %, interpolated between
    the two K that bracket it (matched); outside the K range not testable, the nearest K's numbers kept."""
    curve = _drop_curve(drop)
    if "dsmoe" not in ours.index or curve.empty:
        return _line(DROP_CLAIM, "n/a", "dsmoe or the top-k drop (baselines.drop_keep_experts) missing from this run")
    dsmoe = _model_side(ours, windows, "dsmoe", "DSMoE")
    weights = interpolation(curve, dsmoe.pct, key="keep_experts")
    if weights is not None:
        return _compare(DROP_CLAIM, dsmoe, _drop_side(curve, drop_windows, weights, dsmoe.pct), short)
    pcts = curve.set_index("keep_experts")["activated_params_pct"]
    nearest = (pcts - dsmoe.pct).abs().idxmin()
    outside = (f"{NOT_TESTABLE}: DSMoE's {dsmoe.pct:.1f}% activated params lies outside the top-k drop's range, "
               f"{pcts.min():.1f}% (K {pcts.idxmin():g}) to {pcts.max():.1f}% (K {pcts.idxmax():g})")
    side = _drop_side(curve, drop_windows, [(1.0, nearest)], pcts[nearest])
    return _compare(DROP_CLAIM, dsmoe, side, "; ".join(filter(None, [short, outside])))


def _is_true(values):
    return values.astype(str).str.lower() == "true"


def _milestone_windows(milestone_windows, row):
    """The windows of one milestones.csv model: the final one, or the milestone at `row`'s step."""
    if milestone_windows is None or milestone_windows.empty:
        return pd.DataFrame(columns=["source", "window", "nll", "tokens"])
    final = _is_true(milestone_windows["final"])
    if _is_true(pd.Series([row["final"]])).iloc[0]:
        return milestone_windows[final]
    return milestone_windows[~final & np.isclose(milestone_windows["step"].astype(float), float(row["step"]))]


def _token_claim(milestones, milestone_windows, short):
    """Tables 5-6: the final model against the earliest milestone at matched activation (within
    `TOLERANCE_PCT` points; else the first milestone), "yes" when ppl(final) − ppl(milestone) is below 0,
    under the matched-activation rule (the final model in DSMoE's place)."""
    if milestones is None or milestones.empty or "source" not in milestones:
        return _line(TOKENS, "n/a", "no milestones in this run")
    ours = milestones[milestones["source"] == "all"].sort_values("train_tokens")
    final, kept = ours[_is_true(ours["final"])], ours[~_is_true(ours["final"])]
    if final.empty or kept.empty:
        return _line(TOKENS, "n/a", "the run needs a milestone and its final model")
    last = final.iloc[-1]
    matched = kept[(kept["activated_params_pct"] - last["activated_params_pct"]).abs() <= TOLERANCE_PCT]
    other = ("first milestone", kept.iloc[0]) if matched.empty or matched.index[0] == kept.index[0] else \
        ("earliest milestone at matched activation", matched.iloc[0])
    sides = [Side(name, _milestone_windows(milestone_windows, row), float(row["ppl"]),
                  float(row.get("activated_params_pct", math.nan)), f" after {row['train_tokens']:.3g} tokens")
             for name, row in (("final model", last), other)]
    return _compare(TOKENS, *sides, short)


def regime(ours, train_tokens):
    """Where a run's claims hold: the training tokens per model and DSMoE's activation at its τ."""
    budget = "training tokens unknown" if train_tokens is None else f"{train_tokens:,.0f} training tokens per model"
    if "dsmoe" not in ours.index:
        return budget
    row = ours.loc["dsmoe"]
    return (f"{budget}; DSMoE at {row['mean_active_experts']:.2f} experts per token "
            f"({row['activated_params_pct']:.1f}% of params)")


def claims(ppl, sweep, layers=None, windows=None, sweep_windows=None, milestones=None, milestone_windows=None,
           train_tokens=None, drop=None, drop_windows=None):
    """One line per qualitative claim of the paper: reproduced yes/no/not testable/n/a, the numbers
    behind it, and for a perplexity comparison ppl_a, ppl_b, each side's activated params (%),
    diff = ppl_a − ppl_b and its 95% interval (NaN elsewhere), and the regime all lines hold in (`regime`).
    Two-model comparisons follow `dsmoe.report.matched` (its `RULE`).

    `windows`, `sweep_windows`, `milestone_windows`, `drop_windows`: the per-window NLL of `dsmoe eval
    ppl | sweep | milestones`, `dsmoe baseline drop` (collected windows.csv, sweep_windows.csv,
    milestone_windows.csv, drop_windows.csv); `drop`: the collected drop.csv. `train_tokens`: the run's
    continued-pretraining tokens per model (train.tokens); below `matched.MIN_TOKENS` the quality
    comparisons are not testable (the demo)."""
    ours, short = overall(ppl), short_run(train_tokens)
    lines = [_monotone_claim(sweep, sweep_windows), _no_ste_claim(ours, windows, short),
             _topk_claim(ours, sweep, sweep_windows, windows, short), *_prune_claims(ours, windows, short),
             _drop_claim(ours, windows, drop, drop_windows, short)]
    for label, how_scaled in (("no_gx", "n/k at inference"), ("no_gx_unscaled", "no n/k at inference")):
        lines.append(_no_gx_claim(ours, sweep, sweep_windows, windows, label, how_scaled, short))
    shaped, evidence = w_shape_claim(layers)
    lines.append(_line("W-shaped layer profile (§6.3; five equal layer bands, bands 1, 3, 5 each above bands 2 and 4)",
                       _yes_no(shaped), evidence))
    lines.append(_token_claim(milestones, milestone_windows, short))
    return pd.DataFrame(lines, columns=COLUMNS).assign(regime=regime(ours, train_tokens))


def run_claims(data, train_tokens=None):
    """`claims` of a run's collected data (`report.load_run`: every frame the claims read)."""
    return claims(data["ppl"], data["sweep"], data["layers"], windows=data["windows"],
                  sweep_windows=data["sweep_windows"], milestones=data["milestones"],
                  milestone_windows=data["milestone_windows"], train_tokens=train_tokens, drop=data["drop"],
                  drop_windows=data["drop_windows"])
