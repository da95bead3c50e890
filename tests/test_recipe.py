"""Recipe options beyond the paper (issue 28): the gate warm-up and distillation from the dense parent."""

import copy
import csv
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import dsmoe
from dsmoe import data
from dsmoe.config import ConfigError, validate_config, variant_train
from dsmoe.hub import save_model
from dsmoe.train import train, trainer
from dsmoe.train.checkpoint import run_fingerprint
from dsmoe.train.distill import distill_loss
from dsmoe.train.preempt import Preempted

SEQ_LEN = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_config(steps, batch_size=4, **train_settings):
    settings = {"tokens": steps * batch_size * SEQ_LEN, "batch_size": batch_size, "micro_batch_size": 4, "lr": 3e-3,
                "warmup_steps": 1, "log_every": 1, "checkpoint_every": 1000, "seed": 7, "mixed_precision": "no",
                "sparsity_lambda": 0.5, **train_settings}
    return validate_config({"data": {"seq_len": SEQ_LEN, "val_sequences": 2}, "train": settings})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bpe_tokenizer):
    root = tmp_path_factory.mktemp("recipe")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=bpe_tokenizer.eos_token_id)
    save_model(LlamaForCausalLM(config), bpe_tokenizer, root / "dense")
    model, _ = dsmoe.load_model(str(root / "dense"))
    save_model(dsmoe.convert(model, n_experts=8, tau=0.5), bpe_tokenizer, root / "dsmoe")
    data.prepare(run_config(40), bpe_tokenizer, root / "data")
    return root / "dense", root / "dsmoe", root / "data"


def read_log(run_dir):
    with open(Path(run_dir) / "train_log.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------- gate warm-up


def test_warmup_updates_only_the_gates_at_lambda_zero(setup, tmp_path):
    _, init, data_dir = setup
    run = trainer.setup(run_config(4, gate_warmup_steps=4), init, Path(data_dir), tmp_path / "run", None, False, True)
    before = params(run.model)
    trainer.training_loop(run)
    after = params(run.model)
    gates = [name for name in before if ".mlp.gate." in name]
    assert len(gates) == 2
    for name in before:
        if name in gates:
            assert not torch.equal(before[name], after[name]), name  # the gates learn
        else:
            assert torch.equal(before[name], after[name]), name  # bitwise unchanged
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["lambda"] == 0.0 for r in log)


def test_warmup_then_lambda(setup, tmp_path):
    _, init, data_dir = setup
    train(run_config(5, gate_warmup_steps=2), init, data_dir, tmp_path / "run")
    assert [r["lambda"] for r in read_log(tmp_path / "run")] == [0.0, 0.0, 0.5, 0.5, 0.5]


class StopAt:
    """A stand-in for preempt.StopRequest: asks to stop after `step`."""

    reason = "test stop"

    def __init__(self, step):
        self.step, self.done = step, 0

    def step_done(self, accelerator):
        self.done += 1
        return self.done == self.step


def test_resume_mid_warmup_equals_uninterrupted(setup, tmp_path):
    _, init, data_dir = setup
    config = run_config(6, gate_warmup_steps=4, checkpoint_every=100)
    train(config, init, data_dir, tmp_path / "whole")
    with pytest.raises(Preempted):
        train(config, init, data_dir, tmp_path / "stopped", stop=StopAt(2))  # checkpoint at step 2, in the warm-up
    assert (tmp_path / "stopped" / "checkpoints" / "step_2").is_dir()
    train(config, init, data_dir, tmp_path / "stopped")
    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "model" / "model.safetensors")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6, msg=name)
    log_whole, log_resumed = read_log(tmp_path / "whole"), read_log(tmp_path / "stopped")
    assert [r["lambda"] for r in log_resumed] == [r["lambda"] for r in log_whole] == [0.0] * 4 + [0.5] * 2
    assert [r["lm_loss"] for r in log_resumed] == pytest.approx([r["lm_loss"] for r in log_whole], abs=1e-6)


def test_warmup_refused_without_sigmoid_gates(setup, tmp_path):
    dense, _, data_dir = setup
    with pytest.raises(ValueError, match="gate_warmup_steps"):
        train(run_config(2, gate_warmup_steps=1), dense, data_dir, tmp_path / "run", variant="dense")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fingerprint_has_the_new_keys_only_when_on(setup):
    _, init, _ = setup
    model, _ = dsmoe.load_model(str(init))
    manifest = {"fingerprint": "x"}
    base = run_config(4)
    old = {**base, "train": {k: v for k, v in base["train"].items() if k not in ("gate_warmup_steps", "distill")}}
    assert run_fingerprint(base, "dsmoe", manifest, model) == run_fingerprint(old, "dsmoe", manifest, model)
    warm = run_fingerprint(run_config(4, gate_warmup_steps=2), "dsmoe", manifest, model)
    distilled = run_fingerprint(run_config(4, distill={"weight": 0.5}), "dsmoe", manifest, model)
    hotter = run_fingerprint(run_config(4, distill={"weight": 0.5, "temperature": 2.0}), "dsmoe", manifest, model)
    assert len({run_fingerprint(base, "dsmoe", manifest, model), warm, distilled, hotter}) == 4


# ---------------------------------------------------------------- distillation


def hand_kl(student, teacher, t):
    """Σ_v p_t log(p_t / p_s) at temperature t, times t², averaged over rows: plain float64 loops."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = [math.exp(v / t) for v in s_row]
        zt = [math.exp(v / t) for v in t_row]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return total / len(student) * t * t


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_distill_loss_is_kl_at_temperature(temperature):
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(6, 11, generator=gen) * 3, torch.randn(6, 11, generator=gen) * 3
    got = distill_loss(student.double(), teacher.double(), temperature)
    assert float(got) == pytest.approx(hand_kl(student, teacher, temperature), rel=1e-6)
    assert float(distill_loss(teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([True, False, True, True, False, False])
    masked = distill_loss(student.double(), teacher.double(), temperature, mask)
    assert float(masked) == pytest.approx(hand_kl(student[mask], teacher[mask], temperature), rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(student, teacher, 0.0)


def test_distill_run_logs_the_term_and_keeps_the_teacher_frozen(setup, tmp_path):
    dense, init, data_dir = setup
    run = trainer.setup(run_config(3, distill={"weight": 0.5, "temperature": 2.0}), init, Path(data_dir),
                        tmp_path / "run", None, False, True)
    teacher = params(run.distill.teacher)
    assert not run.distill.teacher.training and not any(p.requires_grad for p in run.distill.teacher.parameters())
    parent = LlamaForCausalLM.from_pretrained(dense).eval()
    ids = torch.randint(0, parent.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the default teacher, all experts on, is the dense parent
        torch.testing.assert_close(run.distill.teacher_logits(ids), parent(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    trainer.training_loop(run)
    assert all(torch.equal(teacher[name], p) for name, p in run.distill.teacher.named_parameters())
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["distill_loss"]) and r["distill_loss"] > 0 for r in log)


def test_no_distill_column_by_default(setup, tmp_path):
    _, init, data_dir = setup
    train(run_config(2), init, data_dir, tmp_path / "run")
    assert "distill_loss" not in read_log(tmp_path / "run")[0]


# ---------------------------------------------------------------- per-variant train settings


def test_variant_train_merges_one_variants_keys_over_train():
    config = validate_config({"variants": ["dsmoe", "no_ste"], "train": {"lr": 1e-4, "adaptive_sparsity": {
        "enabled": True, "target_fraction": 0.375, "ramp_steps": 60}},
        "train_overrides": {"no_ste": {"adaptive_sparsity": {"target_fraction": 0.53}, "lr": "2e-4"}}})
    merged = variant_train(config, "no_ste")
    expected = copy.deepcopy(config["train"])
    expected["adaptive_sparsity"]["target_fraction"], expected["lr"] = 0.53, 2e-4
    assert merged == expected  # nested keys one by one: enabled and ramp_steps stay
    assert variant_train(config, "dsmoe") == config["train"] and variant_train(config, None) == config["train"]
    assert config["train"]["adaptive_sparsity"]["target_fraction"] == 0.375  # the config is not changed


def test_overrides_are_coerced_as_train_and_checked_once():
    config = validate_config({"variants": ["dsmoe", "no_ste"], "train_overrides": {"no_ste": {
        "mixed_precision": False, "batch_size": "8", "lr": "2e-4"}}})  # YAML 1.1: `no`, a quoted 8, 2e-4
    assert {k: variant_train(config, "no_ste")[k] for k in ("mixed_precision", "batch_size", "lr")} == {
        "mixed_precision": "no", "batch_size": 8, "lr": 2e-4}
    with pytest.raises(ConfigError) as caught:  # a broken base is reported once, not again per override
        validate_config({"variants": ["no_ste"], "train": {"tokens": 10},
                         "train_overrides": {"no_ste": {"lr": 1e-3}}})
    assert "train_overrides" not in str(caught.value) and "'train.tokens'" in str(caught.value)


def test_the_trainer_applies_the_trained_variants_overrides(setup, tmp_path):
    _, init, data_dir = setup
    config = {**run_config(2), "train_overrides": {"no_ste": {"sparsity_lambda": 0.25}}}
    train(config, init, data_dir, tmp_path / "dsmoe")  # the init's own variant, dsmoe: no override
    train(config, init, data_dir, tmp_path / "no_ste", variant="no_ste")
    assert [r["lambda"] for r in read_log(tmp_path / "dsmoe")] == [0.5, 0.5]
    assert [r["lambda"] for r in read_log(tmp_path / "no_ste")] == [0.25, 0.25]
    with pytest.raises(ValueError, match="different config"):  # the fingerprint holds the merged settings
        train(config, init, data_dir, tmp_path / "dsmoe", variant="no_ste")
