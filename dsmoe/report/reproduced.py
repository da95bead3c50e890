"""The paper's qualitative claims, "reproduced: yes/no", each perplexity comparison with a paired
bootstrap 95% interval over the validation windows (`dsmoe.report.bootstrap`).

"A beats B" (lower PPL) is "yes" only when the interval of ppl(A) − ppl(B) lies entirely below 0,
"A is worse" only when it lies entirely above 0. Without per-window data a comparison is "n/a".
"""

import math

import numpy as np
import pandas as pd

from .bootstrap import PairedDiff, interpolation, paired_bootstrap, windows_of
from .run_data import overall
from .shape import w_shape_claim

COLUMNS = ["claim", "reproduced", "evidence", "ppl_a", "ppl_b", "diff", "ci_low", "ci_high"]
NO_WINDOWS = "n/a: no per-window data"
MONOTONE = "PPL against activated params is monotone in τ"
TOKENS = "PPL falls with continued-pretraining tokens"


def _line(claim, ok, evidence, result=None):
    numbers = result._asdict() if result is not None else dict.fromkeys(PairedDiff._fields, math.nan)
    return {"claim": claim, "reproduced": "n/a" if ok is None else ("yes" if ok else "no"), "evidence": evidence, **numbers}


def _interval(result):
    return f"difference {result.diff:.3g}, 95% CI [{result.ci_low:.3g}, {result.ci_high:.3g}]"


def _missing(side):
    frames = [side] if isinstance(side, pd.DataFrame) else [frame for _, frame in side]
    return any(frame.empty for frame in frames)


def _verdict(claim, a, b, names, prefix, points, a_worse=False):
    """The line of "a beats b" (interval of ppl(a) − ppl(b) below 0), or with `a_worse` of "a is worse"
    (above 0). `prefix` states the point values (`points`: ppl of a and b) that n/a lines keep."""
    if _missing(a) or _missing(b):
        return _line(claim, None, f"{NO_WINDOWS} ({' or '.join(names)}); {prefix}",
                     PairedDiff(points[0], points[1], points[0] - points[1], math.nan, math.nan))
    result = paired_bootstrap(a, b, names)
    ok = result.ci_low > 0 if a_worse else result.ci_high < 0
    return _line(claim, ok, f"{prefix}: {_interval(result)}", result)


def _rows(frame, column, value):
    """Rows of `frame` with `column` == value; an empty frame for a missing frame or column."""
    if frame is None or frame.empty or column not in frame:
        return pd.DataFrame(columns=["source", "window", "nll", "tokens", "tau"])
    return frame[frame[column] == value]


def _sweep_side(curve, curve_windows, activated_pct):
    """`(side, ppl, how)` of a τ-sweep at an activated %: interpolated between its two neighbouring τ
    rows, or its nearest τ row outside its range."""
    weights = interpolation(curve, activated_pct)
    ppl_at = curve.set_index("tau")["ppl"]
    if weights is None:
        nearest = curve.iloc[(curve["activated_params_pct"] - activated_pct).abs().argmin()]
        weights = [(1.0, float(nearest["tau"]))]
        how = f"nearest τ {nearest['tau']:g}, {nearest['activated_params_pct']:.1f}% active"
    else:
        how = f"τ-sweep interpolated between τ {weights[0][1]:g} and {weights[1][1]:g}"
    side = [(w, windows_of(curve_windows, tau=tau)) for w, tau in weights]
    return side, float(sum(w * ppl_at[tau] for w, tau in weights)), how


def _monotone_claim(sweep, sweep_windows):
    """Table 4: activated params non-increasing in τ, ppl(largest τ) − ppl(smallest τ) above 0, and no
    adjacent step whose interval lies below 0."""
    curve = _rows(sweep, "variant", "dsmoe").sort_values("tau")
    if len(curve) < 2:
        return _line(MONOTONE, None, "no DSMoE τ-sweep in this run")
    act_falls = bool((curve["activated_params_pct"].diff().dropna() <= 1e-9).all())
    first, last = curve.iloc[0], curve.iloc[-1]
    prefix = (f"τ {first['tau']:g}..{last['tau']:g}: activated params {first['activated_params_pct']:.1f}% → "
              f"{last['activated_params_pct']:.1f}% (non-increasing: {act_falls}); PPL {first['ppl']:.4g} → {last['ppl']:.4g}")
    curve_windows = _rows(sweep_windows, "variant", "dsmoe")
    at = {tau: windows_of(curve_windows, tau=float(tau)) for tau in curve["tau"]}
    if any(frame.empty for frame in at.values()):
        return _line(MONOTONE, None, f"{NO_WINDOWS} (DSMoE τ-sweep); {prefix}",
                     PairedDiff(last["ppl"], first["ppl"], last["ppl"] - first["ppl"], math.nan, math.nan))
    rise = paired_bootstrap(at[last["tau"]], at[first["tau"]], (f"τ={last['tau']:g}", f"τ={first['tau']:g}"))
    drops = []
    for lo, hi in zip(curve["tau"].iloc[:-1], curve["tau"].iloc[1:]):
        step = paired_bootstrap(at[hi], at[lo], (f"τ={hi:g}", f"τ={lo:g}"))
        if step.ci_high < 0:
            drops.append(f"PPL falls from τ {lo:g} to {hi:g}: {_interval(step)}")
    ok = act_falls and rise.ci_low > 0 and not drops
    steps = "; ".join(drops) or "no adjacent step's interval lies below 0"
    return _line(MONOTONE, ok, f"{prefix}: {_interval(rise)}; {steps}", rise)


def _no_ste_claim(ours, windows):
    claim = "DSMoE beats no-STE"
    if not {"dsmoe", "no_ste"} <= set(ours.index):
        return _line(claim, None, "dsmoe or no_ste missing from this run")
    a, b = ours.loc["dsmoe"], ours.loc["no_ste"]
    prefix = (f"DSMoE {a['ppl']:.4g} vs no-STE {b['ppl']:.4g} at {a['activated_params_pct']:.1f}% / "
              f"{b['activated_params_pct']:.1f}% active")
    return _verdict(claim, windows_of(windows, model="dsmoe"), windows_of(windows, model="no_ste"), ("dsmoe", "no_ste"),
                    prefix, (a["ppl"], b["ppl"]))


def _topk_claim(ours, sweep, sweep_windows, windows):
    """DSMoE's τ-sweep interpolated at top-k's activated %; DSMoE at its own τ outside the sweep's range."""
    claim = "DSMoE beats top-k at matched activation"
    if not {"dsmoe", "topk"} <= set(ours.index):
        return _line(claim, None, "dsmoe or topk missing from this run")
    top, point = ours.loc["topk"], ours.loc["dsmoe"]
    pct = top["activated_params_pct"]
    curve = _rows(sweep, "variant", "dsmoe")
    if interpolation(curve, pct) is not None:
        side, ppl, how = _sweep_side(curve, _rows(sweep_windows, "variant", "dsmoe"), pct)
        how = f"DSMoE {how}"
    else:
        side, ppl = windows_of(windows, model="dsmoe"), point["ppl"]
        how = f"DSMoE at its τ, {point['activated_params_pct']:.1f}% active: top-k lies outside the τ-sweep's range"
    prefix = f"at {pct:.1f}% active: DSMoE {ppl:.4g} ({how}) vs top-k {top['ppl']:.4g}"
    return _verdict(claim, side, windows_of(windows, model="topk"), ("dsmoe", "topk"), prefix, (ppl, top["ppl"]))


def _prune_claims(ours, windows):
    """Table 1: one line per pruned baseline (pruned to DSMoE's activated %): a direct paired comparison."""
    labels = [m for m in ours.index if str(m).startswith("prune_")]
    if not labels or "dsmoe" not in ours.index:
        return [_line("DSMoE beats the pruning baselines at matched activation", None,
                      "dsmoe or every prune_* baseline missing from this run")]
    a, lines = ours.loc["dsmoe"], []
    for label in labels:
        b = ours.loc[label]
        prefix = (f"DSMoE {a['ppl']:.4g} vs {label} {b['ppl']:.4g} at {a['activated_params_pct']:.1f}% / "
                  f"{b['activated_params_pct']:.1f}% active")
        lines.append(_verdict(f"DSMoE beats {label} at matched activation", windows_of(windows, model="dsmoe"),
                              windows_of(windows, model=label), ("dsmoe", label), prefix, (a["ppl"], b["ppl"])))
    return lines


def _no_gx_claim(ours, sweep, sweep_windows, windows, label, how_scaled):
    """Fig. 2: the no-G sweep `label` at DSMoE's activated % (interpolated; its nearest τ outside its range)
    against DSMoE; "yes" when the interval of ppl(no-G) − ppl(DSMoE) lies above 0."""
    claim = f"no-G ({how_scaled}) is worse at matched activation"
    no_gx = _rows(sweep, "model", label)
    if "dsmoe" not in ours.index or no_gx.empty:
        return _line(claim, None, f"dsmoe or the {label} sweep missing from this run")
    point = ours.loc["dsmoe"]
    side, ppl, how = _sweep_side(no_gx, _rows(sweep_windows, "model", label), point["activated_params_pct"])
    prefix = f"at {point['activated_params_pct']:.1f}% active: no-G {ppl:.4g} ({how}) vs DSMoE {point['ppl']:.4g}"
    return _verdict(claim, side, windows_of(windows, model="dsmoe"), (label, "dsmoe"), prefix, (ppl, point["ppl"]),
                    a_worse=True)


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


def _token_claim(milestones, milestone_windows):
    """Tables 5-6: the final model against the first milestone, "yes" when ppl(final) − ppl(first) is below 0."""
    if milestones is None or milestones.empty or "source" not in milestones:
        return _line(TOKENS, None, "no milestones in this run")
    ours = milestones[milestones["source"] == "all"].sort_values("train_tokens")
    final, kept = ours[_is_true(ours["final"])], ours[~_is_true(ours["final"])]
    if final.empty or kept.empty:
        return _line(TOKENS, None, "the run needs a milestone and its final model")
    last, first = final.iloc[-1], kept.iloc[0]
    prefix = (f"final model {last['ppl']:.4g} after {last['train_tokens']:.3g} tokens vs first milestone "
              f"{first['ppl']:.4g} after {first['train_tokens']:.3g} tokens")
    return _verdict(TOKENS, _milestone_windows(milestone_windows, last), _milestone_windows(milestone_windows, first),
                    ("the final model", f"milestone step {first['step']:g}"), prefix, (last["ppl"], first["ppl"]))


def claims(ppl, sweep, layers=None, windows=None, sweep_windows=None, milestones=None, milestone_windows=None):
    """One line per qualitative claim of the paper: reproduced yes/no, the numbers behind it, and for a
    perplexity comparison ppl_a, ppl_b, diff = ppl_a − ppl_b and its 95% interval (NaN elsewhere).

    `windows`, `sweep_windows`, `milestone_windows`: the per-window NLL of `dsmoe eval ppl | sweep |
    milestones` (collected windows.csv, sweep_windows.csv, milestone_windows.csv)."""
    ours = overall(ppl)
    lines = [_monotone_claim(sweep, sweep_windows), _no_ste_claim(ours, windows),
             _topk_claim(ours, sweep, sweep_windows, windows), *_prune_claims(ours, windows)]
    for label, how_scaled in (("no_gx", "n/k at inference"), ("no_gx_unscaled", "no n/k at inference")):
        lines.append(_no_gx_claim(ours, sweep, sweep_windows, windows, label, how_scaled))
    shaped, evidence = w_shape_claim(layers)
    lines.append(_line("W-shaped layer profile (§6.3; five equal layer bands, bands 1, 3, 5 each above bands 2 and 4)",
                       shaped, evidence))
    lines.append(_token_claim(milestones, milestone_windows))
    return pd.DataFrame(lines, columns=COLUMNS)
