"""The calibrated gate init (beyond the paper): every expert starts open at the chosen σ."""

import json

import numpy as np
import pytest
import torch

import dsmoe
from dsmoe.cli import main
from dsmoe.data import calibration_windows
from dsmoe.gate_init import calibrated_gate_weights


def test_median_token_gets_the_target_gate_value():
    torch.manual_seed(0)
    direction = torch.randn(16)
    h = direction + 0.3 * torch.randn(500, 16)  # anisotropic FFN inputs, like an LLM's
    y = calibrated_gate_weights(h, n_experts=4, target_prob=0.9, noise=0.0)
    sigma = torch.sigmoid(h @ y.T)
    assert sigma[:, 0].median().item() == pytest.approx(0.9, abs=1e-3)
    assert (sigma > 0.5).float().mean() > 0.99


def test_bad_target_and_isotropic_inputs_are_refused():
    with pytest.raises(ValueError, match="target_prob"):
        calibrated_gate_weights(torch.randn(10, 4), 2, target_prob=0.4)
    h = torch.randn(100, 8)
    h = torch.cat([h, -h])  # mean exactly 0
    with pytest.raises(ValueError, match="no dominant direction"):
        calibrated_gate_weights(h, 2)


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
