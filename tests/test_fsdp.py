"""FSDP2 through `accelerate launch` with the shipped config (workflow/accelerate/fsdp.yaml) on CPU
processes (gloo; dsmoe/train/fsdp.py turns accelerate's CPU fallback to DDP back into FSDP): from a
DSMoE init and from a Wanda init against one process, resume on another number of processes, the
refusal of a checkpoint of the other layout, host memory of rank 1 against rank 0 with efficient loading.
Three 2-process launches and one 1-process launch: about 85 s on 2 cores.
"""

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import dsmoe
from dsmoe import data
from dsmoe.config import validate_config
from dsmoe.hub import load_model, save_model
from dsmoe.launch import launch_prefix
from dsmoe.train import train
from dsmoe.train.fsdp import check_layout
from test_distributed import ENV, LOSS_TOL, ROOT, WEIGHT_TOL, copy_run_at, read_log

SEQ_LEN, BATCH, STEPS = 32, 8, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fsdp_config(steps=STEPS):
    train_section = {"tokens": steps * BATCH * SEQ_LEN, "batch_size": BATCH, "micro_batch_size": 2, "lr": 3e-3,
                     "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 5, "seed": 7,
                     "sparsity_lambda": 0.01, "mixed_precision": "no"}
    return validate_config({"data": {"seq_len": SEQ_LEN, "val_sequences": 2}, "train": train_section})


def fsdp_launch(processes, init, data_dir, out, config_file, extra_env=None, wait=True):
    """`dsmoe train` through the workflow's multi-GPU line (the FSDP config) on CPU processes."""
    command = (f"ACCELERATE_USE_CPU=true {launch_prefix(gpus=2)} train --config {config_file} --init {init} "
               f"--data {data_dir} --out {out}").replace("--num_processes 2", f"--num_processes {processes}")
    log = open(f"{out}.log", "w")
    proc = subprocess.Popen(command, shell=True, cwd=ROOT, env={**ENV, **(extra_env or {})}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    if not wait:
        return proc
    rc = proc.wait(timeout=300)
    text = Path(f"{out}.log").read_text()
    assert rc == 0, f"{command} failed ({rc}):\n{text[-4000:]}"
    assert f"training on {processes} process(es), FSDP" in text, text[-3000:]
    return text


def assert_same_run(run, reference, steps=STEPS):
    """Same loss curve and final weights (float32 sums in another order: all-reduce vs accumulation)."""
    curve, expected = read_log(run), read_log(reference)
    assert [r["step"] for r in curve] == list(range(1, steps + 1))
    torch.testing.assert_close(torch.tensor([r["lm_loss"] for r in curve], dtype=torch.float64),
                               torch.tensor([r["lm_loss"] for r in expected], dtype=torch.float64), **LOSS_TOL)
    weights, reference_weights = (load_file(Path(d) / "model" / "model.safetensors") for d in (run, reference))
    assert weights.keys() == reference_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], reference_weights[name], **WEIGHT_TOL, msg=name)


def tiny_llama(tokenizer, hidden=32, intermediate=64, layers=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        eos_token_id=tokenizer.eos_token_id))


@pytest.fixture(scope="module")
def inits(tmp_path_factory, bpe_tokenizer):
    """`(dsmoe_init, data_dir, config_file, root)`."""
    root = tmp_path_factory.mktemp("fsdp")
    save_model(dsmoe.convert(tiny_llama(bpe_tokenizer), n_experts=8, tau=0.5), bpe_tokenizer, root / "dsmoe")
    data.prepare(fsdp_config(), bpe_tokenizer, root / "data")
    (root / "config.yaml").write_text(yaml.safe_dump(fsdp_config()))
    return root / "dsmoe", root / "data", root / "config.yaml", root


@pytest.fixture(scope="module")
def dsmoe_runs(inits):
    """The DSMoE init trained on one process (no FSDP) and on 2 FSDP processes."""
    init, data_dir, config_file, root = inits
    train(fsdp_config(), init, data_dir, root / "one")
    log = fsdp_launch(2, init, data_dir, root / "fsdp", config_file)
    return root / "one", root / "fsdp", log


def test_fsdp_through_accelerate_from_a_dsmoe_init_matches_one_process(dsmoe_runs):
    one, fsdp, _ = dsmoe_runs
    assert_same_run(fsdp, one)  # loss curve and final weights (rtol 1e-4)
    assert (fsdp / "checkpoints" / "step_2" / "pytorch_model_fsdp_0").is_dir()  # sharded checkpoints
    model, _ = load_model(str(fsdp / "model"))  # the final model: a full Hugging Face checkpoint
    assert type(model).__name__ == "DSMoEForCausalLM"


def test_fsdp_resumes_on_another_number_of_processes_and_refuses_a_full_run(dsmoe_runs, inits, tmp_path):
    one, fsdp, _ = dsmoe_runs
    init, data_dir, config_file, _ = inits
    resumed = copy_run_at(fsdp, 2, tmp_path / "two_then_one")  # written by 2 FSDP processes, resumed on 1
    log = fsdp_launch(1, init, data_dir, resumed, config_file)
    assert "resuming from" in log and "step_2" in log
    assert_same_run(resumed, one)
    # a sharded checkpoint in a run without FSDP: refused before any step, naming both layouts
    with pytest.raises(ValueError, match=r"is sharded \(FSDP.*loads full .*accelerate merge-weights"):
        train(fsdp_config(), init, data_dir, copy_run_at(fsdp, 2, tmp_path / "fsdp_then_plain"))
    # and a full checkpoint in an FSDP run (the check itself: an FSDP launch costs 12 s here)
    fsdp_run = SimpleNamespace(distributed_type=SimpleNamespace(name="FSDP"))
    with pytest.raises(ValueError, match=r"is full \(one process or DDP.*this run is FSDP and loads sharded"):
        check_layout(fsdp_run, one / "checkpoints" / "step_2")


def save_wanda_init(model, tokenizer, path):
    """Half of each decoder linear weight zero and pruning.json, as `dsmoe baseline prune --kind wanda` leaves it."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(torch.rand(param.shape, generator=torch.Generator().manual_seed(3)) > 0.5)
    save_model(model, tokenizer, path)
    (path / "pruning.json").write_text(json.dumps({"kind": "wanda", "sparsity": 0.5}))
    return sum(p.numel() for p in model.parameters()) * 4


def test_fsdp_from_a_wanda_init_keeps_its_zeros_and_rank_1_holds_no_full_model(inits, tmp_path, bpe_tokenizer):
    """A Wanda init of 32M parameters (121 MiB in fp32) on 2 FSDP processes: the same 2 steps as one process,
    its zeros kept (the masks sharded like their parameters), and host memory. Rank 0 reads the weights,
    rank 1 builds the model on the meta device and receives its shards; each process's peak resident memory
    after setup comes from the trainer's log. On the CPU the shards arrive through full-size host buffers
    (on a GPU they are device memory), so rank 1 saves part of the model's size (78 MiB measured), not all
    of it; without efficient loading, 13 MiB."""
    _, data_dir, _, _ = inits
    init = tmp_path / "wanda"
    model_bytes = save_wanda_init(tiny_llama(bpe_tokenizer, hidden=512, intermediate=2048, layers=8), bpe_tokenizer, init)
    (tmp_path / "two_steps.yaml").write_text(yaml.safe_dump(fsdp_config(steps=2)))
    log = fsdp_launch(2, init, data_dir, tmp_path / "wanda_fsdp", tmp_path / "two_steps.yaml")
    train(fsdp_config(steps=2), init, data_dir, tmp_path / "wanda_one")
    assert_same_run(tmp_path / "wanda_fsdp", tmp_path / "wanda_one", steps=2)
    start, end = (load_file(d / "model.safetensors") for d in (init, tmp_path / "wanda_fsdp" / "model"))
    for name, weight in start.items():
        if name.endswith("proj.weight"):
            assert torch.equal(end[name] == 0, weight == 0), name
    assert (tmp_path / "wanda_fsdp" / "model" / "pruning.json").is_file()
    peaks = {int(rank): float(mib) * 2**20 for rank, mib in
             re.findall(r"process (\d+): host memory peak (\d+) MiB after setup", log)}
    mib = {rank: round(peak / 2**20) for rank, peak in peaks.items()}
    print(f"peak host memory after setup by rank (MiB): {mib}; model {model_bytes / 2**20:.0f} MiB in fp32")
    assert set(peaks) == {0, 1}, log[-3000:]
    assert peaks[1] < peaks[0] - 0.3 * model_bytes, mib
