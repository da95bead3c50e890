"""DSMoEForCausalLM as a transformers model: convert, save/load, remote code, generate, routing report."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import dsmoe
from dsmoe.accounting import ffn_params


def test_convert_replaces_every_mlp_in_place_and_keeps_weights(tiny_llama):
    dense_weight = tiny_llama.model.layers[1].mlp.down_proj.weight
    model = dsmoe.convert(tiny_llama, n_experts=4, tau=0.5)
    assert isinstance(model, dsmoe.DSMoEForCausalLM)
    assert all(isinstance(layer.mlp, dsmoe.DSMoEMLP) for layer in tiny_llama.model.layers)
    assert model.model is tiny_llama.model
    assert model.model.layers[1].mlp.down_proj.weight is dense_weight
    assert (model.config.n_experts, model.config.tau, model.config.variant) == (4, 0.5, "dsmoe")
    assert model.config.base_architecture == "LlamaForCausalLM"


def test_all_open_model_equals_dense_with_halved_ffn(tiny_llama):
    """Gates at 0 and τ < 0.5: every FFN outputs 0.5 × dense, so the logits equal a dense model whose
    down_proj is halved."""
    ids = torch.randint(0, 128, (2, 11))
    halved = type(tiny_llama)(tiny_llama.config).eval()
    halved.load_state_dict(tiny_llama.state_dict())
    for layer in halved.model.layers:
        layer.mlp.down_proj.weight.data *= 0.5
    model = dsmoe.convert(tiny_llama, n_experts=4, tau=0.3).eval()
    for layer in dsmoe.dsmoe_layers(model):
        layer.gate.weight.data.zero_()
    torch.testing.assert_close(model(ids).logits, halved(ids).logits, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_gives_identical_logits(tiny_llama, tmp_path):
    model = dsmoe.convert(tiny_llama, n_experts=4, tau=0.4, variant="no_ste").eval()
    ids = torch.randint(0, 128, (2, 9))
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, dsmoe.DSMoEForCausalLM)
    assert (loaded.config.tau, loaded.config.variant) == (0.4, "no_ste")
    assert dsmoe.dsmoe_layers(loaded)[0].tau == 0.4
    assert torch.equal(loaded(ids).logits, expected)
    assert sorted(p.name for p in tmp_path.glob("*.py")) == ["configuration_dsmoe.py", "modeling_dsmoe.py", "sparse_ffn.py"]


def test_trust_remote_code_load_without_dsmoe(tiny_llama, tmp_path):
    model = dsmoe.convert(tiny_llama, n_experts=2, tau=0.5).eval()
    ids = torch.arange(7)[None]
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["dsmoe"] = None  # `import dsmoe` raises ImportError in this process
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert "dsmoe" not in type(model).__module__.split(".")[0], type(model).__module__
        logits = model(torch.arange(7)[None]).logits
        assert torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r})), "logits differ"
        print("remote ok", type(model).__module__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "remote ok transformers_modules" in result.stdout


def test_generate_and_set_tau(tiny_llama):
    model = dsmoe.convert(tiny_llama, n_experts=4, tau=0.5).eval()
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)
    dsmoe.set_tau(model, 0.7)
    assert model.config.tau == 0.7
    assert all(layer.tau == 0.7 for layer in dsmoe.dsmoe_layers(model))
    with pytest.raises(ValueError, match="open interval"):
        dsmoe.set_tau(model, 1.5)
    with pytest.raises(ValueError, match="no DSMoE layer"):
        dsmoe.set_tau(nn.Linear(2, 2), 0.5)


def test_routing_report_counts_activated_params_as_table1(tiny_llama):
    model = dsmoe.convert(tiny_llama, n_experts=4, tau=0.5).eval()
    ids = torch.randint(0, 128, (3, 10))
    with dsmoe.RoutingRecorder(model) as recorder:
        model(ids)
        model(ids[:1])
    report = recorder.report()
    layers = dsmoe.dsmoe_layers(model)
    assert all(layer.routing_stats is None for layer in layers)
    assert report["tokens"] == 40
    # hand count from the recorded masks of the last forward is not enough: redo the counting by hand
    per_layer_k = []
    hidden = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, idx=idx: hidden.setdefault(idx, []).append(i[0])) for idx, layer in enumerate(layers)]
    model(ids)
    model(ids[:1])
    for hook in hooks:
        hook.remove()
    for idx, layer in enumerate(layers):
        x = torch.cat([h.reshape(-1, 32) for h in hidden[idx]])
        per_layer_k.append(float((torch.sigmoid(x @ layer.gate.weight.T) > 0.5).sum(-1).double().mean()))
    assert report["mean_active_experts"] == pytest.approx(per_layer_k)
    total = sum(p.numel() for p in model.parameters())
    ffn = 3 * 32 * 64
    expected = total - 2 * ffn + sum(ffn * k / 4 for k in per_layer_k)
    assert report["total_params"] == total
    assert report["activated_params"] == pytest.approx(expected)
    assert report["activated_params_pct"] == pytest.approx(100 * expected / total)
    assert sum(report["k_histogram"][0]) == 40
    assert ffn_params(layers[0]) == ffn


def test_dense_model_activates_everything(tiny_llama):
    counts = dsmoe.activated_params(tiny_llama)
    assert counts["activated_params"] == counts["total_params"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"n_experts": 5}, ValueError, "does not divide the intermediate size 64"),
        ({"tau": 1.2}, ValueError, "open interval"),
        ({"variant": "switch"}, ValueError, "unknown variant 'switch'"),
        ({"variant": "topk", "top_k": 9, "n_experts": 8}, ValueError, "top_k=9"),
    ],
)
def test_convert_rejects_bad_arguments_and_changes_nothing(tiny_llama, kwargs, error, message):
    with pytest.raises(error, match=message):
        dsmoe.convert(tiny_llama, **kwargs)
    assert not dsmoe.dsmoe_layers(tiny_llama)


def test_convert_names_a_non_swiglu_mlp(tiny_llama):
    tiny_llama.model.layers[1].mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    with pytest.raises(TypeError, match=r"'model.layers.1.mlp' is Sequential, not a SwiGLU MLP"):
        dsmoe.convert(tiny_llama)
    assert not dsmoe.dsmoe_layers(tiny_llama)


def test_convert_rejects_a_model_without_decoder_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="GPT2LMHeadModel has no `model.layers`"):
        dsmoe.convert(model)


def test_generate_uses_the_cache_without_deprecation_warning(tiny_llama):
    """generate() hands the KV cache over under the name the installed transformers expects."""
    import warnings

    model = dsmoe.convert(tiny_llama, n_experts=4, tau=0.3).eval()
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                    and ("cache" in str(w.message) or "past_key_values" in str(w.message))]
    assert not deprecations
    reference = ids  # greedy decoding recomputed from scratch at every step, no cache
    for _ in range(4):
        reference = torch.cat([reference, model(reference).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, reference)


def test_no_gx_inference_rescale_is_a_saved_config_option(tiny_llama, tmp_path):
    model = dsmoe.convert(tiny_llama, n_experts=4, tau=0.5, variant="no_gx", gate_init_std=1.0,
                          no_gx_inference_rescale=False).eval()
    assert model.config.no_gx_inference_rescale is False
    assert all(layer.no_gx_inference_rescale is False for layer in dsmoe.dsmoe_layers(model))
    ids = torch.randint(0, 128, (2, 9))
    unscaled = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.no_gx_inference_rescale is False and torch.equal(loaded(ids).logits, unscaled)
    dsmoe.set_no_gx_inference_rescale(loaded, True)
    assert loaded.config.no_gx_inference_rescale is True and not torch.equal(loaded(ids).logits, unscaled)
    assert dsmoe.DSMoEConfig().no_gx_inference_rescale is True  # the default keeps Eq. 8 at inference
    with pytest.raises(ValueError, match="true or false"):
        dsmoe.set_no_gx_inference_rescale(loaded, "no")
