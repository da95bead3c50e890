"""The paper's tables as this project joins them (dsmoe.report): the benchmark name map, each task's
metric, Table 1's notes, Tables 5-6, the W-shape rule, the Fig. 2 and Fig. 3 figures."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dsmoe import report
from dsmoe.evaluation import harness
from dsmoe.names import PAPER_TASKS

PAPER = report.load_paper()


def bench_with_every_paper_task(models=("dense", "dsmoe", "no_ste")):
    """A collected bench.csv as `dsmoe eval lm-eval --suite paper` writes it: every metric of the ten
    lm-eval tasks (the primary one marked), for a few models."""
    rows = []
    for m, model in enumerate(models):
        for t, (task, (shots, primary)) in enumerate(harness.PAPER_SUITE.items()):
            metrics = [primary] + (["acc,none"] if primary.startswith("acc_norm") else [])
            for metric in metrics:
                name, filt = metric.split(",")
                rows.append({"model": model, "variant": model, "task": task, "metric": name if filt == "none" else metric,
                             "value": 0.1 + 0.01 * t + 0.1 * m + (0.05 if metric == primary else 0.0), "stderr": 0.01,
                             "activated_params_pct": 60.0, "tau": 0.5, "num_fewshot": shots, "samples": 10,
                             "primary": metric == primary, "mean_active_experts": 4.0})
    return pd.DataFrame(rows)


def ppl_rows(values):
    return pd.DataFrame([{"model": m, "variant": m, "tau": 0.5, "source": "all", "ppl": p, "tokens": 100,
                          "activated_params": pct * 1e4, "activated_params_pct": pct, "mean_active_experts": 4.0}
                         for m, p, pct in values])


# ---------------------------------------------------------------- Tables 2 and 3: one name map


def test_name_map_covers_the_paper_columns_and_the_suite():
    assert list(PAPER_TASKS) == PAPER["table2"]["tasks"]
    assert list(PAPER_TASKS.values()) == list(harness.PAPER_SUITE)
    assert {row["metric"] for row in PAPER["table3"]["rows"]} == set(PAPER_TASKS) | {"ppl"}


def test_ten_lm_eval_tasks_join_the_paper_rows_without_nan():
    bench = bench_with_every_paper_task()
    table2 = report.table2(bench, PAPER)
    tasks = [c for c in table2.columns if c not in ("source", "model")]
    assert tasks == list(harness.PAPER_SUITE)  # ten columns, no stray paper-only or run-only column
    assert not table2[tasks].isna().any().any() and len(table2) == 3 + 12
    ours = table2[table2["source"] == "this run"].set_index("model")
    assert ours.loc["dsmoe", "piqa"] == pytest.approx(100 * (0.1 + 0.02 + 0.1 + 0.05))  # the primary metric, in %
    table3 = report.table3(ppl_rows([("dsmoe", 7.4, 59.0), ("no_ste", 12.7, 55.0)]), bench, PAPER)
    assert table3["metric"].tolist() == ["ppl"] + list(harness.PAPER_SUITE)  # eleven joined rows
    assert not table3.isna().any().any()
    row = table3.set_index("metric").loc["lambada_openai"]
    assert (row["paper_dsmoe"], row["paper_no_ste"]) == (48.12, 27.79)


# ---------------------------------------------------------------- the metric of each task


def lm_eval_task_yaml(task):
    import lm_eval

    paths = {"hellaswag": "hellaswag/hellaswag.yaml", "lambada_openai": "lambada/lambada_openai.yaml",
             "piqa": "piqa/piqa.yaml", "social_iqa": "siqa/siqa.yaml", "storycloze_2016": "storycloze/storycloze_2016.yaml",
             "winogrande": "winogrande/default.yaml", "gsm8k": "gsm8k/gsm8k.yaml", "nq_open": "nq_open/nq_open.yaml",
             "triviaqa": "triviaqa/default.yaml", "webqs": "webqs/webqs.yaml"}
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_multi_constructor("!", lambda *args: None)  # !function tags
    return yaml.load((Path(lm_eval.__file__).parent / "tasks" / paths[task]).read_text(), Loader=loader)


def test_metric_choice_yaml_and_code_agree_and_name_lm_eval_metrics():
    table2 = PAPER["table2"]
    for key, shots, metric in zip(table2["tasks"], table2["shots"], table2["metric"]):
        task = PAPER_TASKS[key]
        assert harness.PAPER_SUITE[task] == (shots, metric), key
        assert len(table2["metric_reasons"][key].split()) >= 5, f"{key}: no reason given"
        config = lm_eval_task_yaml(task)
        name, filt = metric.split(",")
        assert name in [m["metric"] for m in config["metric_list"]], f"{task} has no metric {name}"
        filters = [f["name"] for f in config.get("filter_list", [])] or ["none"]
        assert filt in filters, f"{task} has no filter {filt}"


def test_metric_choices_reproduce_the_dense_rows_as_decided():
    """The choices the paper's dense numbers decide (acc_norm for HellaSwag and PIQA)."""
    assert harness.PAPER_SUITE["hellaswag"][1] == "acc_norm,none"
    assert harness.PAPER_SUITE["piqa"][1] == "acc_norm,none"
    assert harness.PAPER_SUITE["lambada_openai"][1] == "acc,none"
    assert harness.PAPER_SUITE["gsm8k"] == (5, "exact_match,strict-match")


# ---------------------------------------------------------------- Table 1's notes


def test_table1_notes_recount_the_paper():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def counts(**fields):
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**fields))
        total = sum(p.numel() for p in model.parameters())
        return total, sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)

    total_1b, ffn_1b = counts(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    total_7b, ffn_7b = counts(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    assert round(total_1b / 1e6, 1) == 1235.8 and round(total_7b / 1e6, 1) == 6738.4
    topk_1b = total_1b - ffn_1b + 3 / 8 * ffn_1b + 16 * 2048 * 8
    topk_7b = total_7b - ffn_7b + 3 / 8 * ffn_7b + 32 * 4096 * 8
    assert round(topk_1b / 1e6, 1) == 732.8 and round(topk_7b / 1e9, 2) == 4.03
    # LLM-Pruner-channel, d = 1215: every hidden dimension pruned, heads and FFN width kept
    d, layers, vocab = 1215, 16, 128256
    per_layer = d * (2048 + 512 + 512 + 2048) + 3 * d * 8192 + 2 * d
    tied = layers * per_layer + vocab * d + d
    assert round(tied / 1e6, 1) == 733.2 and round((tied + vocab * d) / 1e6) == 889
    notes = {(n["base"], n["method"]): " ".join(n["note"].split()) for n in PAPER["table1"]["notes"]}
    assert "733.2M" in notes[("LLaMA-1B", "LLM-Pruner-channel")] and "888.9M" in notes[("LLaMA-1B", "LLM-Pruner-channel")]
    assert "732.8M" in notes[("LLaMA-1B", "LLaMA-MoE")] and "4.03B" in notes[("LLaMA-7B", "LLaMA-MoE")]
    assert "68.78" in notes[("LLaMA-1B", "DSMoE")] and "68.67" in notes[("LLaMA-1B", "DSMoE")]
    storycloze = PAPER["table2"]["tasks"].index("storycloze")
    dsmoe_1b = next(r for r in PAPER["table2"]["rows"] if r["base"] == "LLaMA-1B" and r["method"] == "DSMoE")
    assert dsmoe_1b["scores"][storycloze] == 68.78
    assert next(r for r in PAPER["table3"]["rows"] if r["metric"] == "storycloze")["dsmoe"] == 68.67


def test_table1_carries_the_notes():
    table1 = report.table1(ppl_rows([("dense", 5.0, 100.0), ("topk", 7.0, 60.0), ("prune_channel", 7.5, 59.0)]), PAPER)
    notes = table1.set_index("model")["paper_notes"]
    assert "732.8M" in notes["topk"] and "4.03B" in notes["topk"] and "889M" in notes["prune_channel"]
    assert notes["dense"] == ""


# ---------------------------------------------------------------- Tables 5-6


def test_tables_5_6_transcribed():
    tables = {t["table"]: t for t in PAPER["table5_6"]}
    assert tables[5]["base"] == "LLaMA-1B" and tables[6]["base"] == "LLaMA-7B"
    assert tables[5]["tokens"] == [2.2e9, 3.8e9, 5.4e9, 7.0e9, 7.8e9, 8.6e9]
    assert tables[5]["ppl"] == [7.384, 7.323, 7.481, 7.488, 7.445, 7.422]
    assert tables[6]["tokens"] == [2.4e9, 3.2e9, 4.8e9, 6.4e9, 8.0e9, 9.6e9]
    assert tables[6]["ppl"] == [4.091, 4.029, 3.994, 3.975, 3.929, 3.916]


def milestone_rows():
    rows = []
    for step, tokens, ppl, final in ((5, 640, 90.0, False), (10, 1280, 60.0, False), (20, 2560, 40.0, True)):
        for source, factor in (("code", 1.1), ("all", 1.0)):
            rows.append({"model": "dsmoe", "variant": "dsmoe", "step": step, "train_tokens": tokens,
                         "milestone_tokens": math.nan if final else tokens, "final": final, "source": source,
                         "ppl": ppl * factor, "tokens": 100, "activated_params": 1.0, "activated_params_pct": 60.0,
                         "mean_active_experts": 4.0})
    return pd.DataFrame(rows)


def test_table5_6_and_its_curve():
    table = report.table5_6(milestone_rows(), PAPER)
    ours = table[table["source"] == "this run"]
    assert ours["tokens"].tolist() == [640, 1280, 2560] and ours["ppl"].tolist() == [90.0, 60.0, 40.0]
    assert ours["final"].tolist() == [False, False, True]
    assert len(table) == 3 + 12 and set(table["source"]) == {"this run", "paper LLaMA-1B (Table 5)", "paper LLaMA-7B (Table 6)"}
    fig = report.token_curve(table)
    assert len(fig.axes) == 3 and fig.axes[0].get_title() == "this run"
    empty = report.table5_6(pd.DataFrame(columns=["model"]), PAPER)  # a run without DSMoE: the paper's rows
    assert len(empty) == 12 and len(report.token_curve(empty).axes) == 2


# ---------------------------------------------------------------- the W shape (§6.3)


W_PROFILES = {
    "textbook W, 10 layers": [6, 6, 3, 3, 5, 5, 3, 3, 6, 6],
    "W, 16 layers (bands of 4, 3, 3, 3, 3)": [7, 6, 6, 5, 3, 2, 3, 5, 6, 5, 2, 3, 2, 6, 7, 7],
    "W with unequal peaks, 7 layers (bands of 2, 2, 1, 1, 1)": [4.0, 5.0, 2.0, 1.0, 3.0, 2.0, 3.5],
}
NOT_W_PROFILES = {
    "flat": [4] * 10,
    "U (middle not raised)": [6, 6, 3, 3, 3, 3, 3, 3, 6, 6],
    "M (inverted W)": [2, 2, 5, 5, 3, 3, 5, 5, 2, 2],
    "rising": list(range(10)),
    "middle above the edges only on one side": [6, 6, 3, 3, 5, 5, 6, 6, 6, 6],
}


@pytest.mark.parametrize("name", W_PROFILES)
def test_w_shaped_profiles_are_recognised(name):
    shaped, means = report.is_w_shaped(W_PROFILES[name])
    assert shaped is True and len(means) == 5


@pytest.mark.parametrize("name", NOT_W_PROFILES)
def test_other_profiles_are_not_w_shaped(name):
    assert report.is_w_shaped(NOT_W_PROFILES[name])[0] is False


def test_w_shape_bands_and_short_profiles():
    assert report.band_means([1, 2, 3, 4, 5, 6, 7]) == [1.5, 3.5, 5.0, 6.0, 7.0]  # sizes 2, 2, 1, 1, 1
    assert report.is_w_shaped([5, 1, 5, 1]) == (None, [])  # fewer than five layers: no verdict
    with pytest.raises(ValueError, match="at least 5 layers"):
        report.band_means([1, 2])


def layers_of(profile, model="dsmoe", sources=("code", "prose")):
    return pd.DataFrame([{"model": model, "variant": model, "tau": 0.5, "source": source, "layer": i,
                          "mean_active_experts": k + (0.2 if source == "code" else -0.2)}
                         for source in (*sources, "all") for i, k in enumerate(profile)])


def test_claims_state_the_w_shape_and_both_no_g_curves():
    ppl = ppl_rows([("dsmoe", 10.0, 60.0), ("no_ste", 12.0, 60.0), ("topk", 11.0, 61.0)])
    sweep = pd.concat([pd.DataFrame([{"model": label, "variant": variant, "tau": t, "ppl": p, "activated_params_pct": a,
                                      "mean_active_experts": a / 12.5}
                                     for t, p, a in points])
                       for label, variant, points in (
                           ("dsmoe", "dsmoe", [(0.3, 9.0, 65.0), (0.5, 10.0, 60.0), (0.7, 12.0, 55.0)]),
                           ("no_gx", "no_gx", [(0.2, 15.0, 70.0), (0.5, 20.0, 58.0)]),
                           ("no_gx_unscaled", "no_gx", [(0.2, 8.0, 70.0), (0.5, 9.0, 58.0)]))])
    claims = report.claims(ppl, sweep, layers_of(W_PROFILES["textbook W, 10 layers"])).set_index("claim")
    assert len(claims) == 6
    assert claims.loc["no-G (n/k at inference) is worse at matched activation", "reproduced"] == "yes"
    assert claims.loc["no-G (no n/k at inference) is worse at matched activation", "reproduced"] == "no"
    w_claim = next(c for c in claims.index if c.startswith("W-shaped"))
    assert claims.loc[w_claim, "reproduced"] == "yes" and "6.00, 3.00, 5.00, 3.00, 6.00" in claims.loc[w_claim, "evidence"]
    flat = report.claims(ppl, sweep, layers_of(NOT_W_PROFILES["U (middle not raised)"])).set_index("claim")
    assert flat.loc[w_claim, "reproduced"] == "no"
    two_layers = report.claims(ppl, sweep, layers_of([3, 4])).set_index("claim")
    assert two_layers.loc[w_claim, "reproduced"] == "n/a"


# ---------------------------------------------------------------- Fig. 2 both ways, Fig. 3 as the paper draws it


def test_no_gx_curve_draws_both_rescale_settings():
    sweep = pd.concat([pd.DataFrame([{"model": label, "variant": "no_gx", "tau": t, "ppl": p * (1 + t),
                                      "mean_active_experts": 8 * (1 - t), "activated_params_pct": 50.0}
                                     for t in (0.2, 0.5, 0.8)]) for label, p in (("no_gx", 20.0), ("no_gx_unscaled", 9.0))])
    fig = report.no_gx_curve(sweep, {"tau": 0.5, "ppl": 10.0, "mean_active_experts": 4.0})
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert "no-G, n/k at inference: PPL" in labels and "no-G, no n/k at inference: PPL" in labels
    assert "no-G, no n/k at inference: active experts" in labels


def test_heatmap_has_the_average_column_and_row():
    layers = layers_of([6, 3, 5, 3, 6])
    grid = report.heatmap_grid(layers, "dsmoe")
    assert list(grid.columns) == ["code", "prose", "average"] and grid.index[-1] == "average"
    np.testing.assert_allclose(grid["average"].iloc[:-1], [6, 3, 5, 3, 6])
    assert grid.loc["average", "code"] == pytest.approx(4.6 + 0.2)
    ax = report.heatmap(layers, "dsmoe")
    assert "reference" not in ax.get_title()


def test_task_heatmap_and_fixed_routing_reference():
    bench_layers = pd.DataFrame([{"model": "dsmoe", "variant": "dsmoe", "tau": 0.5, "task": task, "layer": i,
                                  "mean_active_experts": 3.0 + i} for task in ("piqa", "gsm8k") for i in range(3)])
    grid = report.heatmap_grid(bench_layers, "dsmoe", column="task")
    assert list(grid.columns) == ["gsm8k", "piqa", "average"]
    assert report.heatmap(bench_layers, "dsmoe", column="task").get_xlabel() == "benchmark task"
    topk = layers_of([3, 3, 3, 3, 3], model="topk")
    assert "reference only" in report.heatmap(topk, "topk").get_title()
    ax = report.layer_profile(pd.concat([layers_of([6, 3, 5, 3, 6]), topk]), ["dsmoe", "topk"])
    assert [line.get_label() for line in ax.get_lines()] == ["dsmoe", "topk (reference: fixed k)"]
