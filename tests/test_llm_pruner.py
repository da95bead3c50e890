"""LLM-Pruner channel mode: Taylor importance of hidden channels against autograd written out per
parameter, the narrower model against the dense one with the channels removed by hand, the size
target within one channel, and a save and reload with plain transformers."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dsmoe.baselines.llm_pruner import hidden_channel_importance, llm_pruner_channel, prune_hidden
from dsmoe.baselines.pruning import fraction_for_activated_pct, prune


def tiny_llama(seed=0, tied=False):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # non-trivial norm weights, so that slicing them shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def tokens(batch=3, length=10, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True])
def test_taylor_importance_of_hidden_channels(tied):
    model = tiny_llama(tied=tied)
    calibration = tokens()
    score = hidden_channel_importance(model, calibration, batch_size=2)
    params = dict(model.named_parameters())
    loss = sum(model(input_ids=b, labels=b).loss for b in calibration.split(2))
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    expected = torch.zeros(32, dtype=torch.float64)
    for name, p in params.items():
        t = (p * grads[name]).abs()
        if name.endswith("norm.weight"):
            expected += t
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            expected += t.sum(1)
        else:  # embeddings, lm_head, q, k, v, gate, up: hidden channels are columns
            expected += t.sum(0)
    torch.testing.assert_close(score, expected.detach(), rtol=1e-8, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_pruned_model_equals_dense_with_channels_removed_by_hand():
    dense = tiny_llama()
    keep = torch.tensor([0, 2, 3, 5, 8, 9, 13, 14, 17, 20, 21, 22, 25, 26, 29, 31])
    pruned = prune_hidden(copy.deepcopy(dense), keep)
    assert type(pruned) is LlamaForCausalLM and pruned.config.hidden_size == 16 and pruned.config.head_dim == 8
    # reference: a fresh config with hidden 16 whose weights are the dense ones indexed by hand
    config = LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    ref = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(dense.model.embed_tokens.weight[:, keep])
        ref.lm_head.weight.copy_(dense.lm_head.weight[:, keep])
        ref.model.norm.weight.copy_(dense.model.norm.weight[keep])
        for a, b in zip(ref.model.layers, dense.model.layers):
            a.input_layernorm.weight.copy_(b.input_layernorm.weight[keep])
            a.post_attention_layernorm.weight.copy_(b.post_attention_layernorm.weight[keep])
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(a.self_attn, name).weight.copy_(getattr(b.self_attn, name).weight[:, keep])
            a.self_attn.o_proj.weight.copy_(b.self_attn.o_proj.weight[keep])
            for name in ("gate_proj", "up_proj"):
                getattr(a.mlp, name).weight.copy_(getattr(b.mlp, name).weight[:, keep])
            a.mlp.down_proj.weight.copy_(b.mlp.down_proj.weight[keep])
    ids = tokens()
    torch.testing.assert_close(pruned(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pct", [80.0, 60.0])
def test_channel_size_matches_target_within_one_channel(pct):
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    fraction = fraction_for_activated_pct(model, pct, "llm_pruner_channel")
    pruned, summary = prune(model, "llm_pruner_channel", fraction, tokens(2, 8))
    per_channel = total // 32
    step = 4  # d' is a multiple of num_attention_heads (LlamaConfig refuses others)
    assert sum(p.numel() for p in pruned.parameters()) == summary["total_params"]
    assert pruned.config.hidden_size % step == 0
    assert abs(summary["total_params"] - pct / 100 * total) <= step * per_channel / 2 + 1e-9
    assert summary["hidden_size"] == pruned.config.hidden_size == 32 - summary["removed_hidden_channels"]


def test_removes_least_important_channels_and_reloads_with_plain_transformers(tmp_path):
    model = tiny_llama(tied=True).float()
    calibration = tokens()
    score = hidden_channel_importance(model, calibration)
    pruned, removed = llm_pruner_channel(model, 13, calibration)  # rounded to 12: 20 kept, a multiple of 4 heads
    assert set(removed.tolist()) == set(torch.argsort(score)[:12].tolist())
    pruned.save_pretrained(tmp_path / "p")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert type(reloaded) is LlamaForCausalLM and reloaded.config.hidden_size == 20
    ids = tokens()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned.eval()(input_ids=ids).logits)
    with pytest.raises(ValueError, match="cannot remove"):
        llm_pruner_channel(tiny_llama(), 32, calibration)
