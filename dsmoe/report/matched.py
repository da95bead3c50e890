"""The rule every two-model claim follows: a verdict only at matched activation, or where the
comparison is one-sided enough to decide it anyway.

A claim "DSMoE beats B" compares DSMoE's perplexity with B's, each at its own share of activated
parameters (% of its model's total). Its paired bootstrap interval says whether DSMoE is better
(the interval of ppl(DSMoE) − ppl(B) lies below 0) or not. Then:

- "yes" only where DSMoE is better while it activates no more than B (at most `TOLERANCE_PCT`
  points more): fewer parameters and a lower perplexity;
- "no" only where DSMoE is not better while it activates no fewer than B (at most `TOLERANCE_PCT`
  points fewer): as many parameters or more, and no gain;
- "not testable" otherwise: better with more parameters, or not better with fewer. The line names
  both activations.

A τ-sweep side is interpolated between its two neighbouring τ rows at the other side's activation
(linear in activated params, as `dsmoe.report.bootstrap.interpolation`), so that inside the sweep's
range the two sides are matched exactly; outside it the sweep's nearest τ row stands at its own
activation and the rule above decides.
The training-free top-k drop is interpolated the same way between the two K rows that bracket DSMoE's
activation, but in log-perplexity, window by window (`dsmoe.report.bootstrap.log_blend`); outside its
K range the claim is not testable (the nearest K's numbers are kept for reading).

A short run says nothing about quality: where the run trains fewer than `MIN_TOKENS` tokens per
model (`train.tokens`, the demo's budget), every quality comparison is "not testable in the demo",
with its numbers and interval kept for reading.
"""

import math

TOLERANCE_PCT = 2.0  # points of activated params within which two models count as matched
MIN_TOKENS = 100_000  # continued-pretraining tokens per model below which quality comparisons are not made
NOT_TESTABLE = "not testable"
RULE = (f"matched within {TOLERANCE_PCT:g} points of activated params; yes only if DSMoE is better at equal or lower "
        "activation, no only if it is not better at equal or higher activation")


def verdict(dsmoe_better, dsmoe_pct, other_pct, tolerance=TOLERANCE_PCT):
    """"yes", "no" or `NOT_TESTABLE` for "DSMoE beats the other model", given whether the interval says
    DSMoE is better and both sides' activated params (%)."""
    if any(map(math.isnan, (dsmoe_pct, other_pct))):
        return NOT_TESTABLE
    if dsmoe_better:
        return "yes" if dsmoe_pct <= other_pct + tolerance else NOT_TESTABLE
    return "no" if dsmoe_pct >= other_pct - tolerance else NOT_TESTABLE


def why(outcome, dsmoe_better, dsmoe_pct, other_pct, tolerance=TOLERANCE_PCT, name="DSMoE"):
    """The sentence a line carries: the rule that gave `outcome`, with both activations (`name`: the
    side in DSMoE's place, e.g. the final model of a token comparison)."""
    gap = dsmoe_pct - other_pct
    match = "matched" if abs(gap) <= tolerance else f"{name} {abs(gap):.1f} points {'above' if gap > 0 else 'below'}"
    where = f"{name} at {dsmoe_pct:.1f}% vs {other_pct:.1f}% activated params ({match}; tolerance {tolerance:g} points)"
    if outcome != NOT_TESTABLE:
        return where
    if dsmoe_better:
        return f"{where}: {name} is better but activates more: {NOT_TESTABLE}"
    return f"{where}: {name} is not better but activates less: {NOT_TESTABLE}"


def short_run(train_tokens, min_tokens=MIN_TOKENS):
    """The reason quality comparisons are not made in a run of `train_tokens` per model, or None."""
    if train_tokens is None or train_tokens >= min_tokens:
        return None
    return (f"{NOT_TESTABLE} in the demo: each model trains {train_tokens:,.0f} tokens (train.tokens), below the "
            f"{min_tokens:,} a quality comparison needs here; the numbers show where each method starts")
