"""Trainer: learning, sparsity, resume after SIGKILL, variants and bad input (dsmoe/train/).

Tiny random LLaMA (vocab 320, hidden 32, 2 layers) converted to 8 experts, on the builtin sources.
"""

import csv
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import dsmoe
from dsmoe import data
from dsmoe.hub import save_model
from dsmoe.config import validate_config
from dsmoe.train import TrainingDiverged, param_groups, train, trainer
from dsmoe.train.checkpoint import Resume, resume_point

SEQ_LEN = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_config(steps, batch_size=8, **train):
    settings = {"tokens": steps * batch_size * SEQ_LEN, "batch_size": batch_size, "micro_batch_size": 4, "lr": 3e-3,
                "warmup_steps": 2, "log_every": 1, "checkpoint_every": 1000, "seed": 7, **train}
    return validate_config({"data": {"seq_len": SEQ_LEN, "val_sequences": 2}, "train": settings})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bpe_tokenizer):
    """`(dense_dir, dsmoe_dir, data_dir)` of a tiny model and its tokenised data."""
    root = tmp_path_factory.mktemp("train")
    tokenizer = bpe_tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id)
    save_model(LlamaForCausalLM(config), tokenizer, root / "dense")
    model, _ = dsmoe.load_model(str(root / "dense"))
    save_model(dsmoe.convert(model, n_experts=8, tau=0.5), tokenizer, root / "dsmoe")
    data.prepare(run_config(80), tokenizer, root / "data")
    return root / "dense", root / "dsmoe", root / "data"


def read_log(run_dir):
    with open(Path(run_dir) / "train_log.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def test_loss_goes_down_and_log_is_complete(setup, tmp_path):
    _, init, data_dir = setup
    train(run_config(30, sparsity_lambda=0.01), init, data_dir, tmp_path / "run")
    log = read_log(tmp_path / "run")
    assert [row["step"] for row in log] == list(range(1, 31))
    assert {"tokens", "lm_loss", "sparsity_loss", "lambda", "lr", "tokens_per_s", "mean_active_fraction",
            "layer_0", "layer_1"} <= set(log[0])
    assert log[-1]["tokens"] == 30 * 8 * SEQ_LEN
    first, last = sum(r["lm_loss"] for r in log[:3]) / 3, sum(r["lm_loss"] for r in log[-3:]) / 3
    assert last < first - 0.5
    saved = dsmoe.load_model(str(tmp_path / "run" / "model"))[0]
    assert isinstance(saved, dsmoe.DSMoEForCausalLM) and saved.config.variant == "dsmoe"


def test_large_lambda_lowers_activation(setup, tmp_path):
    _, init, data_dir = setup
    for lam in (0.0, 20.0):
        train(run_config(8, sparsity_lambda=lam), init, data_dir, tmp_path / f"lam{lam}")
    without, strong = read_log(tmp_path / "lam0.0")[-1], read_log(tmp_path / "lam20.0")[-1]
    assert without["sparsity_loss"] > 0 and without["lambda"] == 0.0 and strong["lambda"] == 20.0
    assert strong["mean_active_fraction"] < 0.5 * without["mean_active_fraction"]
    assert strong["mean_active_fraction"] == pytest.approx((strong["layer_0"] + strong["layer_1"]) / 16)


RUNNER = """
import sys, torch
torch.set_num_threads(1)
from dsmoe.config import validate_config
from dsmoe.train import train
config = validate_config({"data": {"seq_len": %d, "val_sequences": 2}, "train": %s})
train(config, sys.argv[1], sys.argv[2], sys.argv[3])
"""


def test_resume_after_sigkill_matches_uninterrupted_run(setup, tmp_path, caplog):
    _, init, data_dir = setup
    settings = dict(run_config(40, checkpoint_every=4, keep_checkpoints=2)["train"])
    script = RUNNER % (SEQ_LEN, repr(settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", script, str(init), str(data_dir)]
    train(run_config(40, checkpoint_every=4, keep_checkpoints=2), init, data_dir, tmp_path / "whole")

    killed = subprocess.Popen(command + [str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoints" / "step_4").exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it could be killed"
    with caplog.at_level(logging.INFO, logger="dsmoe.train"):
        train(run_config(40, checkpoint_every=4, keep_checkpoints=2), init, data_dir, tmp_path / "killed")
    assert "resuming from" in caplog.text and "step_" in caplog.text

    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6, msg=name)
    log_whole, log_resumed = read_log(tmp_path / "whole"), read_log(tmp_path / "killed")
    assert [r["step"] for r in log_resumed] == list(range(1, 41))
    assert log_resumed[-1]["lm_loss"] == pytest.approx(log_whole[-1]["lm_loss"], abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step_36", "step_40"]


def test_variants_choose_their_auxiliary_loss(setup, tmp_path):
    dense, init, data_dir = setup
    train(run_config(2, log_every=2), init, data_dir, tmp_path / "topk", variant="topk_switch")  # same linear gate
    row = read_log(tmp_path / "topk")[-1]
    assert row["load_balancing_loss"] > 0 and row["sparsity_loss"] == 0
    assert row["layer_0"] == pytest.approx(3.0)  # top_k experts per token
    assert json.loads((tmp_path / "topk" / "model" / "config.json").read_text())["variant"] == "topk_switch"
    with pytest.raises(ValueError, match="topk variant has its own gate"):
        train(run_config(2), init, data_dir, tmp_path / "topk_noisy", variant="topk")
    train(run_config(2, log_every=2), dense, data_dir, tmp_path / "dense", variant="dense")
    row = read_log(tmp_path / "dense")[-1]
    assert row["sparsity_loss"] == 0 and row["mean_active_fraction"] == 1.0
    with pytest.raises(ValueError, match="init model is dense"):
        train(run_config(2), dense, data_dir, tmp_path / "bad", variant="no_ste")


def test_adaptive_lambda_and_gate_learning_rate(setup, tmp_path):
    _, init, data_dir = setup
    adaptive = {"enabled": True, "target_fraction": 0.01, "lambda_max": 0.56, "max_step": 0.1}
    train(run_config(4, sparsity_lambda=0.5, adaptive_sparsity=adaptive, checkpoint_every=4), init, data_dir, tmp_path / "run")
    lams = [row["lambda"] for row in read_log(tmp_path / "run")]
    assert lams[0] == 0.5 and lams[1] == pytest.approx(0.5 * math.exp(0.1))  # too dense: λ grows by at most max_step
    assert lams[1] < lams[2] <= lams[3] == pytest.approx(0.56)  # up to its ceiling, no further
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["lambda_control"]["steps"] == 4 and state["sparsity_lambda"] == pytest.approx(0.56)  # resumes exactly
    model, _ = dsmoe.load_model(str(init))
    groups = param_groups(model, 0.1, gate_lr=1e-2)
    gates = {id(layer.gate.weight) for layer in dsmoe.dsmoe_layers(model)}
    assert {id(p) for p in groups[-1]["params"]} == gates and groups[-1]["lr"] == 1e-2
    assert all(p.dim() == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_bad_inputs(setup, tmp_path):
    _, init, data_dir = setup
    with pytest.raises(ValueError, match="smaller than one batch"):
        train(validate_config({"data": {"seq_len": SEQ_LEN}, "train": {"tokens": 100, "batch_size": 8}}),
              init, data_dir, tmp_path / "tiny")
    with pytest.raises(FileNotFoundError, match="no manifest"):
        train(run_config(2), init, tmp_path / "nodata", tmp_path / "x")

    train(run_config(2, checkpoint_every=1), init, data_dir, tmp_path / "run")
    with pytest.raises(ValueError, match="different config.*--overwrite"):
        train(run_config(2, lr=1e-4), init, data_dir, tmp_path / "run")
    train(run_config(2, lr=1e-4), init, data_dir, tmp_path / "run", overwrite=True)
    assert read_log(tmp_path / "run")[-1]["step"] == 2

    with pytest.raises(TrainingDiverged, match="at step 2.*step_1"):
        train(run_config(6, lr=1e30, warmup_steps=0, grad_clip=0.0, checkpoint_every=1), init, data_dir, tmp_path / "nan")
    assert [p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()] == ["step_1"]
    assert not (tmp_path / "nan" / "model").exists()


def test_cli_train_reports_missing_data(setup, tmp_path, capsys):
    from dsmoe.cli import main

    _, init, _ = setup
    config = tmp_path / "run.yaml"
    config.write_text("data: {seq_len: 32}\ntrain: {tokens: 1000, batch_size: 2}\n")
    code = main(["train", "--config", str(config), "--init", str(init), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")])
    assert code == 2 and "no prepared data" in capsys.readouterr().err


def test_wanda_pruned_init_keeps_its_zeros(setup, tmp_path):
    dense, _, data_dir = setup
    model, tokenizer = dsmoe.load_model(str(dense))
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight[:, ::2] = 0  # half the weights pruned
    save_model(model, tokenizer, tmp_path / "wanda")
    (tmp_path / "wanda" / "pruning.json").write_text(json.dumps({"kind": "wanda", "fraction": 0.5}))
    trained = train(run_config(3), tmp_path / "wanda", data_dir, tmp_path / "run", variant="dense")
    weights = load_file(str(trained / "model.safetensors"))
    up = weights["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(up[:, ::2], torch.zeros_like(up[:, ::2]))
    assert (up[:, 1::2] != mlp.up_proj.weight[:, 1::2]).any()  # the rest did train
    assert json.loads((trained / "pruning.json").read_text())["kind"] == "wanda"  # evaluation counts against it


def fake_checkpoints(run_dir, steps, fingerprint):
    for step in steps:
        path = run_dir / "checkpoints" / f"step_{step}"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
    (run_dir / "checkpoints" / ".tmp-step_9").mkdir()  # a save cut short: never a resume point


def test_resume_decision(tmp_path):
    assert resume_point(tmp_path / "new", "abc") == Resume((), discard=False)
    fake_checkpoints(tmp_path / "same", [2, 10, 4], "abc")
    root = tmp_path / "same" / "checkpoints"
    assert resume_point(tmp_path / "same", "abc") == Resume((root / "step_10", root / "step_4", root / "step_2"), False)
    assert resume_point(tmp_path / "same", "abc", resume=False) == Resume((), discard=True)
    (root / "step_10" / "trainer_state.json").unlink()  # damaged: skipped, the next one decides
    assert resume_point(tmp_path / "same", "abc") == Resume((root / "step_4", root / "step_2"), False)
    fake_checkpoints(tmp_path / "other", [3], "xyz")
    with pytest.raises(ValueError, match="different config.*--overwrite"):
        resume_point(tmp_path / "other", "abc")
    with pytest.raises(ValueError, match="different config"):
        resume_point(tmp_path / "other", "abc", resume=False)  # --no-resume alone does not discard another config
    assert resume_point(tmp_path / "other", "abc", overwrite=True) == Resume((), discard=True)
    fake_checkpoints(tmp_path / "broken", [5], "abc")
    (tmp_path / "broken" / "checkpoints" / "step_5" / "trainer_state.json").write_text("{trunc")
    with pytest.raises(ValueError, match="no checkpoint.*readable trainer state.*--no-resume"):
        resume_point(tmp_path / "broken", "abc")
    assert resume_point(tmp_path / "broken", "abc", resume=False) == Resume((), discard=True)


def checkpoint_weights(run_dir):
    return {path.name: load_file(path / "model.safetensors") for path in sorted((run_dir / "checkpoints").glob("step_*"))}


def all_finite(weights):
    return all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_non_finite_gradient_stops_before_the_update(setup, tmp_path, monkeypatch):
    """Issue 12.2: an overflowing gradient with a finite loss stops the run before the optimizer
    writes non-finite weights; the good checkpoint stays (keep_checkpoints 1)."""
    _, init, data_dir = setup
    accumulate, calls = trainer.accumulate_gradients, []

    def overflowing_at_step_3(accelerator, model, *args):
        stats = accumulate(accelerator, model, *args)
        calls.append(1)
        if len(calls) == 3:  # a fault: one gradient entry overflows
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.inf
        return stats

    monkeypatch.setattr(trainer, "accumulate_gradients", overflowing_at_step_3)
    with pytest.raises(TrainingDiverged, match=r"gradient norm is (inf|nan) at step 3.*Last good checkpoint: .*step_2"):
        train(run_config(6, checkpoint_every=1, keep_checkpoints=1), init, data_dir, tmp_path / "run")
    saved = checkpoint_weights(tmp_path / "run")
    assert list(saved) == ["step_2"] and all_finite(saved["step_2"])
    assert not (tmp_path / "run" / "model").exists()


def test_non_finite_weights_are_never_checkpointed(setup, tmp_path):
    """Issue 12.2: an update that overflows the weights while loss and gradient are finite (lr 3e38 with
    weight decay 10: the decay factor 1 - lr·wd overflows float32) writes no checkpoint of them, and
    rotation keeps the last good one (keep_checkpoints 1)."""
    _, init, data_dir = setup
    settings = dict(lr=3e38, weight_decay=10.0, betas=[0.0, 0.0], warmup_steps=1, grad_clip=0.0,  # step 1: lr 0
                    checkpoint_every=1, keep_checkpoints=1)
    with pytest.raises(TrainingDiverged, match=r"weights are not finite after step 2; no checkpoint written.*step_1"):
        train(run_config(6, **settings), init, data_dir, tmp_path / "run")
    saved = checkpoint_weights(tmp_path / "run")
    assert list(saved) == ["step_1"] and all_finite(saved["step_1"])


def test_every_expert_off_stops_the_run(setup, tmp_path, caplog):
    """Issue 12.2: every gate of every layer off (LM loss near ln(vocab)) for train.all_experts_off_steps
    steps (default 50) is a silent divergence: a warning, and the run stops."""
    dense, _, data_dir = setup
    model, tokenizer = dsmoe.load_model(str(dense))
    model = dsmoe.convert(model, n_experts=8, tau=0.9)
    for layer in dsmoe.dsmoe_layers(model):
        torch.nn.init.zeros_(layer.gate.weight)  # σ = 0.5 < τ: every expert off
    save_model(model, tokenizer, tmp_path / "off")
    with caplog.at_level(logging.WARNING), pytest.raises(TrainingDiverged, match="every expert of every layer has "
                                                         "been off for 50 steps .to step 50.*ln.vocab"):
        train(run_config(60, lr=1e-5, log_every=10), tmp_path / "off", data_dir, tmp_path / "run")
    assert "every expert of every layer" in caplog.text
    assert read_log(tmp_path / "run")[-1]["mean_active_fraction"] == 0.0
    assert validate_config({})["train"]["all_experts_off_steps"] == 50
    with pytest.raises(TrainingDiverged, match="off for 3 steps"):
        train(run_config(60, lr=1e-5, all_experts_off_steps=3), tmp_path / "off", data_dir, tmp_path / "run3")


def test_resume_skips_damaged_checkpoints(setup, tmp_path, caplog):
    """Issue 12.3: a truncated newest checkpoint and one without its trainer state are skipped, named
    with the cause, and set aside; the run resumes from the newest that loads and ends as an
    uninterrupted run."""
    _, init, data_dir = setup
    config = run_config(8, checkpoint_every=2, keep_checkpoints=3)
    run = tmp_path / "run"
    train(config, init, data_dir, run)
    whole = load_file(run / "model" / "model.safetensors")
    shutil.rmtree(run / "model")
    weights = run / "checkpoints" / "step_8" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated by a full disk
    (run / "checkpoints" / "step_6" / "trainer_state.json").unlink()
    with caplog.at_level(logging.INFO, logger="dsmoe.train"):
        train(config, init, data_dir, run)
    assert re.search(r"skipping checkpoint .*step_6: trainer_state.json is missing", caplog.text)
    assert re.search(r"skipping checkpoint .*step_8: it does not load \(\w+", caplog.text)
    assert re.search(r"resuming from .*step_4", caplog.text)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "damaged-step_6", "damaged-step_8", "step_4", "step_6", "step_8"]
    resumed = load_file(run / "model" / "model.safetensors")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6, msg=name)
    assert [row["step"] for row in read_log(run)] == list(range(1, 9))


def test_milestone_models_are_kept_and_evaluated(setup, tmp_path):
    """Tables 5-6: the model at each token milestone stays while checkpoints rotate (keep_checkpoints 1)."""
    import pandas as pd

    from dsmoe import cli
    from dsmoe.train.milestones import milestone_dirs, milestone_steps

    _, init, data_dir = setup
    tokens_per_step = 8 * SEQ_LEN
    config = run_config(12, checkpoint_every=2, keep_checkpoints=1)
    config["eval"]["milestone_tokens"] = [3 * tokens_per_step, 5.5 * tokens_per_step, 10**9]  # the last lies beyond
    assert milestone_steps(config["eval"]["milestone_tokens"], tokens_per_step, 12) == {3: 3 * tokens_per_step,
                                                                                         6: 5.5 * tokens_per_step}
    run = tmp_path / "run"
    train(config, init, data_dir, run, milestones=True)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_12"]
    kept = milestone_dirs(run)
    assert [info["step"] for _, info in kept] == [3, 6]
    assert [info["tokens"] for _, info in kept] == [3 * tokens_per_step, 6 * tokens_per_step]
    weights = [load_file(path / "model.safetensors")["model.layers.0.mlp.gate.weight"] for path, _ in kept]
    final = load_file(run / "model" / "model.safetensors")["model.layers.0.mlp.gate.weight"]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], final)

    out = tmp_path / "milestones.csv"
    assert cli.main(["eval", "milestones", "--run", str(run), "--data", str(data_dir), "--max-sequences", "2",
                     "--out", str(out)]) == 0
    df = pd.read_csv(out)
    overall = df[df["source"] == "all"]
    assert overall["step"].tolist() == [3, 6, 12] and overall["final"].tolist() == [False, False, True]
    assert overall["train_tokens"].tolist() == [3 * tokens_per_step, 6 * tokens_per_step, 12 * tokens_per_step]
    assert set(df["model"]) == {"run"} and set(df["variant"]) == {"dsmoe"} and (overall["ppl"] > 1).all()

    # a fresh run of another milestone list replaces the old milestones
    config["eval"]["milestone_tokens"] = [2 * tokens_per_step]
    train(config, init, data_dir, run, milestones=True, resume=False)
    assert [info["step"] for _, info in milestone_dirs(run)] == [2]
