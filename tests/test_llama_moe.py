"""The LLaMA-MoE baseline (`topk` variant): its noisy MLP gate, n/k score scale and CV² balance loss,
each against a plain float64 write-up of LLaMA-MoE's code; and the neuron splits of `convert`."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import dsmoe
from dsmoe.model import NoisyTopKGate


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).double().eval()


def llama_moe(n=8, k=3, seed=0):
    model = dsmoe.convert(tiny_llama(seed), n_experts=n, variant="topk", top_k=k)
    with torch.no_grad():  # noise weights away from their zero init, so that a missed noise switch shows
        for layer in dsmoe.dsmoe_layers(model):
            layer.gate.weight_noise.weight.normal_(0, 1.0)
    return model


def expert_out(x, mlp, i, n):
    rows = slice(i * mlp.gate_proj.out_features // n, (i + 1) * mlp.gate_proj.out_features // n)
    return (F.silu(x @ mlp.gate_proj.weight[rows].T) * (x @ mlp.up_proj.weight[rows].T)) @ mlp.down_proj.weight[:, rows].T


def clean_logits(gate, x):
    w1, w2 = gate.gate_network[0].weight, gate.gate_network[2].weight
    return torch.tanh(x @ w1.T) @ w2.T


def test_gate_is_mlp_with_zero_noise_weights_at_conversion():
    layer = dsmoe.dsmoe_layers(dsmoe.convert(tiny_llama(), n_experts=8, variant="topk", top_k=3))[0]
    assert isinstance(layer.gate, NoisyTopKGate)
    assert layer.gate.gate_network[0].weight.shape == (8, 32) and layer.gate.gate_network[2].weight.shape == (8, 8)
    assert (layer.gate.weight_noise.weight == 0).all() and layer.gate.gate_network[0].weight.abs().sum() > 0


def test_eval_weights_are_softmax_over_top_k_logits_times_n_over_k():
    n, k = 8, 3
    layer = dsmoe.dsmoe_layers(llama_moe(n, k))[0].eval()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    out = layer(x)
    again = layer(x)
    assert torch.equal(out, again)  # no noise in eval
    flat = x.reshape(-1, 32)
    logits = clean_logits(layer.gate, flat)
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        top = torch.topk(logits[t], k).indices
        scores = torch.exp(logits[t, top]) / torch.exp(logits[t, top]).sum()
        assert float(scores.detach().sum()) == pytest.approx(1.0)
        torch.testing.assert_close(layer.last_gate_probs[t, top].double(), scores, rtol=1e-6, atol=1e-8)
        assert int(layer.last_active[t].sum()) == k and bool(layer.last_active[t, top].all())
        for w, i in zip(scores, top.tolist()):
            expected[t] += w * (n / k) * expert_out(flat[t], layer, i, n)
    # the gate routes in float32 (as LLaMA-MoE's softmax), hence a float32-level tolerance
    torch.testing.assert_close(out.reshape(-1, 32), expected, rtol=1e-5, atol=1e-6)


def test_training_adds_learned_noise():
    layer = dsmoe.dsmoe_layers(llama_moe())[0].train()
    x = torch.randn(40, 32, dtype=torch.float64)
    torch.manual_seed(0)
    first = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(first, layer(x))  # fresh noise, other routes for some tokens


def reference_cv_loss(gate, x, noise_draw, k):
    """LLaMA-MoE's balance loss for one layer, float64, with its noise draw N(0, 1) given."""
    clean = clean_logits(gate, x)
    control = F.softplus(x @ gate.weight_noise.weight.T) + 0.01
    noise = noise_draw * control
    logits = clean + noise
    top_logits, top_idx = logits.topk(k + 1, dim=-1)
    scores = torch.zeros_like(logits).scatter(-1, top_idx[:, :k], torch.softmax(top_logits[:, :k], -1))
    importance = scores.sum(0)
    cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    threshold_in, threshold_out = top_logits[:, k:k + 1], top_logits[:, k - 1:k]
    prob = torch.where(noise > threshold_in, cdf((clean - threshold_in) / control), cdf((clean - threshold_out) / control))
    load = prob.sum(0)
    cv2 = lambda v: ((v - v.mean()) ** 2).sum() / (len(v) - 1) / (v.mean() ** 2 + 1e-10)  # noqa: E731
    return cv2(importance) + cv2(load)


def test_cv_squared_balance_loss_against_formula():
    n, k = 8, 3
    layer = dsmoe.dsmoe_layers(llama_moe(n, k))[0].train()
    x = torch.randn(50, 32, dtype=torch.float64)
    torch.manual_seed(7)
    layer(x)
    loss = dsmoe.cv_balance_loss(layer)
    torch.manual_seed(7)
    noise_draw = torch.randn(50, n).double()  # the same float32 draw as the forward's randn_like
    expected = reference_cv_loss(layer.gate, x, noise_draw, k)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-7)  # the gate runs in float32
    grads = torch.autograd.grad(loss, [layer.gate.gate_network[0].weight, layer.gate.weight_noise.weight])
    assert all(g.abs().sum() > 0 for g in grads)  # the loss trains the gate and the noise through `load`
    layer.eval()(x)  # eval: load counts routed tokens
    counts = layer.last_active.float().sum(0)
    assert torch.equal(layer.gate.last_load, counts)


def test_cv_balance_loss_sums_layers_and_refuses_other_gates():
    model = llama_moe().train()
    model(input_ids=torch.randint(0, 128, (2, 9)))
    layers = dsmoe.dsmoe_layers(model)
    per_layer = [dsmoe.cv_balance_loss(layer) for layer in layers]
    torch.testing.assert_close(dsmoe.cv_balance_loss(model), sum(per_layer))
    switch = dsmoe.convert(tiny_llama(), n_experts=8, variant="topk_switch", top_k=3)
    switch(input_ids=torch.randint(0, 128, (1, 5)))
    with pytest.raises(ValueError, match="LLaMA-MoE gate"):
        dsmoe.cv_balance_loss(switch)


def test_llama_moe_saves_and_reloads(tmp_path):
    model = llama_moe().float()
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    a, b = dsmoe.dsmoe_layers(model)[0].gate, dsmoe.dsmoe_layers(reloaded)[0].gate
    assert torch.equal(a.weight_noise.weight, b.weight_noise.weight)


# ---------------------------------------------------------------- neuron splits ----------------------

def ffn(mlp, x):
    return (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


@pytest.mark.parametrize("partition", ["random", "coactivation"])
def test_partition_permutes_units_and_keeps_the_dense_function(partition):
    dense = tiny_llama()
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(2))
    model = dsmoe.convert(copy.deepcopy(dense), n_experts=4, variant="topk", top_k=4, partition=partition,
                          partition_ids=ids)
    assert model.config.partition == partition
    x = torch.randn(20, 32, dtype=torch.float64)
    for old, new in zip(dense.model.layers, model.model.layers):
        rows_old = {tuple(r.tolist()) for r in old.mlp.gate_proj.weight}
        order = [next(j for j in range(64) if torch.equal(old.mlp.gate_proj.weight[j], r)) for r in new.mlp.gate_proj.weight]
        assert sorted(order) == list(range(64)) and order != list(range(64))  # a true permutation
        assert len(rows_old) == 64
        torch.testing.assert_close(new.mlp.up_proj.weight, old.mlp.up_proj.weight[order])
        torch.testing.assert_close(ffn(new.mlp, x), ffn(old.mlp, x), rtol=1e-10, atol=1e-12)


def test_coactivation_groups_units_that_fire_together():
    from dsmoe.partition import balanced_kmeans

    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(4, 200, generator=g).sign()  # 4 firing patterns over 200 tokens
    truth = torch.arange(64) % 4
    flips = torch.rand(64, 200, generator=g) < 0.1  # each unit deviates from its pattern on 10% of tokens
    patterns = torch.where(flips, -prototypes[truth], prototypes[truth])
    labels = balanced_kmeans(patterns, 4)
    assert torch.bincount(labels).tolist() == [16] * 4
    for c in range(4):  # every cluster is one true group
        assert len(set(truth[labels == c].tolist())) == 1


def test_partition_errors():
    with pytest.raises(ValueError, match="unknown partition"):
        dsmoe.convert(tiny_llama(), n_experts=4, partition="metis")
    with pytest.raises(ValueError, match="coactivation"):
        dsmoe.convert(tiny_llama(), n_experts=4, partition="coactivation")
