"""Baselines: top-k router (LLaMA-MoE), training-free drop, channel and Wanda pruning.

Each numerical check compares with an independent plain-torch write-up of the rule, in float64.
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import dsmoe
from dsmoe.data import calibration_windows
from dsmoe.baselines.drop import DropRecorder, PartitionedDropMLP, partition_for_drop, set_threshold
from dsmoe.baselines.pruning import (
    check_fraction,
    fraction_for_activated_pct,
    prune,
    prune_channels,
    prune_wanda,
    taylor_channel_importance,
    wanda_input_norms,
)



def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).double().eval()


def tokens(batch=3, length=10, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def swiglu_expert(x, w_gate, w_up, w_down, i, n):
    """o_i: expert i's SwiGLU output on its slice of the intermediate dimension."""
    rows = slice(i * w_gate.shape[0] // n, (i + 1) * w_gate.shape[0] // n)
    return (F.silu(x @ w_gate[rows].T) * (x @ w_up[rows].T)) @ w_down[:, rows].T


# ---------------------------------------------------------------- top-k, Switch style (not the paper's) -

def topk_model(n=8, k=3, seed=0):
    model = dsmoe.convert(tiny_llama(seed), n_experts=n, variant="topk_switch", top_k=k)
    with torch.no_grad():  # a wider gate than the default init so that routing is far from uniform
        for layer in dsmoe.dsmoe_layers(model):
            layer.gate.weight.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("training", [True, False])
def test_topk_activates_exactly_k_experts(training):
    n, k = 8, 3
    model = topk_model(n, k).train(training)
    with dsmoe.RoutingRecorder(model) as recorder:
        model(input_ids=tokens())
    for hist in recorder.report()["k_histogram"]:
        assert hist[k] == 30 and sum(hist) == 30
    for layer in dsmoe.dsmoe_layers(model):
        assert (layer.last_active.sum(-1) == k).all()


@pytest.mark.parametrize("training", [True, False])
def test_topk_layer_matches_plain_reference(training):
    n, k = 8, 3
    layer = dsmoe.dsmoe_layers(topk_model(n, k))[0].train(training)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    out = layer(x)
    flat = x.reshape(-1, 32)
    probs = torch.softmax(flat @ layer.gate.weight.T, dim=-1)
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        top = torch.topk(probs[t], k).indices
        weights = probs[t, top] / probs[t, top].sum() * n
        for w, i in zip(weights, top.tolist()):
            expected[t] += w * swiglu_expert(flat[t], layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight, i, n)
    torch.testing.assert_close(out.reshape(-1, 32), expected, rtol=1e-10, atol=1e-12)


def test_load_balancing_loss_is_switch_formula():
    n, k = 8, 3
    model = topk_model(n, k).train()
    layers = dsmoe.dsmoe_layers(model)
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for layer in layers]
    model(input_ids=tokens())
    for h in hooks:
        h.remove()
    loss = dsmoe.load_balancing_loss(model)
    terms = []
    for layer, x in zip(layers, inputs):
        probs = torch.softmax(x.reshape(-1, 32) @ layer.gate.weight.T, dim=-1)
        chosen = torch.zeros_like(probs).scatter_(-1, torch.topk(probs, k).indices, 1.0)
        f = chosen.sum(0) / (chosen.shape[0] * k)  # fraction of the T·k routed slots sent to expert i
        terms.append(n * (f * probs.mean(0)).sum())
    expected = torch.stack(terms).mean()
    # the core computes f_i in float32 (`active.float()`), hence the float32-level tolerance
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-9)
    gate_weights = [layer.gate.weight for layer in layers]
    got = torch.autograd.grad(loss, gate_weights, retain_graph=True)
    want = torch.autograd.grad(expected, gate_weights)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("variant", ["topk", "topk_switch"])
@pytest.mark.parametrize("top_k", [0, 9])
def test_topk_out_of_range_errors(top_k, variant):
    with pytest.raises(ValueError, match="top_k"):
        dsmoe.convert(tiny_llama(), n_experts=8, variant=variant, top_k=top_k)


# ---------------------------------------------------------------- training-free drop -----------------

@pytest.mark.parametrize("rule", ["expert", "cumulative"])
def test_drop_threshold_zero_equals_dense_exactly(rule):
    dense = tiny_llama()
    ids = tokens()
    expected = dense(input_ids=ids).logits
    model = partition_for_drop(copy.deepcopy(dense), n_experts=8, threshold=0.0, rule=rule)
    with DropRecorder(model) as recorder:
        got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    report = recorder.report()
    assert report["mean_active_experts"] == [8.0, 8.0]
    assert report["activated_params_pct"] == pytest.approx(100.0)


@pytest.mark.parametrize("rule, threshold", [("expert", 0.3), ("cumulative", 0.5)])
def test_drop_layer_matches_plain_reference(rule, threshold):
    n = 8
    mlp = tiny_llama().model.layers[0].mlp
    layer = PartitionedDropMLP.from_dense(mlp, n, threshold, rule)
    x = torch.randn(5, 32, dtype=torch.float64)
    out = layer(x)
    weights = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    expected = torch.zeros_like(x)
    kept = torch.zeros(5, n, dtype=torch.bool)
    for t in range(5):
        outputs = [swiglu_expert(x[t], *weights, i, n).detach() for i in range(n)]
        total = torch.stack(outputs).sum(0)
        full = total.norm()
        ratios = [float(o.norm() / full) for o in outputs]
        if rule == "expert":
            keep = [r >= threshold for r in ratios]
        else:  # drop the smallest while the dropped ratios sum to less than the threshold
            keep, dropped_sum = [True] * n, 0.0
            for i in sorted(range(n), key=ratios.__getitem__):
                if dropped_sum + ratios[i] >= threshold:
                    break
                keep[i], dropped_sum = False, dropped_sum + ratios[i]
            assert (total - sum(o for o, k in zip(outputs, keep) if k)).norm() < threshold * full  # the error bound
        for i, o in enumerate(outputs):
            if keep[i]:
                expected[t] += o
                kept[t, i] = True
    assert 0 < kept.sum() < kept.numel()  # the threshold drops some experts and keeps others
    assert torch.equal(layer.last_active, kept)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-10, atol=1e-12)


def test_drop_activated_params_table1_rule():
    model = partition_for_drop(tiny_llama(), n_experts=4)
    set_threshold(model, 0.2)  # below 1/n (issue 28)
    with DropRecorder(model) as recorder:
        model(input_ids=tokens())
    report = recorder.report()
    total = sum(p.numel() for p in model.parameters())
    ffn = 3 * 32 * 64  # per layer
    kept = [float(layer.last_active.sum(-1).double().mean()) for layer in model.modules() if isinstance(layer, PartitionedDropMLP)]
    assert report["mean_active_experts"] == pytest.approx(kept)
    expected = total - 2 * ffn + sum(ffn * k / 4 for k in kept)
    assert report["activated_params"] == pytest.approx(expected)
    assert report["activated_params_pct"] == pytest.approx(100 * expected / total)


@pytest.mark.parametrize("n_experts, threshold, rule", [(5, 0.0, "expert"), (8, -0.1, "expert"), (8, float("nan"), "expert"), (8, 0.1, "topk")])
def test_drop_bad_arguments(n_experts, threshold, rule):
    model = tiny_llama()
    with pytest.raises(ValueError, match="n_experts|threshold|rule"):
        partition_for_drop(model, n_experts, threshold, rule)
    assert not isinstance(model.model.layers[0].mlp, PartitionedDropMLP)  # nothing half-done


# ---------------------------------------------------------------- pruning ---------------------------

@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_pruning_fraction_out_of_range_errors(fraction):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        check_fraction(fraction)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_channels(model, fraction, [torch.rand(64) for _ in range(2)])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_wanda(model, fraction, {})


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.6])
def test_channel_pruning_removes_fraction_and_matches_masked_dense(fraction):
    dense = tiny_llama()
    importance = [torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    pruned = copy.deepcopy(dense)
    removed = prune_channels(pruned, fraction, importance)
    n_remove = round(fraction * 64)
    assert pruned.config.intermediate_size == 64 - n_remove
    for layer, drop, score in zip(pruned.model.layers, removed, importance):
        assert layer.mlp.gate_proj.weight.shape == (64 - n_remove, 32)
        assert layer.mlp.down_proj.weight.shape == (32, 64 - n_remove)
        assert set(drop.tolist()) == set(torch.argsort(score)[:n_remove].tolist())  # the least important units
    masked = copy.deepcopy(dense)  # independent: the dense model with the removed units' outputs zeroed
    with torch.no_grad():
        for layer, drop in zip(masked.model.layers, removed):
            layer.mlp.down_proj.weight[:, drop] = 0.0
    ids = tokens()
    torch.testing.assert_close(pruned(input_ids=ids).logits, masked(input_ids=ids).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.7])
def test_wanda_zeros_exact_fraction_of_lowest_scores(fraction):
    model = tiny_llama()
    norms = wanda_input_norms(model, tokens(4, 12))
    original = {(i, name): getattr(layer.mlp, name).weight.detach().clone()
                for i, layer in enumerate(model.model.layers) for name in ("gate_proj", "up_proj", "down_proj")}
    prune_wanda(model, fraction, norms)
    for (i, name), weight in original.items():
        pruned = getattr(model.model.layers[i].mlp, name).weight
        k = round(fraction * weight.shape[1])
        assert ((pruned == 0).sum(1) == k).all()
        score = weight.abs() * norms[(i, name)]
        for row in range(weight.shape[0]):
            lowest = set(torch.argsort(score[row])[:k].tolist())
            assert set((pruned[row] == 0).nonzero().flatten().tolist()) == lowest
        kept = pruned != 0
        assert torch.equal(pruned[kept], weight[kept])


def test_wanda_input_norms_match_manual_activations():
    model = tiny_llama(layers=1)
    ids = tokens(2, 9)
    norms = wanda_input_norms(model, ids, batch_size=1)
    hidden = model.model.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
    cos_sin = model.model.rotary_emb(hidden, position_ids)
    layer = model.model.layers[0]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf"), dtype=hidden.dtype).triu(1)
    attn, _ = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=cos_sin, attention_mask=mask)
    x = layer.post_attention_layernorm(hidden + attn).reshape(-1, 32)
    inter = F.silu(x @ layer.mlp.gate_proj.weight.T) * (x @ layer.mlp.up_proj.weight.T)
    torch.testing.assert_close(norms[(0, "gate_proj")], x.norm(dim=0), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(norms[(0, "down_proj")], inter.norm(dim=0), rtol=1e-8, atol=1e-10)


def test_taylor_importance_matches_autograd():
    model = tiny_llama()
    calibration = tokens(3, 8)
    scores = taylor_channel_importance(model, calibration, batch_size=2)
    weights = [getattr(layer.mlp, name).weight for layer in model.model.layers for name in ("gate_proj", "up_proj", "down_proj")]
    loss = model(input_ids=calibration[:2], labels=calibration[:2]).loss + model(input_ids=calibration[2:], labels=calibration[2:]).loss
    grads = torch.autograd.grad(loss, weights)
    for i in range(2):
        (gw, uw, dw), (gg, ug, dg) = weights[3 * i : 3 * i + 3], grads[3 * i : 3 * i + 3]
        expected = (gw * gg).abs().sum(1) + (uw * ug).abs().sum(1) + (dw * dg).abs().sum(0)
        torch.testing.assert_close(scores[i], expected.detach(), rtol=1e-8, atol=1e-12)
    assert all(w.grad is None for w in weights)


@pytest.mark.parametrize("kind", ["ffn_channel", "wanda", "sparsegpt"])
def test_match_activated_pct(kind):
    model = tiny_llama()
    fraction = fraction_for_activated_pct(model, 80.0, kind)
    _, summary = prune(model, kind, fraction, tokens(2, 8))
    # one unit per layer (ffn_channel), one weight per row (wanda) or per matrix (sparsegpt)
    step = 100 * 2 * 3 * 32 / summary["reference_total_params"]
    assert summary["activated_params_pct"] == pytest.approx(80.0, abs=step)
    with pytest.raises(ValueError, match="cannot reach"):
        fraction_for_activated_pct(tiny_llama(), 5.0)


def write_fixture_data(root, seq_len=8):
    rng = np.random.default_rng(0)
    sources = {}
    for name in ("code", "prose"):
        (root / name).mkdir(parents=True)
        np.save(root / name / "train.npy", rng.integers(0, 128, 500, dtype=np.int32))
        np.save(root / name / "val.npy", rng.integers(0, 128, (3, seq_len), dtype=np.int32))
        sources[name] = {"train_tokens": 500, "val_sequences": 3, "weight": 0.5}
    (root / "manifest.json").write_text(json.dumps({"seq_len": seq_len, "tokenizer": "x", "sources": sources}))
    return root


def test_load_calibration_windows(tmp_path):
    data = write_fixture_data(tmp_path / "data")
    calibration = calibration_windows(data, 5)
    assert calibration.shape == (5, 8) and calibration.dtype == torch.long
    stream = np.load(data / "code" / "train.npy")
    assert np.array_equal(calibration[0].numpy(), stream[:8])
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        calibration_windows(tmp_path, 5)


def test_cli_prune_and_drop(tmp_path, smollm2_tokenizer):
    from dsmoe.cli import main

    data = write_fixture_data(tmp_path / "data")
    model_dir = tmp_path / "tiny"
    tiny_llama().float().save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "pruned"
    assert main(["baseline", "prune", "--model", str(model_dir), "--kind", "ffn_channel", "--fraction", "0.25",
                 "--data", str(data), "--calibration-sequences", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "pruning.json").read_text())
    assert summary["intermediate_size"] == 48
    reloaded, _ = dsmoe.load_model(str(out))
    assert reloaded.model.layers[0].mlp.up_proj.weight.shape == (48, 32)
    assert main(["baseline", "prune", "--model", str(model_dir), "--kind", "wanda", "--fraction", "1.0",
                 "--data", str(data), "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    csv = tmp_path / "drop.csv"
    assert main(["baseline", "drop", "--model", str(model_dir), "--data", str(data), "--thresholds", "0", "0.2",
                 "--n-experts", "4", "--out", str(csv)]) == 0
    import pandas as pd

    df = pd.read_csv(csv)
    assert list(df.threshold) == [0.0, 0.2]
    assert df.activated_params_pct[0] == pytest.approx(100.0) and df.mean_active_experts[0] == 4.0
    assert df.activated_params_pct[1] < 100.0 and {"ppl_code", "ppl_prose", "ppl_all"} <= set(df.columns)
