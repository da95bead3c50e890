"""LLM-Pruner block mode: Taylor importance of KV groups and FFN units against autograd written out
per head and unit, the size target within one unit, the first and last layers kept whole, inert
heads and units removed without changing the outputs, and a save and reload (in process and with
plain transformers and trust_remote_code)."""

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dsmoe.baselines.llm_pruner_block import block_importance, block_prunable_param_count, block_removal, llm_pruner_block
from dsmoe.baselines.pruning import fraction_for_activated_pct, prune
from dsmoe.model import PrunedLlamaForCausalLM

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, WIDTH, LAYERS = 48, 6, 3, 8, 40, 5
N_REP = HEADS // KV_HEADS


def tiny_llama(seed=0, tied=True):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).double().eval()


def tokens(batch=3, length=9, seed=1):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_taylor_importance_of_kv_groups_and_ffn_units():
    model, calibration = tiny_llama(), tokens()
    scores = block_importance(model, calibration, batch_size=2)
    assert sorted(scores) == [1, 2, 3]  # 5 layers: the first and the last stay whole
    params = dict(model.named_parameters())
    loss = sum(model(input_ids=b, labels=b).loss for b in calibration.split(2))
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    taylor = {name: (p * grads[name]).abs().detach() for name, p in params.items()}
    for i, (groups, units) in scores.items():
        t = lambda name: taylor[f"model.layers.{i}.{name}.weight"]
        expected_groups = torch.zeros(KV_HEADS, dtype=torch.float64)
        for head in range(HEADS):  # q head h reads kv head h // N_REP (repeat_kv)
            rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            expected_groups[head // N_REP] += t("self_attn.q_proj")[rows].sum() + t("self_attn.o_proj")[:, rows].sum()
        for kv in range(KV_HEADS):
            rows = slice(kv * HEAD_DIM, (kv + 1) * HEAD_DIM)
            expected_groups[kv] += t("self_attn.k_proj")[rows].sum() + t("self_attn.v_proj")[rows].sum()
        expected_units = t("mlp.gate_proj").sum(1) + t("mlp.up_proj").sum(1) + t("mlp.down_proj").sum(0)
        torch.testing.assert_close(groups, expected_groups, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(units, expected_units, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("pct", [85.0, 60.0])
def test_size_matches_target_and_outer_layers_stay_whole(pct):
    dense = tiny_llama(seed=2, tied=False)
    total = sum(p.numel() for p in dense.parameters())
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    fraction = fraction_for_activated_pct(dense, pct, "llm_pruner_block")
    pruned, summary = prune(dense, "llm_pruner_block", fraction, tokens(2, 8))
    assert type(pruned) is PrunedLlamaForCausalLM
    assert sum(p.numel() for p in pruned.parameters()) == summary["total_params"]
    assert abs(summary["total_params"] - pct / 100 * total) <= 3 * HIDDEN / 2 + 1e-9  # one FFN unit: 3·d params
    config = pruned.config
    assert summary["pruned_layers"] == [1, 4]
    for i in (0, LAYERS - 1):  # kept whole: the dense layer's every tensor
        assert (config.layer_num_attention_heads[i], config.layer_num_key_value_heads[i]) == (HEADS, KV_HEADS)
        assert config.layer_intermediate_sizes[i] == WIDTH
        for key, value in pruned.state_dict().items():
            if key.startswith(f"model.layers.{i}."):
                assert torch.equal(value, dense_state[key]), key
    inner = config.layer_intermediate_sizes[1:-1]
    assert max(inner) - min(inner) <= 1 and max(inner) < WIDTH
    assert len(set(config.layer_num_key_value_heads[1:-1])) == 1
    assert all(q == N_REP * kv for q, kv in zip(config.layer_num_attention_heads, config.layer_num_key_value_heads))
    for i, layer in enumerate(pruned.model.layers):
        assert layer.self_attn.q_proj.out_features == config.layer_num_attention_heads[i] * HEAD_DIM
        assert layer.mlp.down_proj.in_features == config.layer_intermediate_sizes[i]


def make_inert(model, groups, units, seed=3):
    """Zero, in layers 1..3, the o_proj columns of `groups` random KV groups and the down_proj columns of
    `units` random FFN units: these groups and units then have zero Taylor importance and no effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers[1:-1]:
            for g in torch.randperm(KV_HEADS, generator=generator)[:groups].tolist():
                layer.self_attn.o_proj.weight[:, g * N_REP * HEAD_DIM:(g + 1) * N_REP * HEAD_DIM] = 0
            layer.mlp.down_proj.weight[:, torch.randperm(WIDTH, generator=generator)[:units]] = 0


def test_removing_inert_heads_and_units_leaves_outputs_unchanged():
    dense = tiny_llama(seed=4)
    make_inert(dense, groups=1, units=7)
    group = HIDDEN * HEAD_DIM * 2 * (N_REP + 1)
    fraction = 3 * (group + 7 * 3 * HIDDEN) / block_prunable_param_count(dense)
    assert block_removal(dense, fraction) == (1, 21)
    ids = tokens(2, 11, seed=5)
    expected = dense(input_ids=ids).logits.detach()
    pruned, detail = llm_pruner_block(dense, fraction, tokens())
    assert detail["layer_num_key_value_heads"] == [3, 2, 2, 2, 3] and detail["layer_intermediate_sizes"] == [40, 33, 33, 33, 40]
    torch.testing.assert_close(pruned(input_ids=ids).logits, expected, rtol=1e-10, atol=1e-10)
    # the same counts on the model without inert parts change its outputs: the check can fail
    other = tiny_llama(seed=4)
    changed, _ = llm_pruner_block(other, fraction, tokens())
    assert not torch.allclose(changed(input_ids=ids).logits, other(input_ids=ids).logits, atol=1e-6)


def test_saves_and_reloads_with_auto_classes(tmp_path):
    dense = tiny_llama(seed=6).float()
    pruned, _ = prune(dense, "llm_pruner_block", fraction_for_activated_pct(dense, 70.0, "llm_pruner_block"), tokens())
    pruned.eval().save_pretrained(tmp_path)
    assert {"configuration_pruned_llama.py", "modeling_pruned_llama.py"} <= {p.name for p in tmp_path.glob("*.py")}
    ids = tokens(2, 7, seed=7)
    expected = pruned(input_ids=ids).logits.detach()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is PrunedLlamaForCausalLM
    copied = copy.deepcopy(reloaded)  # each layer's config view follows the copy's config
    assert copied.model.layers[1].self_attn.config._config is copied.config
    torch.testing.assert_close(copied(input_ids=ids).logits, expected)
    assert reloaded.config.layer_intermediate_sizes == pruned.config.layer_intermediate_sizes
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    torch.save((ids, expected), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["dsmoe"] = None  # `import dsmoe` raises ImportError in this process
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        ids, expected = torch.load({str(tmp_path / 'expected.pt')!r})
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
        print("remote ok", type(model).__module__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "remote ok transformers_modules" in result.stdout


def test_cli_prunes_the_given_layers(tmp_path, smollm2_tokenizer):
    from dsmoe.cli import main
    from dsmoe.hub import load_model

    data, model_dir = tmp_path / "data", tmp_path / "tiny"
    rng = np.random.default_rng(0)
    for name in ("code", "prose"):
        (data / name).mkdir(parents=True)
        np.save(data / name / "train.npy", rng.integers(0, 96, 300, dtype=np.int32))
        np.save(data / name / "val.npy", rng.integers(0, 96, (2, 8), dtype=np.int32))
    sources = {name: {"train_tokens": 300, "val_sequences": 2, "weight": 0.5} for name in ("code", "prose")}
    (data / "manifest.json").write_text(json.dumps({"seq_len": 8, "tokenizer": "x", "sources": sources}))
    tiny_llama().float().save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    args = ["baseline", "prune", "--model", str(model_dir), "--match-activated-pct", "75", "--data", str(data),
            "--calibration-sequences", "2", "--block-layers", "2", "4"]
    assert main([*args, "--kind", "llm_pruner_block", "--out", str(tmp_path / "pruned")]) == 0
    summary = json.loads((tmp_path / "pruned" / "pruning.json").read_text())
    assert summary["pruned_layers"] == [2, 4] and summary["activated_params_pct"] == pytest.approx(75.0, abs=0.5)
    model, _ = load_model(str(tmp_path / "pruned"))
    assert type(model) is PrunedLlamaForCausalLM and model.config.layer_intermediate_sizes[:2] == [WIDTH, WIDTH]
    assert main([*args, "--kind", "wanda", "--out", str(tmp_path / "bad")]) == 2  # --block-layers is block mode's
    assert not (tmp_path / "bad").exists()


def test_refuses_models_without_inner_layers():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="non-empty range"):
        block_prunable_param_count(LlamaForCausalLM(config))


def test_paper_block_rows_recount_with_first_4_and_last_2_layers_whole():
    """Table 1's LLM-Pruner-block rows are the per-layer model of the module docstring: LLaMA-1B with
    layers 4..13 at 2 of 8 KV groups and D' = 1319, LLaMA-7B with layers 4..29 at 15 of 32 heads and D' = 5160."""
    from dsmoe.model import PrunedLlamaConfig

    def recount(layers, kept_kv, n_rep, width, pruned_width, **fields):
        inner = range(4, layers - 2)
        kv = [kept_kv if i in inner else fields["num_key_value_heads"] for i in range(layers)]
        widths = [pruned_width if i in inner else width for i in range(layers)]
        config = PrunedLlamaConfig(num_hidden_layers=layers, intermediate_size=width, layer_num_key_value_heads=kv,
                                   layer_num_attention_heads=[n * n_rep for n in kv], layer_intermediate_sizes=widths, **fields)
        with torch.device("meta"):
            model = PrunedLlamaForCausalLM(config)
        return sum(p.numel() for p in model.parameters()), sum(widths) / layers

    params_1b, width_1b = recount(16, 2, 4, 8192, 1319, vocab_size=128256, hidden_size=2048, num_attention_heads=32,
                                  num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    params_7b, width_7b = recount(32, 15, 1, 11008, 5160, vocab_size=32000, hidden_size=4096, num_attention_heads=32,
                                  num_key_value_heads=32, tie_word_embeddings=False)
    assert (round(params_1b / 1e6), round(width_1b, 1)) == (735, 3896.4)
    assert (round(params_7b / 1e9, 2), round(width_7b, 1)) == (3.94, 6256.5)
