"""Routing diagnostics (issue 28): the σ(h·Y) − τ histograms, the all-experts-on evaluation and the
massive-activation table, on tiny random models."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dsmoe
from dsmoe.accounting import MARGIN_EDGES, NEAR_TAU
from dsmoe.evaluation.massive import massive_activations
from dsmoe.evaluation.perplexity import evaluate_ppl
from dsmoe.model import dsmoe_layers
from test_baselines import write_fixture_data


def tiny_llama(seed=0, layers=3):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).float().eval()


def validation(seq_len=9):
    rng = np.random.default_rng(5)
    return {"code": rng.integers(0, 128, (4, seq_len)), "prose": rng.integers(0, 128, (3, seq_len))}


def converted(seed=0):
    return dsmoe.convert(tiny_llama(seed), n_experts=4, tau=0.5, gate_init_std=0.5).eval()


def test_gate_margin_histograms_equal_brute_force():
    model, data = converted(), validation()
    df = evaluate_ppl(model, data, batch_size=2, progress=False, gate_margins=True)
    margins = df.attrs["gate_margins"]
    probs = {i: [] for i in range(3)}
    with torch.no_grad():  # brute force: σ(h·Y) of every token, captured at each layer's input
        hooks = [layer.register_forward_hook(lambda m, a, o, i=i: probs[i].append(m.last_gate_probs.double().clone()))
                 for i, layer in enumerate(dsmoe_layers(model))]
        for source in ("code", "prose"):
            model(input_ids=torch.as_tensor(data[source]))
        for hook in hooks:
            hook.remove()
    edges = MARGIN_EDGES.numpy()
    for layer in range(3):
        got = margins[(margins.source == "all") & (margins.layer == layer)]
        values = (torch.cat(probs[layer]) - 0.5).flatten().numpy()
        assert got["count"].sum() == 7 * 9 * 4 == values.size  # tokens x experts
        expected = np.array([((values >= lo) & (values < hi)).sum() for lo, hi in zip(edges[:-1], edges[1:])])
        assert np.array_equal(got["count"].to_numpy(), expected)
        assert got["near_tau_share"].iloc[0] == pytest.approx((np.abs(values) <= NEAR_TAU).mean(), abs=1e-12)
        per_source = margins[(margins.source != "all") & (margins.layer == layer)].groupby("bin_low")["count"].sum()
        assert np.array_equal(per_source.to_numpy(), expected)
    assert evaluate_ppl(tiny_llama(), data, progress=False, gate_margins=True).attrs["gate_margins"].empty  # dense
    from dsmoe.report import gate_margin_figure

    fig = gate_margin_figure(margins.assign(model="m"))
    assert len(fig.axes) == 3


def test_all_experts_on_equals_dense_parent():
    dense, data = tiny_llama(), validation()
    model = dsmoe.convert(copy.deepcopy(dense), n_experts=4, tau=0.5, gate_init_std=0.5).eval()
    parent = evaluate_ppl(dense, data, progress=False)
    on = evaluate_ppl(model, data, progress=False, all_on=True)
    routed = evaluate_ppl(model, data, progress=False)
    for source in ("code", "prose", "all"):
        ref = parent.set_index("source").loc[source, "ppl"]
        assert on.set_index("source").loc[source, "ppl"] == pytest.approx(ref, rel=1e-5)
    assert on.set_index("source").loc["all", "mean_active_experts"] == 4.0
    assert on.set_index("source").loc["all", "activated_params_pct"] == pytest.approx(100.0)
    routed_ppl, parent_ppl = routed.set_index("source").loc["all", "ppl"], parent.set_index("source").loc["all", "ppl"]
    assert abs(routed_ppl / parent_ppl - 1) > 2e-5  # routing, unlike all-on, changes the model
    assert "forward" not in vars(dsmoe_layers(model)[0])  # the routed forward is back


def test_massive_activation_table_finds_a_planted_unit():
    model, unit = tiny_llama(seed=2), 37
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[unit] *= 40.0
        model.model.layers[1].mlp.up_proj.weight[unit] *= 40.0
    windows = validation()["code"]
    table = massive_activations(model, windows, n_experts=4, top_units=2)
    assert list(table.columns) == ["layer", "rank", "unit", "expert", "mean_abs_activation", "residual_max_abs"]
    assert len(table) == 3 * 2
    top = table[(table.layer == 1) & (table["rank"] == 0)].iloc[0]
    assert top.unit == unit and top.expert == unit // 16
    assert top.mean_abs_activation > 10 * table[(table.layer == 0) & (table["rank"] == 0)].mean_abs_activation.iloc[0]
    with pytest.raises(ValueError, match="dense"):
        massive_activations(converted(), windows, n_experts=4)
    with pytest.raises(ValueError, match="n_experts"):
        massive_activations(model, windows, n_experts=5)




def test_cli_gate_margins_all_on_and_massive(tmp_path, smollm2_tokenizer):
    from dsmoe.cli import main
    from dsmoe.hub import save_model

    data = write_fixture_data(tmp_path / "data")
    dense = tiny_llama()
    save_model(dense, smollm2_tokenizer, tmp_path / "dense")
    save_model(dsmoe.convert(copy.deepcopy(dense), n_experts=4, tau=0.5, gate_init_std=0.5), smollm2_tokenizer,
               tmp_path / "moe")
    assert main(["eval", "ppl", "--model", str(tmp_path / "moe"), "--data", str(data), "--device", "cpu",
                 "--out", str(tmp_path / "routed")]) == 0
    margins = pd.read_csv(tmp_path / "routed" / "gate_margins.csv")
    assert list(margins.columns) == ["model", "variant", "tau", "source", "layer", "bin_low", "bin_high", "count",
                                     "near_tau_share"]
    assert (margins[margins.source == "all"].groupby("layer")["count"].sum() == 2 * 3 * 8 * 4).all()
    assert list(pd.read_csv(tmp_path / "routed" / "ppl.csv").columns[:3]) == ["model", "variant", "tau"]
    assert main(["eval", "ppl", "--model", str(tmp_path / "moe"), "--data", str(data), "--device", "cpu",
                 "--all-experts-on", "--no-gate-margins", "--out", str(tmp_path / "on")]) == 0
    assert not (tmp_path / "on" / "gate_margins.csv").exists()
    assert main(["eval", "ppl", "--model", str(tmp_path / "dense"), "--data", str(data), "--device", "cpu",
                 "--out", str(tmp_path / "dense_eval")]) == 0
    on, ref = pd.read_csv(tmp_path / "on" / "ppl.csv"), pd.read_csv(tmp_path / "dense_eval" / "ppl.csv")
    assert set(on.model) == {"moe@all_on"}
    assert on.ppl.to_numpy() == pytest.approx(ref.ppl.to_numpy(), rel=1e-5)
    assert main(["eval", "ppl", "--model", str(tmp_path / "dense"), "--data", str(data), "--device", "cpu",
                 "--all-experts-on", "--out", str(tmp_path / "bad")]) == 2
    out = tmp_path / "massive.csv"
    assert main(["eval", "massive-activations", "--model", str(tmp_path / "dense"), "--data", str(data),
                 "--n-experts", "4", "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 3 * 3


def margin_rows(model, variant, layers, seed):
    """A gate_margins.csv as `dsmoe eval ppl` writes it: per source and layer, 200 bins and one near-τ share."""
    rng, edges = np.random.default_rng(seed), MARGIN_EDGES.numpy()
    rows = [{"model": model, "variant": variant, "tau": 0.5, "source": source, "layer": layer, "bin_low": lo,
             "bin_high": hi, "count": int(rng.integers(0, 9)), "near_tau_share": share}
            for source in ("code", "all") for layer, share in zip(range(layers), rng.uniform(0, 1, layers))
            for lo, hi in zip(edges[:-1], edges[1:])]
    return pd.DataFrame(rows, columns=["model", "variant", "tau", "source", "layer", "bin_low", "bin_high", "count",
                                       "near_tau_share"])


def ppl_rows(model, variant, values, tau=0.5):
    return pd.DataFrame([{"model": model, "variant": variant, "tau": tau, "source": source, "ppl": ppl, "tokens": 10,
                          "activated_params": pct * 1e4, "activated_params_pct": pct, "mean_active_experts": 2.0}
                         for source, ppl, pct in values])


def write_evaluations(root):
    """Per-model eval dirs of a synthetic run: ppl.csv and gate_margins.csv, and the all-on ppl.csv files."""
    models = {"dense": ("dense", None, [("code", 9.0, 100.0), ("all", 10.0, 100.0)]),
              "dsmoe": ("dsmoe", 0.5, [("code", 11.0, 60.0), ("all", 12.0, 61.0)]),
              "no_gx": ("no_gx", 0.4, [("code", 19.0, 70.0), ("all", 20.0, 71.0)]),
              "topk": ("topk", None, [("code", 13.0, 50.0), ("all", 14.0, 50.0)]),
              "prune_wanda": ("prune_wanda", None, [("code", 15.0, 60.0), ("all", 16.0, 60.0)])}
    files, all_on = [], []
    for i, (model, (variant, tau, values)) in enumerate(models.items()):
        folder = root / "eval" / "ppl" / model
        folder.mkdir(parents=True)
        ppl_rows(model, variant, values, tau).to_csv(folder / "ppl.csv", index=False)
        margins = margin_rows(model, variant, 3, i) if variant in ("dsmoe", "no_gx") else margin_rows(model, variant, 0, i)
        margins.to_csv(folder / "gate_margins.csv", index=False)
        files += [folder / "ppl.csv", folder / "gate_margins.csv"]
        if variant in ("dsmoe", "no_gx"):
            on = root / "eval" / "all_on" / model
            on.mkdir(parents=True)
            ppl_rows(f"{model}@all_on", variant, [("code", 9.5, 100.0), ("all", 10.0 + i, 100.0)], tau).to_csv(
                on / "ppl.csv", index=False)
            all_on.append(on / "ppl.csv")
    return files, all_on


def test_collect_gathers_gate_margins_and_all_on_apart_from_ppl(tmp_path):
    from dsmoe.cli import main
    from dsmoe.report import load_run

    files, all_on = write_evaluations(tmp_path)
    assert main(["report", "collect", "--out", str(tmp_path / "run" / "data"), *map(str, files),
                 "--all-on", *map(str, all_on)]) == 0
    data = load_run(tmp_path / "run")
    margins = [pd.read_csv(path) for path in files if path.name == "gate_margins.csv"]
    pd.testing.assert_frame_equal(data["gate_margins"], pd.concat(margins, ignore_index=True), check_dtype=False)
    assert len(data["gate_margins"]) == 2 * 2 * 3 * 200  # dsmoe and no_gx: 2 sources x 3 layers x 200 bins
    pd.testing.assert_frame_equal(data["all_on"], pd.concat(map(pd.read_csv, all_on), ignore_index=True),
                                  check_dtype=False)
    assert not data["ppl"]["model"].str.endswith("@all_on").any() and len(data["ppl"]) == 5 * 2  # Table 1 keeps its rows
    assert data["massive"].empty
    with pytest.raises(ValueError, match="all-experts-on"):
        dsmoe.report.collect(files, tmp_path / "bad", all_on=[files[1]])  # a gate_margins.csv is no all-on ppl.csv


def test_diagnostics_table_against_brute_force(tmp_path):
    from dsmoe.report import collect, diagnostics_table, has_diagnostics, load_run

    files, all_on = write_evaluations(tmp_path)
    collect(files, tmp_path / "run" / "data", all_on=all_on)
    data = load_run(tmp_path / "run")
    assert has_diagnostics(data)
    table = diagnostics_table(data["ppl"], data["all_on"], data["gate_margins"]).set_index("model")
    assert list(table.index) == ["dense", "dsmoe", "no_gx"]  # dense rows and the sigmoid models; not topk, not pruned
    dense_ppl = 10.0
    for model in ("dsmoe", "no_gx"):
        ppl = pd.read_csv(tmp_path / "eval" / "ppl" / model / "ppl.csv")
        on = pd.read_csv(tmp_path / "eval" / "all_on" / model / "ppl.csv")
        margins = pd.read_csv(tmp_path / "eval" / "ppl" / model / "gate_margins.csv")
        shares = {}
        for row in margins.itertuples():  # one share per layer of source "all", repeated on each bin
            if row.source == "all":
                assert shares.setdefault(row.layer, row.near_tau_share) == row.near_tau_share
        line = table.loc[model]
        assert line["ppl"] == ppl[ppl.source == "all"]["ppl"].item()
        assert line["tau"] == ppl["tau"].iloc[0]
        assert line["ppl_all_on"] == on[on.source == "all"]["ppl"].item()
        assert line["all_on_over_dense"] == pytest.approx(line["ppl_all_on"] / dense_ppl)
        assert line["near_tau_share"] == pytest.approx(sum(shares.values()) / len(shares))
    assert np.isnan(table.loc["dense", ["ppl_all_on", "near_tau_share"]].astype(float)).all()
    bare = diagnostics_table(data["ppl"], pd.DataFrame(columns=["model"]), pd.DataFrame(columns=["model"]))
    assert bare["ppl_all_on"].isna().all() and bare["near_tau_share"].isna().all()  # an older run: NaN, no error
