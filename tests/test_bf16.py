"""bf16 mixed precision on the CPU (`train.mixed_precision: bf16`, the paper configs' setting):
the STE gradient reaches the gates, routing stays fp32, checkpoints keep fp32 master weights, the
smoke model's loss stays finite; bf16 inference through the sparse path against the masked reference.
"""

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import dsmoe
from dsmoe import data
from dsmoe.config import load_config
from dsmoe.hub import build_base_model, save_model
from dsmoe.model import dsmoe_layers
from dsmoe.model.modeling_dsmoe import DSMoEMLP
from dsmoe.model.sparse_ffn import masked_expert_ffn
from dsmoe.train import train
from dsmoe.train.step import accumulate_gradients
from dsmoe.train.trainer import setup

SMOKE = Path(__file__).resolve().parents[1] / "config" / "smoke.yaml"
BF16_TOL = dict(rtol=3e-2, atol=3e-2)
STEPS = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def smoke_config(**train_overrides):
    """config/smoke.yaml in bf16, cut to STEPS steps."""
    config = load_config(SMOKE)
    tc = config["train"]
    tc.update(mixed_precision="bf16", tokens=STEPS * tc["batch_size"] * config["data"]["seq_len"],
              checkpoint_every=3, keep_checkpoints=2, **train_overrides)
    return config


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    """`(init, data_dir)`: the smoke config's random model converted to DSMoE, and its data."""
    root = tmp_path_factory.mktemp("bf16")
    config = smoke_config()
    model, tokenizer = build_base_model(config)
    settings = config["dsmoe"]
    save_model(dsmoe.convert(model, n_experts=settings["n_experts"], tau=settings["tau"]), tokenizer, root / "init")
    data.prepare(config, tokenizer, root / "data")
    return root / "init", root / "data"


def test_bf16_step_routes_in_fp32_and_the_ste_gradient_reaches_the_gates(smoke_model, tmp_path):
    init, data_dir = smoke_model
    run = setup(smoke_config(sparsity_lambda=0.0), init, data_dir, tmp_path / "run", None, False, False)
    assert run.accelerator.mixed_precision == "bf16" and run.variant == "dsmoe"
    layers = dsmoe_layers(run.model)
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.update({m: (args[0].detach(), out.dtype)}))
             for layer in layers]
    accumulate_gradients(run.accelerator, run.model, run.batches.next_batch(), run.accumulation, layers, "dsmoe",
                         0.0, 0.0)
    for hook in hooks:
        hook.remove()
    for i, layer in enumerate(layers):
        x, out_dtype = seen[layer]
        assert out_dtype == torch.bfloat16, f"layer {i}: the FFN did not run in bf16 ({out_dtype})"
        # routing in fp32: σ of fp32 logits, not of bf16 ones
        assert layer.last_gate_probs.dtype == torch.float32
        expected = torch.sigmoid(F.linear(x.reshape(-1, x.shape[-1]).float(), layer.gate.weight.float()))
        torch.testing.assert_close(layer.last_gate_probs, expected, rtol=1e-6, atol=1e-7)
        # λ = 0: the gates learn only through the straight-through estimator of the LM loss
        grad = layer.gate.weight.grad
        assert grad is not None and grad.dtype == torch.float32, f"layer {i}: no fp32 gate gradient"
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"layer {i}: the STE gradient did not reach the gate"
    assert all(p.dtype == torch.float32 for p in run.model.parameters()), "master weights are not fp32"
    run.accelerator.end_training()


def test_bf16_training_keeps_fp32_master_weights_and_a_finite_loss(smoke_model, tmp_path):
    init, data_dir = smoke_model
    out = tmp_path / "run"
    train(smoke_config(), init, data_dir, out)
    with open(out / "train_log.csv", newline="") as handle:
        losses = [float(row["lm_loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), losses
    for checkpoint in ("step_3", f"step_{STEPS}"):
        weights = load_file(out / "checkpoints" / checkpoint / "model.safetensors")
        dtypes = {w.dtype for w in weights.values()}
        assert dtypes == {torch.float32}, f"{checkpoint} holds {dtypes}, not the fp32 master weights"
    final = load_file(out / "model" / "model.safetensors")  # saved in the config's dtype: float32 here
    assert {w.dtype for w in final.values()} == {torch.float32}
    trained = dict(weights)
    assert any(not torch.equal(trained[k], v) for k, v in load_file(init / "model.safetensors").items()
               if k in trained), "bf16 training left every weight unchanged"


def tiny_layer():
    torch.manual_seed(0)
    dense = torch.nn.Module()
    dense.gate_proj, dense.up_proj = torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(32, 64, bias=False)
    dense.down_proj, dense.act_fn = torch.nn.Linear(64, 32, bias=False), torch.nn.SiLU()
    return DSMoEMLP.from_dense(dense, n_experts=8, gate_init_std=0.5).eval()


def masked_reference(layer, hidden):
    """Eq. 7 in float64 with the layer's own routing decisions (the masked, all-expert FFN)."""
    probs, active = layer.last_gate_probs.double(), layer.last_active
    coef = probs * active * 8 / active.sum(1, keepdim=True).clamp(min=1)
    weights = (w.double() for w in (layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight))
    return masked_expert_ffn(hidden.reshape(-1, 32).double(), *weights, coef, F.silu)


@pytest.mark.parametrize("mode", ["bf16_weights", "bf16_autocast"])
@pytest.mark.parametrize("tokens", [1, 40])
def test_bf16_sparse_inference_matches_the_masked_reference(tokens, mode):
    """bf16 weights, or fp32 weights under CPU autocast (a mixed-precision model evaluated as trained)."""
    layer, hidden = tiny_layer(), torch.randn(2, tokens, 32)
    if mode == "bf16_weights":
        layer, hidden = layer.bfloat16(), hidden.bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16_autocast"):
        out = layer(hidden)
    assert out.dtype == torch.bfloat16 and layer.last_gate_probs.dtype == torch.float32
    assert 0 < layer.last_active.float().mean() < 1, "the routing opened no or every expert: nothing to check"
    torch.testing.assert_close(out.reshape(-1, 32).double(), masked_reference(layer, hidden), **BF16_TOL)


# `make gpu-check`'s script on the CPU (--cpu-smoke): tests/test_gpu_check.py


def test_bf16_auto_precision_only_where_bf16_is_fast(monkeypatch):
    """`train.mixed_precision: auto` picks bf16 on a CPU with AMX tiles and fp32 on one without."""
    from dsmoe.train.trainer import resolve_mixed_precision

    monkeypatch.delenv("DSMOE_CPU_KIND", raising=False)  # the probes below decide, not `DSMOE_CPU_KIND=avx2 make test`
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_mixed_precision("auto") == "no"
    assert resolve_mixed_precision("bf16") == "bf16" and resolve_mixed_precision("no") == "no"
