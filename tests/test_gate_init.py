"""The calibrated gate init (beyond the paper): every expert starts open at the chosen σ."""

import json
import math

import numpy as np
import pytest
import torch

import dsmoe
from dsmoe.cli import main
from dsmoe.data import calibration_windows
from dsmoe.gate_init import calibrated_gate_weights, expert_scores


def anisotropic(n, dim=16, seed=0):
    """FFN-input-like vectors: a shared direction plus noise, and 1% far from it (sink-like)."""
    generator = torch.Generator().manual_seed(seed)
    direction, sink = torch.randn(2, dim, generator=torch.Generator().manual_seed(99))
    h = direction + 0.4 * torch.randn(n, dim, generator=generator)
    h[: n // 100] = -0.3 * direction + sink + 0.2 * torch.randn(n // 100, dim, generator=generator)
    return h


def test_every_gate_opens_at_the_target_value():
    h = anisotropic(2000)
    y = calibrated_gate_weights(h, n_experts=4, target_prob=0.9, spread=0.0)
    assert torch.equal(y[0], y[3])  # no scores: one gate for all experts
    sigma = torch.sigmoid(h @ y.T)
    assert sigma[:, 0].median().item() == pytest.approx(0.9, abs=0.02)
    assert sigma.min() > 0.8  # margin_prob: the odd tokens too
    held_out = torch.sigmoid(anisotropic(2000, seed=1) @ y.T)
    assert (held_out > 0.5).all()


def test_experts_are_ordered_by_their_scores():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=64, num_attention_heads=2))
    h, held_out = anisotropic(3000), anisotropic(3000, seed=1)
    y = calibrated_gate_weights(h, 4, mlp, target_prob=0.95, spread=0.5)
    logits = h @ y.T
    assert logits.min() > math.log(0.8 / 0.2) - 1e-4  # every calibration gate stays above the margin
    z = expert_scores(mlp, held_out, 4)
    centred = held_out @ y.T
    centred = centred - centred.mean(1, keepdim=True)
    assert torch.corrcoef(torch.stack([centred.flatten(), z.flatten()]))[0, 1] > 0.3  # held-out order follows z
    assert not torch.allclose(y[0], y[1])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="target_prob"):
        calibrated_gate_weights(torch.randn(10, 4), 2, target_prob=0.4)
    with pytest.raises(ValueError, match="margin_prob"):
        calibrated_gate_weights(torch.randn(10, 4), 2, target_prob=0.9, margin_prob=0.95)
    with pytest.raises(ValueError, match="spread"):
        calibrated_gate_weights(torch.randn(10, 4), 2, spread=-1)


def test_calibrated_conversion_starts_open(tiny_llama):
    ids = torch.randint(0, 128, (4, 16))
    model = dsmoe.convert(tiny_llama, n_experts=4, tau=0.5, calibration_ids=ids, calibration_target=0.95).eval()
    assert model.config.gate_init == "calibrated"
    with dsmoe.RoutingRecorder(model) as recorder:
        model(ids)
    assert min(recorder.report()["mean_active_experts"]) > 3  # a random init opens about 2 of 4
    with pytest.raises(ValueError, match="sigmoid gates"):
        dsmoe.convert(type(tiny_llama)(tiny_llama.config), variant="topk", calibration_ids=ids)


def write_data_dir(path, seq_len=8):
    (path / "code").mkdir(parents=True)
    np.save(path / "code" / "train.npy", np.arange(100, dtype=np.int32))
    (path / "manifest.json").write_text(json.dumps({"seq_len": seq_len, "sources": {"code": {}}}))


def test_calibration_windows_from_a_data_dir(tmp_path):
    write_data_dir(tmp_path)
    ids = calibration_windows(tmp_path, 3)  # evenly spaced over the 100-token stream: starts 0, 46, 92
    assert torch.equal(ids, torch.stack([torch.arange(start, start + 8) for start in (0, 46, 92)]))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        calibration_windows(tmp_path / "code", 3)


def test_cli_calibrated_convert(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    write_data_dir(data)
    out = tmp_path / "out"
    assert main(["convert", "--model", str(tiny_model_dir), "--n-experts", "4", "--gate-init", "calibrated", "--out", str(out)]) == 2
    assert "--calibration-data" in capsys.readouterr().err and not out.exists()
    assert main(["convert", "--model", str(tiny_model_dir), "--n-experts", "4", "--gate-init", "calibrated",
                 "--calibration-data", str(data), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["gate_init"] == "calibrated"


@pytest.mark.slow
def test_converted_smollm2_starts_at_dense_quality_on_held_out_text(tmp_path):
    """The embedded SmolLM2-135M, gates fitted on training windows, measured on validation windows:
    every gate of every layer open at τ = 0.5, perplexity within 5% of dense."""
    from dsmoe.config import validate_config
    from dsmoe.convert import calibration_inputs
    from dsmoe.data import load_validation, prepare
    from dsmoe.evaluation.perplexity import evaluate_ppl

    model, tokenizer = dsmoe.load_model("smollm2-135m")
    config = validate_config({"data": {"seq_len": 256, "val_sequences": 4}, "train": {"tokens": 40000}})
    prepare(config, tokenizer, tmp_path / "data")
    validation = load_validation(tmp_path / "data")
    dense = evaluate_ppl(model.eval(), validation, progress=False).set_index("source").loc["all", "ppl"]
    model = dsmoe.convert(model, calibration_ids=calibration_inputs(tmp_path / "data", 16)).eval()
    df = evaluate_ppl(model, validation, progress=False)
    assert df.attrs["layers"]["mean_active_experts"].min() == 8.0  # a mean of 8 of 8: k = 8 for every token and layer
    converted = df.set_index("source").loc["all", "ppl"]
    assert converted < 1.05 * dense, (converted, dense)
