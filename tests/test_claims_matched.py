"""Claims judged only at matched activation (dsmoe/report/matched.py): every branch of the rule on small
synthetic tables: inside a sweep's range, outside it on either side, dominance either way, the tolerance,
and a short run's "not testable in the demo"."""

import math

import pandas as pd
import pytest

from conftest import synthetic_windows
from dsmoe import report
from dsmoe.report import matched
from dsmoe.report.matched import NOT_TESTABLE, TOLERANCE_PCT, verdict

NO_STE = "DSMoE beats no-STE"
TOPK = "DSMoE beats top-k at matched activation"
NO_GX = "no-G (n/k at inference) is worse at matched activation"


def ppl_rows(values):
    return pd.DataFrame([{"model": m, "variant": m, "tau": 0.5, "source": "all", "ppl": p, "tokens": 100,
                          "activated_params": pct * 1e4, "activated_params_pct": pct, "mean_active_experts": 4.0}
                         for m, p, pct in values])


def sweep_rows(curves):
    return pd.concat([pd.DataFrame([{"model": label, "variant": variant, "tau": t, "ppl": p, "activated_params_pct": a,
                                     "mean_active_experts": a / 12.5} for t, p, a in points])
                      for label, (variant, points) in curves.items()], ignore_index=True)


DSMOE_CURVE = {"dsmoe": ("dsmoe", [(0.3, 9.0, 65.0), (0.5, 10.0, 60.0), (0.7, 12.0, 55.0)])}


def claims_of(ppl, sweep=None, **kwargs):
    sweep = sweep_rows(DSMOE_CURVE) if sweep is None else sweep
    return report.claims(ppl, sweep, windows=synthetic_windows(ppl), sweep_windows=synthetic_windows(sweep),
                         **kwargs).set_index("claim")


@pytest.mark.parametrize("better, ours, other, expected", [
    (True, 60.0, 60.0, "yes"),                         # matched, better
    (True, 61.5, 60.0, "yes"),                         # within the tolerance
    (True, 50.0, 60.0, "yes"),                         # better with fewer parameters
    (True, 65.0, 60.0, NOT_TESTABLE),                  # better, but with more parameters
    (False, 60.0, 60.0, "no"),                         # matched, not better
    (False, 58.5, 60.0, "no"),                         # within the tolerance
    (False, 70.0, 60.0, "no"),                         # not better with more parameters
    (False, 50.0, 60.0, NOT_TESTABLE),                 # not better, but with fewer parameters
    (True, math.nan, 60.0, NOT_TESTABLE),
])
def test_the_rule(better, ours, other, expected):
    assert verdict(better, ours, other) == expected
    assert TOLERANCE_PCT == 2.0 and "2 points" in matched.RULE


@pytest.mark.parametrize("dsmoe, no_ste, expected", [
    ((10.0, 50.0), (12.0, 60.0), "yes"),               # better at lower activation
    ((13.0, 60.0), (10.0, 50.0), "no"),                # worse at higher activation
    ((10.0, 60.0), (12.0, 50.0), NOT_TESTABLE),        # better at higher activation (the committed study's case)
    ((13.0, 50.0), (10.0, 60.0), NOT_TESTABLE),        # worse at lower activation
])
def test_two_models_at_their_own_activation(dsmoe, no_ste, expected):
    line = claims_of(ppl_rows([("dsmoe", *dsmoe), ("no_ste", *no_ste)])).loc[NO_STE]
    assert line["reproduced"] == expected
    assert (line["activated_pct_a"], line["activated_pct_b"]) == pytest.approx((dsmoe[1], no_ste[1]))
    assert f"{dsmoe[1]:.1f}%" in line["evidence"] and f"{no_ste[1]:.1f}%" in line["evidence"]
    assert line["ci_low"] <= line["diff"] <= line["ci_high"]  # the paired interval is kept in every branch
    if expected == NOT_TESTABLE:
        assert "points" in line["evidence"] and NOT_TESTABLE in line["evidence"]


def test_topk_inside_the_sweep_is_matched_by_interpolation():
    line = claims_of(ppl_rows([("dsmoe", 10.0, 60.0), ("topk", 11.0, 62.5)])).loc[TOPK]
    assert line["reproduced"] == "yes" and line["ppl_a"] == pytest.approx(9.5)
    assert line["activated_pct_a"] == pytest.approx(62.5) == line["activated_pct_b"]
    assert "interpolated between τ 0.5 and 0.3" in line["evidence"] and "(matched;" in line["evidence"]


@pytest.mark.parametrize("topk, expected, nearest", [
    ((12.0, 80.0), "yes", 65.0),                       # above the sweep: DSMoE's τ 0.3 (9 at 65%) better with fewer
    ((8.0, 80.0), NOT_TESTABLE, 65.0),                 # above: DSMoE worse with fewer
    ((11.0, 40.0), "no", 55.0),                        # below: DSMoE's τ 0.7 (12 at 55%) worse with more
    ((20.0, 40.0), NOT_TESTABLE, 55.0),                # below: DSMoE better with more
    ((11.0, 54.0), "no", 55.0),                        # just below, within the tolerance: matched
])
def test_topk_outside_the_sweep_on_either_side(topk, expected, nearest):
    line = claims_of(ppl_rows([("dsmoe", 10.0, 60.0), ("topk", *topk)])).loc[TOPK]
    assert line["reproduced"] == expected, line["evidence"]
    assert (line["activated_pct_a"], line["activated_pct_b"]) == pytest.approx((nearest, topk[1]))
    assert "outside the τ-sweep's range" in line["evidence"]


@pytest.mark.parametrize("points, expected", [
    ([(0.2, 15.0, 70.0), (0.5, 20.0, 58.0)], "yes"),   # inside: no-G worse at DSMoE's 60%
    ([(0.2, 15.0, 70.0), (0.5, 20.0, 65.0)], "yes"),   # above: no-G worse with more parameters (65%)
    ([(0.2, 15.0, 55.0), (0.5, 20.0, 50.0)], NOT_TESTABLE),  # below: no-G worse with fewer parameters (55%)
    ([(0.2, 8.0, 55.0), (0.5, 9.0, 50.0)], "no"),      # below: no-G better with fewer parameters
])
def test_no_gx_sweep_inside_and_outside(points, expected):
    sweep = sweep_rows({**DSMOE_CURVE, "no_gx": ("no_gx", points)})
    line = claims_of(ppl_rows([("dsmoe", 10.0, 60.0)]), sweep).loc[NO_GX]
    assert line["reproduced"] == expected, line["evidence"]
    assert line["activated_pct_b"] == pytest.approx(60.0)  # ppl_a is no-G's, ppl_b DSMoE's


def test_every_line_names_the_regime():
    ppl = ppl_rows([("dsmoe", 10.0, 72.44), ("no_ste", 12.0, 60.0)])
    table = claims_of(ppl, train_tokens=122880)
    assert set(table["regime"]) == {"122,880 training tokens per model; DSMoE at 4.00 experts per token (72.4% of params)"}
    assert set(claims_of(ppl_rows([("no_ste", 12.0, 60.0)]))["regime"]) == {"training tokens unknown"}


def test_a_short_run_makes_no_quality_comparison():
    ppl = ppl_rows([("dsmoe", 10.0, 50.0), ("no_ste", 12.0, 60.0), ("topk", 11.0, 62.5), ("prune_sparsegpt", 11.0, 50.0)])
    short = claims_of(ppl, train_tokens=5120)
    compared = [NO_STE, TOPK, "DSMoE beats prune_sparsegpt at matched activation"]
    assert (short.loc[compared, "reproduced"] == NOT_TESTABLE).all()
    assert short.loc[compared, "evidence"].str.startswith("not testable in the demo: each model trains 5,120 tokens").all()
    assert short.loc[compared, "ci_low"].notna().all()  # the numbers stay for reading
    assert short.loc["PPL against activated params is monotone in τ", "reproduced"] in ("yes", "no")
    long = claims_of(ppl, train_tokens=matched.MIN_TOKENS)
    assert long.loc[NO_STE, "reproduced"] == "yes"


def test_claims_without_two_models_leave_the_activation_columns_empty(tmp_path):
    table = report.claims(ppl_rows([("dsmoe", 10.0, 60.0), ("no_ste", 11.0, 60.0)]), sweep_rows(DSMOE_CURVE),
                          windows=synthetic_windows(ppl_rows([("dsmoe", 10.0, 60.0), ("no_ste", 11.0, 60.0)])),
                          sweep_windows=synthetic_windows(sweep_rows(DSMOE_CURVE)))
    report.save_table(table, tmp_path, "claims")
    written = pd.read_csv(tmp_path / "claims.csv", keep_default_na=False).set_index("claim")
    assert {"activated_pct_a", "activated_pct_b"} <= set(written.columns)
    assert written.loc["PPL against activated params is monotone in τ", "activated_pct_a"] == ""
    assert float(written.loc[NO_STE, "activated_pct_a"]) == pytest.approx(60.0)


def test_heatmaps_share_one_scale_from_zero_to_n_experts():
    import matplotlib

    matplotlib.use("Agg")
    layers = pd.DataFrame([{"model": m, "variant": m, "tau": 0.5, "source": s, "layer": i, "mean_active_experts": k}
                           for m, k in (("dsmoe", 7.99), ("no_ste", 3.0)) for s in ("code", "all") for i in range(3)])
    for model in ("dsmoe", "no_ste"):
        ax = report.heatmap(layers, model, n_experts=8)
        assert ax.collections[0].get_clim() == (0, 8)  # a flat 7.99 run is one colour, not dark bands
    assert report.heatmap(layers, "dsmoe").collections[0].get_clim() == (0, 8)  # inferred over every model
    with pytest.raises(ValueError, match="at least 1"):
        report.heatmap(layers, "dsmoe", n_experts=0)


def test_the_demo_summary_names_table1_rows_and_routing():
    from pathlib import Path

    from dsmoe.report.summary import summary

    study = Path(__file__).resolve().parents[1] / "results" / "cpu-study"
    if not (study / "data" / "ppl.csv").is_file():
        pytest.skip("results/cpu-study not committed")
    text = summary(study)
    for needle in ("dense", "dsmoe", "topk", "prune_sparsegpt", "τ-sweep", "per layer", "make lab"):
        assert needle in text
