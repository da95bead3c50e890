"""`dsmoe pilot`: convert, a few training steps, curves, held-out perplexities (tiny random LLaMA)."""

import json

import pandas as pd
import pytest

from dsmoe.cli import main
from dsmoe.pilot import pilot_config


def pilot_args(out, *sets):
    args = ["pilot", "--config", "config/smoke.yaml", "--steps", "6", "--out", str(out)]
    for item in ("train.log_every=1", "train.micro_batch_size=4", *sets):
        args += ["--set", item]
    return args


def test_pilot_writes_curves_and_perplexities(tmp_path, capsys):
    controlled = tmp_path / "controlled"
    sets = ("dsmoe.gate_init=calibrated", "train.adaptive_sparsity.enabled=true",
            "train.adaptive_sparsity.lambda_max=1.2", "train.adaptive_sparsity.target_fraction=0.05")
    assert main(pilot_args(controlled, *sets)) == 0
    printed = capsys.readouterr().out
    assert "step" in printed and "held-out ppl dense" in printed and "held-out ppl trained" in printed

    log = pd.read_csv(controlled / "run" / "train_log.csv")
    assert log["step"].tolist() == list(range(1, 7))
    assert log["lambda"].iloc[0] == 1.0  # the config's sparsity_lambda, then the controller
    assert (log["lambda"] <= 1.2 + 1e-9).all() and log["lambda"].iloc[-1] > 1.0  # too dense: λ rises to its ceiling
    ppl = pd.read_csv(controlled / "ppl.csv").set_index("model")
    assert list(ppl.index) == ["dense", "init", "trained"] and (ppl["ppl"] > 1).all()
    assert ppl.loc[["init", "trained"], "mean_active_experts"].between(0, 8).all()  # dense quality at start: tests/test_gate_init.py (SmolLM2)
    summary = json.loads((controlled / "pilot.json").read_text())
    assert summary["steps"] == 6 and summary["gate_init"] == "calibrated"
    assert summary["held_out"]["trained"]["ppl"] == pytest.approx(ppl.loc["trained", "ppl"])
    assert (controlled / "curves.png").stat().st_size > 1000
    assert not (controlled / "run" / "checkpoints").exists()  # optimizer state removed

    paper = tmp_path / "paper"
    assert main(pilot_args(paper) + ["--no-eval", "--compare", str(controlled)]) == 0
    assert json.loads((paper / "pilot.json").read_text())["gate_init"] == "normal"
    assert not (paper / "ppl.csv").exists()
    assert set(pd.read_csv(paper / "run" / "train_log.csv")["lambda"]) == {1.0}  # the paper's fixed λ


def test_pilot_budget_is_its_steps():
    config = {"train": {"batch_size": 4}, "data": {"seq_len": 32}}
    assert pilot_config(config, 6)["train"]["tokens"] == 6 * 4 * 32
    assert config["train"]["checkpoint_every"] == 6
    with pytest.raises(ValueError, match="--steps"):
        pilot_config(config, 0)
