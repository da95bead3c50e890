"""The training-free drop baseline's per-token top-k rule (issue 28), against a brute-force reference,
and the threshold rules' refusal of thresholds that drop whole FFNs."""

import copy
import re
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from dsmoe.baselines.drop import (SETTING_COLUMNS, DropRecorder, PartitionedDropMLP, drop_sweep, partition_for_drop,
                                  set_keep_experts, set_threshold)
from dsmoe.evaluation.perplexity import WINDOW_COLUMNS, evaluate_ppl
from test_baselines import write_fixture_data


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).double().eval()


def brute_force_topk(x, mlp, n, k):
    """Per token: every expert's o_i = (silu(x W_i) * x U_i) V_i, keep the k of largest norm, sum them."""
    w_gate, w_up, w_down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    e = w_gate.shape[0] // n
    out = torch.zeros_like(x)
    kept = torch.zeros(x.shape[0], n, dtype=torch.bool)
    for t in range(x.shape[0]):
        outputs = []
        for i in range(n):
            rows = slice(i * e, (i + 1) * e)
            outputs.append((F.silu(x[t] @ w_gate[rows].T) * (x[t] @ w_up[rows].T)) @ w_down[:, rows].T)
        norms = [float(o.norm()) for o in outputs]
        for i in sorted(range(n), key=lambda i: (-norms[i], i))[:k]:
            out[t] += outputs[i]
            kept[t, i] = True
    return out, kept


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("n, k", [(8, 1), (8, 3), (8, 5), (4, 2)])
def test_topk_equals_brute_force_float64(seed, n, k):
    mlp = tiny_llama(seed).model.layers[1].mlp
    layer = PartitionedDropMLP.from_dense(mlp, n, rule="topk", keep_experts=k)
    x = torch.randn(7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got = layer(x)
        expected, kept = brute_force_topk(x, mlp, n, k)
    assert torch.equal(layer.last_active, kept)
    assert (layer.last_active.sum(-1) == k).all()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)  # float64: equal up to summation order


def test_topk_all_experts_is_dense_and_recorded():
    dense = tiny_llama()
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    expected = dense(input_ids=ids).logits
    model = partition_for_drop(copy.deepcopy(dense), n_experts=8, rule="topk", keep_experts=8)
    with DropRecorder(model) as recorder:
        got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert recorder.report()["mean_active_experts"] == [8.0, 8.0]
    set_keep_experts(model, 3)
    with DropRecorder(model) as recorder:
        model(input_ids=ids)
    assert recorder.report()["mean_active_experts"] == [3.0, 3.0]
    assert recorder.report()["activated_params_pct"] < 100.0


@pytest.mark.parametrize("k", [0, -1, 9, 2.5, True])
def test_topk_k_out_of_range_refused(k):
    model = tiny_llama()
    with pytest.raises(ValueError, match="keep_experts"):
        partition_for_drop(model, 8, rule="topk", keep_experts=k)
    assert not isinstance(model.model.layers[0].mlp, PartitionedDropMLP)
    model = partition_for_drop(tiny_llama(), 8, rule="topk")
    with pytest.raises(ValueError, match="keep_experts"):
        set_keep_experts(model, k)
    assert all(m.keep_experts == 8 for m in model.modules() if isinstance(m, PartitionedDropMLP))


@pytest.mark.parametrize("n, threshold", [(8, 0.125), (8, 0.3), (4, 0.25), (4, 0.4)])
def test_expert_rule_refuses_thresholds_at_or_above_one_over_n(n, threshold):
    model = tiny_llama()
    with pytest.raises(ValueError, match="1/n"):
        partition_for_drop(model, n, threshold, "expert")
    assert not isinstance(model.model.layers[0].mlp, PartitionedDropMLP)
    model = partition_for_drop(tiny_llama(), n, 0.0, "expert")
    with pytest.raises(ValueError, match="1/n"):
        set_threshold(model, threshold)
    set_threshold(model, 0.9 / n)  # below 1/n: accepted
    with pytest.raises(ValueError, match="above 1"):
        partition_for_drop(tiny_llama(), n, 1.5, "cumulative")




def validation_sets(seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"code": torch.randint(0, 128, (5, 12), generator=g).numpy(),
            "prose": torch.randint(0, 128, (3, 12), generator=g).numpy()}


def drop_windows(dense, validation, n, k):
    model = partition_for_drop(copy.deepcopy(dense), n, rule="topk")
    return drop_sweep(model, validation, [k], "drop", batch_size=3).attrs["windows"]


def brute_force_window_nll(dense, validation, n, k):
    """Each window's summed next-token NLL, float64, with every MLP replaced by `brute_force_topk`."""
    model = copy.deepcopy(dense)
    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.forward = lambda h, mlp=mlp: brute_force_topk(h.reshape(-1, h.shape[-1]), mlp, n, k)[0].view(h.shape)
    rows = []
    with torch.no_grad():
        for source, windows in validation.items():
            for w, ids in enumerate(windows):
                logp = torch.log_softmax(model(input_ids=torch.from_numpy(ids)[None]).logits[0], dim=-1)
                nll = -sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1))
                rows.append({"source": source, "window": w, "nll": nll, "tokens": len(ids) - 1})
    return pd.DataFrame(rows)


def test_drop_windows_at_k_equal_n_are_the_dense_models_windows():
    """K = n is the dense FFN bit for bit: the windows equal evaluate_ppl's on the dense model, tolerance 0."""
    dense, validation = tiny_llama(), validation_sets()
    got = drop_windows(dense, validation, 8, 8)
    assert list(got.columns) == SETTING_COLUMNS + WINDOW_COLUMNS and len(got) == 8
    assert (got.keep_experts == 8).all() and (got.rule == "topk").all() and got.threshold.isna().all()
    assert got.activated_params_pct.eq(100.0).all()
    expected = evaluate_ppl(dense, validation, batch_size=3, progress=False).attrs["windows"]
    pd.testing.assert_frame_equal(got[WINDOW_COLUMNS], expected, check_exact=True)


@pytest.mark.parametrize("n, k", [(8, 3), (4, 1)])
def test_drop_windows_below_n_equal_a_brute_force_mask(n, k):
    """K < n: the per-window NLL equals the float64 brute force to 1e-6 relative (evaluate_ppl takes the
    cross-entropy in float32), and differs from the dense model's."""
    dense, validation = tiny_llama(seed=5), validation_sets()
    got = drop_windows(dense, validation, n, k)
    expected = brute_force_window_nll(dense, validation, n, k)
    pd.testing.assert_frame_equal(got[["source", "window", "tokens"]], expected[["source", "window", "tokens"]],
                                  check_dtype=False)
    np.testing.assert_allclose(got.nll, expected.nll, rtol=1e-6)
    assert (got.activated_params_pct < 100.0).all() and (got.keep_experts == k).all()
    dense_nll = evaluate_ppl(dense, validation, batch_size=3, progress=False).attrs["windows"].nll
    assert not np.allclose(got.nll, dense_nll, rtol=1e-4)


def test_cli_topk_one_row_per_k(tmp_path, smollm2_tokenizer):
    from dsmoe.cli import main

    data = write_fixture_data(tmp_path / "data")
    model_dir = tmp_path / "tiny"
    tiny_llama().float().save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    csv = tmp_path / "drop.csv"
    assert main(["baseline", "drop", "--model", str(model_dir), "--data", str(data), "--rule", "topk",
                 "--keep-experts", "8", "5", "2", "--out", str(csv)]) == 0
    df = pd.read_csv(csv)
    assert list(df.keep_experts) == [8, 5, 2] and df.threshold.isna().all() and set(df.rule) == {"topk"}
    assert list(df.mean_active_experts) == pytest.approx([8.0, 5.0, 2.0])
    assert df.activated_params_pct[0] == pytest.approx(100.0) and df.activated_params_pct.is_monotonic_decreasing
    assert list(df.columns[:4]) == ["model", "variant", "rule", "threshold"]
    assert {"ppl_code", "ppl_prose", "ppl_all", "tokens", "total_params", "activated_params", "activated_params_pct",
            "mean_active_experts"} <= set(df.columns)
    dense = main(["baseline", "drop", "--model", str(model_dir), "--data", str(data), "--thresholds", "0", "--n-experts", "8",
                  "--out", str(tmp_path / "dense.csv")])
    assert dense == 0 and pd.read_csv(tmp_path / "dense.csv").ppl_all[0] == pytest.approx(df.ppl_all[0], rel=1e-6)
    for bad in (["--rule", "topk", "--keep-experts", "0"], ["--rule", "topk", "--keep-experts", "9"],
                ["--rule", "topk", "--thresholds", "0.1"], ["--thresholds", "0.2"], ["--keep-experts", "3"]):
        out = tmp_path / "bad.csv"
        assert main(["baseline", "drop", "--model", str(model_dir), "--data", str(data), *bad, "--out", str(out)]) == 2
        assert not out.exists() and not (tmp_path / "bad_windows.csv").exists()
    assert math.isfinite(df.ppl_all[2])
    windows = pd.read_csv(tmp_path / "drop_windows.csv")
    assert list(windows.columns) == SETTING_COLUMNS + WINDOW_COLUMNS
    for row in df.itertuples():  # each K's windows pool to its ppl_all
        rows = windows[windows.keep_experts == row.keep_experts]
        assert (rows.activated_params_pct == row.activated_params_pct).all()
        assert math.exp(rows.nll.sum() / rows.tokens.sum()) == pytest.approx(row.ppl_all, rel=1e-9)


def test_table1_shows_the_topk_drop_rows_at_their_activation():
    """baselines.drop_keep_experts: the collected drop.csv's topk rows join Table 1 (threshold rows do not)."""
    from dsmoe import report

    ppl = pd.DataFrame({"model": ["dense", "dsmoe"], "source": "all", "ppl": [10.0, 12.0],
                        "activated_params": [100.0, 80.0], "activated_params_pct": [100.0, 80.0]})
    drop = pd.DataFrame({"model": "drop_oracle", "variant": "drop_oracle", "rule": ["expert", "topk", "topk"],
                         "threshold": [0.0, math.nan, math.nan], "ppl_all": [10.0, 30.0, 11.0],
                         "activated_params": [100.0, 50.0, 90.0], "activated_params_pct": [100.0, 50.0, 90.0],
                         "keep_experts": [math.nan, 3, 7]})
    paper = report.load_paper()
    assert list(report.table1(ppl, paper).model) == ["dense", "dsmoe"]
    table = report.table1(ppl, paper, drop).set_index("model")
    assert list(table.index) == ["dense", "dsmoe", "drop_oracle_top7", "drop_oracle_top3"]
    assert table.loc["drop_oracle_top3", "ppl"] == 30.0 and table.loc["drop_oracle_top7", "activated_pct_of_dense"] == 90.0
    assert table.loc["drop_oracle_top3", "paper_method"] == ""


def test_config_refuses_drop_keep_experts_above_n():
    from dsmoe.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="drop_keep_experts"):
        validate_config({"baselines": {"drop_keep_experts": [6, 9]}})
    assert validate_config({})["baselines"]["drop_keep_experts"] is None


def test_the_workflow_passes_each_drop_kind_its_settings(tmp_path):
    """Rule drop_sweep runs baselines.drop_rule (it was ignored once); drop_topk runs drop_keep_experts. Both
    declare the drop_windows.csv written beside their drop.csv, and collect gathers both."""
    from conftest import SMOKE, snakemake

    config = tmp_path / "drops.yaml"
    config.write_text("baselines: {drop_rule: cumulative, drop_keep_experts: [4, 6]}\n")
    planned = snakemake("--configfile", str(SMOKE), str(config), "-n", "-p", "results/smoke/eval/drop/drop_windows.csv",
                        "results/smoke/eval/drop/topk/drop_windows.csv", "results/smoke/data/drop_windows.csv",
                        workdir=tmp_path / "run").stdout
    assert re.search(r"dsmoe baseline drop .*--rule cumulative --thresholds 0\.0 0\.05 0\.1 .*--out \S*eval/drop/drop\.csv",
                     planned), planned
    assert re.search(r"dsmoe baseline drop .*--rule topk --keep-experts 4 6 .*--out \S*eval/drop/topk/drop\.csv",
                     planned), planned
    collect = re.search(r"dsmoe report collect .*", planned).group(0)
    assert "eval/drop/drop_windows.csv" in collect and "eval/drop/topk/drop_windows.csv" in collect, collect
