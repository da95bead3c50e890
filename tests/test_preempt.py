"""Preemption and walltime (dsmoe/train/preempt.py): a `dsmoe train` process that gets SIGUSR1 (or reaches
its --time-limit) finishes its step, checkpoints, exits 75; the next attempt resumes and ends where an
uninterrupted run ends (the tolerance of tests/test_train.py's resume test); real errors are not retried
for ever. The same through SLURM is in tests/test_cluster.py."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ENV
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import dsmoe
from dsmoe import data
from dsmoe.config import validate_config
from dsmoe.hub import save_model
from dsmoe.train import train
from dsmoe.train.preempt import RESUBMIT_EXIT, check_attempt, record_resubmit

SEQ_LEN = 32
STEPS = 24


def run_config(**cluster):
    return validate_config({"data": {"seq_len": SEQ_LEN, "val_sequences": 2},
                            "train": {"tokens": STEPS * 8 * SEQ_LEN, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3,
                                      "warmup_steps": 2, "log_every": 1, "checkpoint_every": 1000, "seed": 7},
                            "cluster": {"stop_margin_minutes": 0, **cluster}})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bpe_tokenizer):
    """`(init, data_dir, config_file)`: a tiny DSMoE model, its data, the run config as a file."""
    root = tmp_path_factory.mktemp("preempt")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=bpe_tokenizer.eos_token_id)
    save_model(LlamaForCausalLM(config), bpe_tokenizer, root / "dense")
    model, _ = dsmoe.load_model(str(root / "dense"))
    save_model(dsmoe.convert(model, n_experts=8, tau=0.5), bpe_tokenizer, root / "dsmoe")
    data.prepare(run_config(), bpe_tokenizer, root / "data")
    (root / "config.yaml").write_text(yaml.safe_dump(run_config()))
    return root / "dsmoe", root / "data", root / "config.yaml"


def dsmoe_train(setup, out, *extra):
    init, data_dir, config_file = setup
    command = [sys.executable, "-m", "dsmoe.cli", "train", "--config", str(config_file), "--init", str(init),
               "--data", str(data_dir), "--out", str(out), *extra]
    return subprocess.Popen(command, env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_log(run_dir):
    with open(Path(run_dir) / "train_log.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def assert_same_model(a, b):
    left, right = load_file(Path(a) / "model" / "model.safetensors"), load_file(Path(b) / "model" / "model.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(right[name], left[name], rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def whole(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    torch.set_num_threads(1)
    train(run_config(), setup[0], setup[1], out)
    return out


def test_sigusr1_checkpoints_exits_75_and_the_next_attempt_resumes(setup, whole, tmp_path):
    out = tmp_path / "run"
    proc = dsmoe_train(setup, out)
    deadline = time.time() + 120
    while not ((out / "train_log.csv").is_file() and len(read_log(out)) >= 3):  # mid-run
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == RESUBMIT_EXIT, output[-3000:]
    assert "received SIGUSR1" in output and "exit 75" in output
    record = json.loads((out / "resubmit.json").read_text())
    stopped = record["step"]
    assert record == {"attempt": 1, "step": stopped, "reason": "SIGUSR1"} and 3 <= stopped < STEPS
    assert (out / "checkpoints" / f"step_{stopped}").is_dir() and not (out / "model").exists()

    resumed = dsmoe_train(setup, out, "--attempt", "2")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert f"step_{stopped}" in output  # resuming from it
    assert_same_model(whole, out)
    before, after = read_log(whole), read_log(out)
    assert [r["step"] for r in after] == list(range(1, STEPS + 1))
    assert after[-1]["lm_loss"] == pytest.approx(before[-1]["lm_loss"], abs=1e-6)
    print(f"\nSIGUSR1 at step {stopped}: final lm_loss uninterrupted {before[-1]['lm_loss']:.6f}, "
          f"interrupted+resumed {after[-1]['lm_loss']:.6f}")


def test_time_limit_stops_before_the_walltime(setup, tmp_path):
    """--time-limit 0.0001 minutes: already past after the first step -> checkpoint at step 1, exit 75."""
    out = tmp_path / "run"
    proc = dsmoe_train(setup, out, "--time-limit", "0.0001")
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == RESUBMIT_EXIT, output[-3000:]
    assert json.loads((out / "resubmit.json").read_text()) == {"attempt": 1, "step": 1, "reason": "time limit"}
    assert (out / "checkpoints" / "step_1").is_dir()


def test_real_errors_are_retried_only_retry_failures_times(tmp_path):
    check_attempt(tmp_path, 1, 1)  # a fresh run
    check_attempt(tmp_path, 2, 1)  # attempt 1 failed: one retry allowed
    with pytest.raises(ValueError, match="attempt 3: the 2 attempt"):
        check_attempt(tmp_path, 3, 1)
    record_resubmit(tmp_path, 5, 40, "SIGUSR1")  # attempt 5 stopped for a resubmit
    check_attempt(tmp_path, 6, 0)
    check_attempt(tmp_path, 7, 1)  # attempt 6 failed
    with pytest.raises(ValueError, match="retry_failures=1"):
        check_attempt(tmp_path, 8, 1)
    check_attempt(tmp_path, 1, 1)  # a new snakemake run forgets the record
    assert not (tmp_path / "resubmit.json").exists()
