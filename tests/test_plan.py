"""`dsmoe plan` against hand arithmetic (dsmoe/plan.py states every formula)."""

import pytest
from conftest import ROOT

from dsmoe.cli import main
from dsmoe.config import load_config
from dsmoe.plan import model_shape, plan

CONFIG = ROOT / "config"


def rows_by_rule(rows):
    return {r["rule"]: r for r in rows}


def test_llama_3_2_1b_on_8_h100():
    config = load_config(CONFIG / "paper-llama-3.2-1b.yaml")
    shape = model_shape(config)
    # per layer: q,o 2·2048² + k,v 2·2048·512 + MLP 3·2048·8192 + 2 norms; + final norm + tied embedding
    per_layer = 2 * 2048**2 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    assert shape.params == 16 * per_layer + 2048 + 128256 * 2048 == 1_235_814_400
    assert shape.train_flops_per_token(1024) == 6 * 1_235_814_400 + 12 * 16 * 1024 * 2048  # 7.82 GFLOP (issue 25)
    rows, totals, warnings = plan(config, gpus=8, gpu="h100", mfu=0.4)
    pretrain = rows_by_rule(rows)["pretrain"]
    flops = 1e10 * (6 * 1_235_814_400 + 12 * 16 * 1024 * 2048)
    assert pretrain["flops"] == pytest.approx(flops) and pretrain["flops"] == pytest.approx(7.82e19, rel=1e-3)
    assert pretrain["gpu_hours"] == pytest.approx(flops / (989e12 * 0.4) / 3600)  # 54.9 h
    assert pretrain["jobs"] == 4 + 1 + 5  # 4 variants, dense continued, 5 pruned
    # 16 B/param over 8 GPUs + activations 16·1024·4·(16·2048 + 6·8192) + logits 1024·4·128256·8
    activations = 16 * 1024 * 4 * (16 * 2048 + 6 * 8192) + 1024 * 4 * 128256 * 8
    assert pretrain["gpu_mem_gb"] == pytest.approx((16 * 1_235_814_400 / 8 + activations) / 1e9)
    assert pretrain["host_mem_gb"] == pytest.approx(4 * 1_235_814_400 / 1e9 + 8 + 2 * 8)  # rank 0 loads, 8 processes
    assert pretrain["checkpoint_gb"] == pytest.approx(12 * 1_235_814_400 / 1e9)
    assert pretrain["disk_gb"] == pytest.approx((2 * 12 + 2) * 1_235_814_400 / 1e9)  # 2 kept + the bf16 model
    assert not warnings


def test_llama_2_7b_warns_about_host_memory_naming_the_rule():
    config = load_config(CONFIG / "paper-llama-2-7b.yaml")
    config["cluster"]["train_mem_mb"] = 32000  # below one fp32 copy of 7B on the main process's node
    shape = model_shape(config)
    per_layer = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    assert shape.params == 32 * per_layer + 4096 + 2 * 32000 * 4096 == 6_738_415_616
    matmul = 6_738_415_616 - 32000 * 4096  # untied: the input embedding is a lookup
    assert shape.train_flops_per_token(1024) == 6 * matmul + 12 * 32 * 1024 * 4096
    rows, totals, warnings = plan(config, gpus=32, gpu="h100", mfu=0.4)
    pretrain = rows_by_rule(rows)["pretrain"]
    assert pretrain["flops"] == pytest.approx(4.125e20, rel=1e-3)  # "about 4e20" (issue 25)
    assert pretrain["wall_hours"] == pytest.approx(pretrain["flops"] / (989e12 * 0.4) / 3600 / 32)
    assert pretrain["host_mem_gb"] == pytest.approx(4 * 6_738_415_616 / 1e9 + 8 + 2 * 8)  # 51 GB
    assert any(w.startswith("pretrain: needs 51 GB of host memory") and "asks 32 GB" in w for w in warnings), warnings
    config["cluster"]["train_mem_mb"] = 128000  # the default fits
    assert not plan(config, gpus=32, gpu="h100", mfu=0.4)[2]


def test_smoke_config_and_cli(capsys):
    config = load_config(CONFIG / "smoke.yaml")
    shape = model_shape(config)  # random_init, SmolLM2's 49152-token vocabulary, tied
    assert shape.params == 2 * (2 * 32**2 + 2 * 32 * 16 + 3 * 32 * 64 + 64) + 32 + 49152 * 32
    rows, totals, _ = plan(config, gpus=1)
    assert rows_by_rule(rows)["pretrain"]["flops"] == pytest.approx(2560 * (6 * shape.params + 12 * 2 * 32 * 32))
    assert main(["plan", "--config", str(CONFIG / "smoke.yaml"), "--gpu", "a100"]) == 0
    assert "pretrain" in capsys.readouterr().out
    assert main(["plan", "--config", str(CONFIG / "smoke.yaml"), "--gpu", "tpu"]) == 2
    assert "unknown --gpu 'tpu'" in capsys.readouterr().err
