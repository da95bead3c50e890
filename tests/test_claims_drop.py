"""The claim "DSMoE beats the training-free top-k drop at matched activation" (dsmoe/report/reproduced.py) on
small synthetic tables: inside the K range (yes, no), outside it on either side, no drop, no drop windows, and
a short run."""

import math

import numpy as np
import pandas as pd
import pytest

from conftest import synthetic_windows
from dsmoe import report
from dsmoe.report.bootstrap import log_blend, paired_bootstrap, windows_of
from dsmoe.report.matched import NOT_TESTABLE
from test_claims_matched import DSMOE_CURVE, ppl_rows, sweep_rows

DROP = "DSMoE beats the training-free top-k drop at matched activation"
# K -> (ppl, activated %): DSMoE's 60% lies between K 4 and K 6
CURVE = {3: (40.0, 40.0), 4: (20.0, 50.0), 6: (10.0, 70.0)}


def drop_rows(curve=CURVE, thresholds=True):
    """A collected drop.csv: the top-k drop's rows, and a threshold row that the claim must ignore."""
    rows = [{"model": "drop_oracle", "variant": "drop_oracle", "rule": "topk", "threshold": math.nan, "keep_experts": k,
             "ppl_all": p, "activated_params_pct": a} for k, (p, a) in curve.items()]
    if thresholds:
        rows.append({"model": "drop_oracle", "variant": "drop_oracle", "rule": "expert", "threshold": 0.05,
                     "keep_experts": math.nan, "ppl_all": 1.0, "activated_params_pct": 60.0})
    return pd.DataFrame(rows)


def drop_windows(drop):
    """drop_windows.csv for each row: the synthetic windows of its ppl, after its setting's columns."""
    frames = [synthetic_windows(pd.DataFrame([{"model": "drop_oracle", "variant": "drop_oracle", "ppl": row.ppl_all}]))
              .assign(rule=row.rule, threshold=row.threshold, keep_experts=row.keep_experts,
                      activated_params_pct=row.activated_params_pct) for row in drop.itertuples()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["model"])


def drop_line(dsmoe, drop=None, windows=True, **kwargs):
    ppl = ppl_rows([("dsmoe", *dsmoe)])
    drop = drop_rows() if drop is None else drop
    sweep = sweep_rows(DSMOE_CURVE)
    table = report.claims(ppl, sweep, windows=synthetic_windows(ppl), sweep_windows=synthetic_windows(sweep),
                          drop=drop, drop_windows=drop_windows(drop) if windows else None, **kwargs)
    return table.set_index("claim").loc[DROP]


@pytest.mark.parametrize("ppl, expected", [(10.0, "yes"), (20.0, "no")])
def test_inside_the_k_range_the_drop_is_interpolated_in_log_ppl(ppl, expected):
    line = drop_line((ppl, 60.0))
    assert line["reproduced"] == expected, line["evidence"]
    assert line["ppl_b"] == pytest.approx(math.sqrt(20.0 * 10.0))  # halfway between K 4 and 6 in log-PPL
    assert line["activated_pct_a"] == pytest.approx(60.0) == line["activated_pct_b"]
    assert (line["ci_high"] < 0) if expected == "yes" else (line["ci_low"] > 0)
    assert "interpolated in log-PPL between K 4 and 6" in line["evidence"] and "(matched;" in line["evidence"]


def test_the_interval_blends_each_windows_nll():
    """The drop side is one frame of per-window NLL, (1 - w) K_lo + w K_hi: its bootstrap equals the
    bootstrap of that frame written out by hand."""
    drop = drop_rows()
    windows = drop_windows(drop)
    line = drop_line((12.0, 55.0))  # w = 0.25 of the way from K 4 (50%) to K 6 (70%)
    lo, hi = (windows_of(windows, keep_experts=float(k)) for k in (4, 6))
    by_hand = lo.assign(nll=0.75 * lo["nll"].to_numpy() + 0.25 * hi["nll"].to_numpy())
    pd.testing.assert_frame_equal(log_blend([(0.75, lo), (0.25, hi)])[["source", "window", "nll", "tokens"]],
                                  by_hand[["source", "window", "nll", "tokens"]], check_dtype=False)
    dsmoe = synthetic_windows(ppl_rows([("dsmoe", 12.0, 55.0)]))
    expected = paired_bootstrap(dsmoe, by_hand)
    assert (line["ppl_b"], line["ci_low"], line["ci_high"]) == pytest.approx(expected[1:2] + expected[3:])
    assert line["ppl_b"] == pytest.approx(math.exp(0.75 * np.log(20.0) + 0.25 * np.log(10.0)))


@pytest.mark.parametrize("dsmoe, nearest_pct, k", [
    ((5.0, 80.0), 70.0, "6"),      # above the K range: DSMoE better, but no K to match it
    ((100.0, 30.0), 40.0, "3"),    # below the K range: DSMoE worse, but no K to match it
    ((5.0, 30.0), 40.0, "3"),      # below and better: the matched rule would say yes; out of range it does not
])
def test_outside_the_k_range_is_not_testable(dsmoe, nearest_pct, k):
    line = drop_line(dsmoe)
    assert line["reproduced"] == NOT_TESTABLE, line["evidence"]
    assert (line["activated_pct_a"], line["activated_pct_b"]) == pytest.approx((dsmoe[1], nearest_pct))
    assert line["evidence"].startswith(f"{NOT_TESTABLE}: DSMoE's {dsmoe[1]:.1f}% activated params lies outside the "
                                       "top-k drop's range, 40.0% (K 3) to 70.0% (K 6)")
    assert f"top-k drop {CURVE[int(k)][0]:.4g} (K {k})" in line["evidence"]
    assert line["ci_low"] <= line["diff"] <= line["ci_high"]  # the nearest K's numbers stay for reading


@pytest.mark.parametrize("drop", [pd.DataFrame(columns=["model"]), drop_rows({}, thresholds=True)])
def test_no_topk_drop_in_the_run_is_n_a(drop):
    line = drop_line((10.0, 60.0), drop)
    assert line["reproduced"] == "n/a" and "top-k drop (baselines.drop_keep_experts) missing" in line["evidence"]
    assert math.isnan(line["diff"])
    table = report.claims(ppl_rows([("dsmoe", 10.0, 60.0)]), sweep_rows(DSMOE_CURVE))  # drop not passed at all
    assert table.set_index("claim").loc[DROP, "reproduced"] == "n/a"


def test_drop_rows_without_windows_are_n_a():
    """A run collected before the drop wrote windows: drop.csv has the K rows, but no drop_windows.csv."""
    line = drop_line((10.0, 60.0), windows=False)
    assert line["reproduced"] == "n/a" and line["evidence"].startswith("n/a: no per-window data")
    assert line["ppl_b"] == pytest.approx(math.sqrt(200.0)) and math.isnan(line["ci_low"])


def test_a_short_run_is_not_testable():
    line = drop_line((10.0, 60.0), train_tokens=5120)
    assert line["reproduced"] == NOT_TESTABLE and line["evidence"].startswith("not testable in the demo")
    assert line["ci_high"] < 0
