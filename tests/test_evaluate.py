"""Perplexity, activated params and τ-sweeps (dsmoe.evaluation) against plain references."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaForCausalLM

import dsmoe
from dsmoe import cli
from dsmoe.data import load_validation
from dsmoe.evaluation import evaluate_ppl, sweep_tau
from dsmoe.evaluation.cli import apply_pruning_record, model_label, model_method, model_tau

TEXT = {
    "prose": "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun. " * 2,
    "code": "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 3,
}


def byte_windows(text, seq_len):
    """A fixed text as bytes, cut into whole windows of seq_len tokens (the DATA val layout)."""
    ids = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int32)
    n = len(ids) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


@pytest.fixture
def byte_model(llama_config):
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(vocab_size=256)).eval()


def reference_nll(model, windows):
    """Summed next-token NLL and token count, by hand: float64 log_softmax and gather."""
    total, count = 0.0, 0
    for row in windows:
        ids = torch.as_tensor(row, dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.double(), dim=-1)[0, :-1]
        total -= logp.gather(-1, ids[0, 1:, None]).sum().item()
        count += len(row) - 1
    return total, count


def test_ppl_matches_plain_transformers(byte_model):
    validation = {name: byte_windows(text, 16) for name, text in TEXT.items()}
    assert [len(v) for v in validation.values()] == [11, 9]  # unequal: "all" must be token-weighted
    df = evaluate_ppl(byte_model, validation, batch_size=4, progress=False).set_index("source")
    nll, tokens = {}, {}
    for name, windows in validation.items():
        nll[name], tokens[name] = reference_nll(byte_model, windows)
        assert df.loc[name, "tokens"] == tokens[name]
        assert df.loc[name, "ppl"] == pytest.approx(math.exp(nll[name] / tokens[name]), rel=1e-5)
        # the same through transformers' own loss: equal windows, so the mean of window means
        losses = [byte_model(torch.as_tensor(w[None], dtype=torch.long), labels=torch.as_tensor(w[None], dtype=torch.long)).loss.item()
                  for w in windows]
        assert df.loc[name, "ppl"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-5)
    expected_all = math.exp(sum(nll.values()) / sum(tokens.values()))
    assert df.loc["all", "ppl"] == pytest.approx(expected_all, rel=1e-5)
    # one row per window, none for "all": each window's own NLL and predicted tokens
    windows = df.attrs["windows"]
    assert list(windows.columns) == ["source", "window", "nll", "tokens"]
    assert windows.groupby("source", sort=False).size().to_dict() == {"prose": 11, "code": 9}
    for row in windows.sample(4, random_state=0).itertuples():
        row_nll, row_tokens = reference_nll(byte_model, validation[row.source][row.window:row.window + 1])
        assert row.tokens == row_tokens == 15 and row.nll == pytest.approx(row_nll, rel=1e-5)
    pooled = windows.groupby("source").sum()
    for name in validation:
        assert pooled.loc[name, "tokens"] == tokens[name] and pooled.loc[name, "nll"] == pytest.approx(nll[name], rel=1e-5)
    # dense: everything activated, no layer rows
    assert (df["activated_params_pct"] == 100.0).all()
    assert df["mean_active_experts"].isna().all()
    assert df.attrs["layers"].empty


def test_max_sequences_and_batching(byte_model):
    windows = byte_windows(TEXT["prose"], 16)
    a = evaluate_ppl(byte_model, {"p": windows}, batch_size=3, max_sequences=5, progress=False)
    b = evaluate_ppl(byte_model, {"p": windows[:5]}, batch_size=5, progress=False)
    assert a.loc[0, "tokens"] == 5 * 15
    assert a.attrs["windows"]["window"].tolist() == list(range(5))
    np.testing.assert_allclose(a.attrs["windows"]["nll"], b.attrs["windows"]["nll"], rtol=1e-6)
    assert a.loc[0, "ppl"] == pytest.approx(b.loc[0, "ppl"], rel=1e-6)


def test_tau_near_zero_activates_everything(byte_model):
    model = dsmoe.convert(byte_model, n_experts=4, tau=1e-6).eval()
    total = sum(p.numel() for p in model.parameters())
    df = evaluate_ppl(model, {"p": byte_windows(TEXT["prose"], 16)}, progress=False)
    assert df["activated_params"].tolist() == [total, total]
    assert df["activated_params_pct"].tolist() == [100.0, 100.0]
    assert (df.attrs["layers"]["mean_active_experts"] == 4).all()


def test_forced_routing_matches_hand_count(byte_model):
    n, open_per_layer = 4, [2, 3]
    model = dsmoe.convert(byte_model, n_experts=n, tau=0.5).eval()
    for layer, k in zip(dsmoe.dsmoe_layers(model), open_per_layer):
        logits = torch.tensor([10.0] * k + [-10.0] * (n - k))  # σ ≈ 1 for the first k experts, ≈ 0 for the rest
        layer.gate_logits = lambda x, logits=logits: logits.expand(x.shape[0], -1)
    cfg = byte_model.config
    ffn = 3 * cfg.hidden_size * cfg.intermediate_size
    total = sum(p.numel() for p in model.parameters())
    expected = total - sum(ffn * (1 - k / n) for k in open_per_layer)
    df = evaluate_ppl(model, {"p": byte_windows(TEXT["prose"], 16)}, progress=False).set_index("source")
    assert df.loc["all", "activated_params"] == pytest.approx(expected)
    assert df.loc["all", "activated_params_pct"] == pytest.approx(100 * expected / total)
    assert df.loc["all", "mean_active_experts"] == pytest.approx(np.mean(open_per_layer))
    layers = df.attrs["layers"]
    assert layers[layers.source == "all"]["mean_active_experts"].tolist() == open_per_layer
    # the routing really is forced: the output equals a dense FFN restricted to the open units, rescaled n/k
    with torch.no_grad():
        hidden = torch.randn(1, 5, cfg.hidden_size)
        layer = dsmoe.dsmoe_layers(model)[0]
        unit = cfg.intermediate_size // n
        keep = slice(0, 2 * unit)
        dense = (torch.nn.functional.silu(hidden @ layer.gate_proj.weight[keep].T) * (hidden @ layer.up_proj.weight[keep].T)) @ layer.down_proj.weight[:, keep].T
        sig = torch.sigmoid(torch.tensor(10.0))
        torch.testing.assert_close(layer(hidden), dense * sig * n / 2, rtol=1e-4, atol=1e-5)


def test_sweep_activation_falls_with_tau(byte_model):
    model = dsmoe.convert(byte_model, n_experts=4, tau=0.5, gate_init_std=1.0).eval()
    validation = {name: byte_windows(text, 16) for name, text in TEXT.items()}
    taus = [0.1, 0.3, 0.5, 0.7, 0.9]
    df = sweep_tau(model, validation, taus, batch_size=4, max_sequences=4, progress=False)
    assert df["tau"].tolist() == taus
    assert list(df.columns[:5]) == ["tau", "ppl", "activated_params", "activated_params_pct", "mean_active_experts"]
    assert {"ppl_prose", "ppl_code"} <= set(df.columns)
    assert (np.diff(df["activated_params_pct"]) < 0).all()
    assert (np.diff(df["mean_active_experts"]) < 0).all()
    assert model.config.tau == 0.5 and dsmoe.dsmoe_layers(model)[0].tau == 0.5  # restored
    at_half = evaluate_ppl(model, validation, max_sequences=4, progress=False).set_index("source")
    assert df.set_index("tau").loc[0.5, "ppl"] == pytest.approx(at_half.loc["all", "ppl"])
    assert set(df.attrs["layers"]["tau"]) == set(taus)
    windows = df.attrs["windows"]
    assert list(windows.columns) == ["tau", "source", "window", "nll", "tokens"] and len(windows) == len(taus) * 2 * 4
    at_tau = windows[windows["tau"] == 0.5]
    assert math.exp(at_tau["nll"].sum() / at_tau["tokens"].sum()) == pytest.approx(at_half.loc["all", "ppl"], rel=1e-9)


def test_sweep_refuses_dense_topk_and_bad_tau(byte_model, llama_config):
    with pytest.raises(ValueError, match="dense model"):
        sweep_tau(byte_model, {"p": byte_windows(TEXT["prose"], 16)})
    model = dsmoe.convert(byte_model, n_experts=4, tau=0.5)
    with pytest.raises(ValueError, match="open interval"):
        sweep_tau(model, {"p": byte_windows(TEXT["prose"], 16)}, taus=[0.5, 1.0])
    topk = dsmoe.convert(LlamaForCausalLM(llama_config(vocab_size=256)), n_experts=4, variant="topk", top_k=2)
    with pytest.raises(ValueError, match="topk"):
        sweep_tau(topk, {"p": byte_windows(TEXT["prose"], 16)})


# ---------------------------------------------------------------- CLI on a DATA directory


def write_data(root, seq_len=12, n_val=(5, 3), vocab=1000, seed=0):
    """A tiny DATA directory in the `dsmoe data prepare` layout."""
    rng = np.random.default_rng(seed)
    manifest = {"seq_len": seq_len, "tokenizer": "test", "sources": {}}
    for source, n in zip(["stdlib-code", "stdlib-prose"], n_val):
        (root / source).mkdir(parents=True)
        np.save(root / source / "val.npy", rng.integers(0, vocab, (n, seq_len)).astype(np.int32))
        np.save(root / source / "train.npy", rng.integers(0, vocab, 100).astype(np.int32))
        manifest["sources"][source] = {"train_tokens": 100, "val_sequences": n, "weight": 0.5}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def moe_dir(tiny_model_dir, tmp_path_factory):
    model, tokenizer = dsmoe.load_model(str(tiny_model_dir))
    torch.manual_seed(1)
    model = dsmoe.convert(model, n_experts=4, tau=0.5, gate_init_std=1.0)
    path = tmp_path_factory.mktemp("moe") / "run1" / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_load_validation(tmp_path):
    data = write_data(tmp_path / "DATA")
    validation = load_validation(data)
    assert {k: v.shape for k, v in validation.items()} == {"stdlib-code": (5, 12), "stdlib-prose": (3, 12)}
    np.save(data / "stdlib-code" / "val.npy", np.zeros((2, 7), dtype=np.int32))
    with pytest.raises(ValueError, match="shape"):
        load_validation(data)
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_validation(tmp_path)


def test_cli_ppl_writes_contract_and_skips_rerun(moe_dir, tmp_path, capsys):
    data = write_data(tmp_path / "DATA")
    out = tmp_path / "ppl"
    assert cli.main(["eval", "ppl", "--model", str(moe_dir), "--data", str(data), "--out", str(out), "--tau", "0.4"]) == 0
    ppl, layers, windows = (pd.read_csv(out / f"{name}.csv") for name in ("ppl", "layers", "windows"))
    assert list(ppl.columns) == ["model", "variant", "tau", "source", "ppl", "tokens", "activated_params",
                                 "activated_params_pct", "mean_active_experts"]
    assert list(layers.columns) == ["model", "variant", "tau", "source", "layer", "mean_active_experts"]
    assert ppl["source"].tolist() == ["stdlib-code", "stdlib-prose", "all"]
    assert set(ppl["model"]) == {"run1"} and set(ppl["variant"]) == {"dsmoe"} and set(ppl["tau"]) == {0.4}
    assert ppl["tokens"].tolist() == [5 * 11, 3 * 11, 8 * 11]
    assert len(layers) == 3 * 2 and (ppl["activated_params_pct"] < 100).all()
    assert list(windows.columns) == ["model", "variant", "tau", "source", "window", "nll", "tokens"]
    assert windows["source"].tolist() == ["stdlib-code"] * 5 + ["stdlib-prose"] * 3
    assert windows["window"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2] and set(windows["tokens"]) == {11}
    assert set(windows["model"]) == {"run1"} and set(windows["variant"]) == {"dsmoe"} and set(windows["tau"]) == {0.4}
    assert math.exp(windows["nll"].sum() / windows["tokens"].sum()) == pytest.approx(ppl["ppl"].iloc[-1], rel=1e-9)
    mtime = (out / "ppl.csv").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["eval", "ppl", "--model", str(moe_dir), "--data", str(data), "--out", str(out), "--tau", "0.4"]) == 0
    assert "up to date" in capsys.readouterr().out and (out / "ppl.csv").stat().st_mtime_ns == mtime
    assert cli.main(["eval", "ppl", "--model", str(moe_dir), "--data", str(data), "--out", str(out), "--tau", "0.6",
                     "--label", "x", "--max-sequences", "2"]) == 0
    ppl = pd.read_csv(out / "ppl.csv")
    assert set(ppl["tau"]) == {0.6} and set(ppl["model"]) == {"x"} and ppl["tokens"].tolist() == [22, 22, 44]


def test_cli_sweep(moe_dir, tmp_path):
    data = write_data(tmp_path / "DATA")
    out = tmp_path / "sweep.csv"
    assert cli.main(["eval", "sweep", "--model", str(moe_dir), "--data", str(data), "--out", str(out),
                     "--taus", "0.2", "0.5", "0.8", "--layers-out", str(tmp_path / "layers.csv"),
                     "--windows-out", str(tmp_path / "windows.csv")]) == 0
    df = pd.read_csv(out)
    assert list(df.columns[:7]) == ["model", "variant", "tau", "ppl", "activated_params", "activated_params_pct", "mean_active_experts"]
    assert df["tau"].tolist() == [0.2, 0.5, 0.8] and (np.diff(df["activated_params_pct"]) < 0).all()
    assert len(pd.read_csv(tmp_path / "layers.csv")) == 3 * 3 * 2
    windows = pd.read_csv(tmp_path / "windows.csv")
    assert list(windows.columns) == ["model", "variant", "tau", "source", "window", "nll", "tokens"] and len(windows) == 3 * 8
    pooled = windows.groupby("tau").sum(numeric_only=True)
    np.testing.assert_allclose(np.exp(pooled["nll"] / pooled["tokens"]), df["ppl"], rtol=1e-9)


def test_cli_milestones_windows_name_each_model(moe_dir, tmp_path):
    """`eval milestones --windows-out`: each model's windows, named by step and train_tokens (a milestone and the final model)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(moe_dir, run / "model")
    shutil.copytree(moe_dir, run / "milestones" / "step_2")
    (run / "milestones" / "step_2" / "milestone.json").write_text(json.dumps({"step": 2, "tokens": 64, "milestone_tokens": 60}))
    (run / "train_log.csv").write_text("step,tokens\n1,32\n4,128\n")
    data, out, windows_out = write_data(tmp_path / "DATA"), tmp_path / "milestones.csv", tmp_path / "milestone_windows.csv"
    assert cli.main(["eval", "milestones", "--run", str(run), "--data", str(data), "--out", str(out),
                     "--windows-out", str(windows_out)]) == 0
    df, windows = pd.read_csv(out), pd.read_csv(windows_out)
    assert list(windows.columns) == ["model", "variant", "step", "train_tokens", "final", "source", "window", "nll", "tokens"]
    assert windows.groupby(["step", "train_tokens", "final"]).size().to_dict() == {(2, 64, False): 8, (4, 128, True): 8}
    overall = df[df["source"] == "all"].set_index("step")["ppl"]
    for step, rows in windows.groupby("step"):
        assert math.exp(rows["nll"].sum() / rows["tokens"].sum()) == pytest.approx(overall[step], rel=1e-9)


def test_cli_errors(tiny_model_dir, moe_dir, tmp_path, capsys):
    data = write_data(tmp_path / "DATA")
    base = ["--data", str(data), "--out", str(tmp_path / "o")]
    assert cli.main(["eval", "ppl", "--model", str(moe_dir), "--tau", "1.5", *base]) == 2
    assert "open interval" in capsys.readouterr().err
    assert cli.main(["eval", "sweep", "--model", str(tiny_model_dir), *base]) == 2
    assert "dense model" in capsys.readouterr().err
    assert cli.main(["eval", "ppl", "--model", str(tiny_model_dir), "--tau", "0.5", *base]) == 2
    assert "no DSMoE layer" in capsys.readouterr().err
    not_lm = tmp_path / "not_lm"
    not_lm.mkdir()
    (not_lm / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert cli.main(["eval", "ppl", "--model", str(not_lm), *base]) == 2
    assert "cannot load a causal LM" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_model_label_variant_and_tau(byte_model, llama_config):
    assert model_label("results/run/dsmoe/model/") == "dsmoe"
    assert model_label("/x/smollm2-135m-dense") == "smollm2-135m-dense"
    assert model_method(byte_model) == "dense" and math.isnan(model_tau(byte_model))
    assert model_method(byte_model, "dense_continued") == "dense_continued"
    assert model_method(byte_model, "my-run") == "dense"
    moe = dsmoe.convert(byte_model, n_experts=4, tau=0.3, variant="no_gx")
    assert model_method(moe, "dense_continued") == "no_gx" and model_tau(moe) == 0.3
    topk = dsmoe.convert(LlamaForCausalLM(llama_config(vocab_size=256)), n_experts=4, variant="topk", top_k=2)
    assert math.isnan(model_tau(topk))


def test_pruned_model_counts_activated_params_against_its_parent(tmp_path):
    import json as _json

    import pandas as _pd


    summary = _pd.DataFrame({"source": ["a", "all"], "activated_params": [10.0, 10.0], "activated_params_pct": [100.0, 100.0]})
    assert apply_pruning_record(summary, tmp_path).equals(summary)
    (tmp_path / "pruning.json").write_text(_json.dumps({"activated_params": 6.0, "activated_params_pct": 60.0}))
    pruned = apply_pruning_record(summary, tmp_path)
    assert pruned["activated_params_pct"].tolist() == [60.0, 60.0] and pruned["activated_params"].tolist() == [6.0, 6.0]


# ---------------------------------------------------------------- padded validation rows (sample_mode truncate)


def test_padding_is_neither_predicted_nor_routed(byte_model):
    from dsmoe.data import PAD

    rows = byte_windows(TEXT["prose"], 16)[:6].copy()
    lengths = [16, 9, 4, 12, 2, 16]
    for row, n in zip(rows, lengths):
        row[n:] = PAD
    torch.manual_seed(2)
    moe = dsmoe.convert(byte_model, n_experts=4, tau=0.5, gate_init_std=1.0).eval()
    df = evaluate_ppl(moe, {"prose": rows}, batch_size=3, progress=False).set_index("source")
    nll, tokens = reference_nll(moe, [row[:n] for row, n in zip(rows, lengths)])
    assert df.loc["prose", "tokens"] == tokens == sum(n - 1 for n in lengths)
    assert df.loc["prose", "ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert df.attrs["windows"]["tokens"].tolist() == [n - 1 for n in lengths]  # padding is no predicted token
    with dsmoe.RoutingRecorder(moe) as recorder:  # the same rows unpadded, one at a time
        for row, n in zip(rows, lengths):
            moe(torch.as_tensor(row[None, :n], dtype=torch.long))
    assert df.loc["prose", "activated_params_pct"] == pytest.approx(recorder.report()["activated_params_pct"], rel=1e-9)


# ---------------------------------------------------------------- Fig. 2 both ways


def test_cli_sweep_no_gx_with_and_without_inference_rescale(tiny_model_dir, tmp_path):
    model, tokenizer = dsmoe.load_model(str(tiny_model_dir))
    torch.manual_seed(1)
    dsmoe.convert(model, n_experts=4, tau=0.5, variant="no_gx", gate_init_std=1.0).save_pretrained(tmp_path / "no_gx")
    tokenizer.save_pretrained(tmp_path / "no_gx")
    data = write_data(tmp_path / "DATA")
    curves = {}
    for flag, label in (("true", "no_gx"), ("false", "no_gx_unscaled")):
        out = tmp_path / f"{label}.csv"
        assert cli.main(["eval", "sweep", "--model", str(tmp_path / "no_gx"), "--data", str(data), "--out", str(out),
                         "--label", label, "--taus", "0.3", "0.6", "--no-gx-inference-rescale", flag]) == 0
        curves[label] = pd.read_csv(out)
    assert curves["no_gx"]["inference_rescale"].tolist() == [True, True]
    assert curves["no_gx_unscaled"]["inference_rescale"].tolist() == [False, False]
    assert set(curves["no_gx_unscaled"]["variant"]) == {"no_gx"} and set(curves["no_gx_unscaled"]["model"]) == {"no_gx_unscaled"}
    assert not np.allclose(curves["no_gx"]["ppl"], curves["no_gx_unscaled"]["ppl"])  # two different curves
    assert dsmoe.load_model(str(tmp_path / "no_gx"))[0].config.no_gx_inference_rescale is True  # checkpoint untouched
