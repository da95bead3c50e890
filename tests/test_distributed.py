"""Training on several CPU processes through the workflow's launch line (dsmoe/launch.py): DDP over
gloo against one process, checkpoints across world sizes, a rank killed with SIGKILL, each rank's
data; FSDP2 `fully_shard` of a DSMoE model under torchrun. One tiny DSMoE model (hidden 32, 8 experts).
"""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import dsmoe
from dsmoe import data
from dsmoe.config import validate_config
from dsmoe.hub import save_model
from dsmoe.launch import FSDP_CONFIG, launch_prefix
from dsmoe.train import train
from dsmoe.train.trainer import ProcessBatches
from conftest import SMOKE, snakemake

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, BATCH, STEPS = 32, 8, 16
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LOSS_TOL = dict(rtol=1e-4, atol=1e-4)  # float32 sums in another order (all-reduce vs accumulation)
WEIGHT_TOL = dict(rtol=1e-4, atol=1e-5)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_config():
    train_section = {"tokens": STEPS * BATCH * SEQ_LEN, "batch_size": BATCH, "micro_batch_size": 2, "lr": 3e-3,
                     "warmup_steps": 2, "log_every": 1, "checkpoint_every": 4, "keep_checkpoints": 5, "seed": 7,
                     "sparsity_lambda": 0.01, "mixed_precision": "no"}
    return validate_config({"data": {"seq_len": SEQ_LEN, "val_sequences": 2}, "train": train_section})


def launch(processes, init, data_dir, out, config_file, wait=True):
    """`dsmoe train` through the workflow's launch line on `processes` CPU processes (log: OUT.log)."""
    command = (f"{launch_prefix(cpu_processes=processes)} train --config {config_file} --init {init} "
               f"--data {data_dir} --out {out}")
    log = open(f"{out}.log", "w")
    proc = subprocess.Popen(command, shell=True, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    if not wait:
        return proc
    rc = proc.wait(timeout=300)
    assert rc == 0, f"{command} failed ({rc}):\n{Path(f'{out}.log').read_text()[-4000:]}"
    return Path(f"{out}.log").read_text()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, bpe_tokenizer):
    """`(init, data_dir, config_file, root)`: a tiny DSMoE model, its data and the run config."""
    root = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=bpe_tokenizer.eos_token_id)
    save_model(dsmoe.convert(LlamaForCausalLM(config), n_experts=8, tau=0.5), bpe_tokenizer, root / "init")
    data.prepare(run_config(), bpe_tokenizer, root / "data")
    (root / "config.yaml").write_text(yaml.safe_dump(run_config()))
    return root / "init", root / "data", root / "config.yaml", root


@pytest.fixture(scope="module")
def runs(prepared):
    """The same run on one process (in this one) and on two (`accelerate launch`, gloo)."""
    init, data_dir, config_file, root = prepared
    train(run_config(), init, data_dir, root / "one")
    log = launch(2, init, data_dir, root / "two", config_file)
    return root / "one", root / "two", log


def read_log(run_dir):
    with open(Path(run_dir) / "train_log.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def assert_same_run(run, reference):
    """Same loss curve and the same final weights, within float tolerance."""
    curve, expected = read_log(run), read_log(reference)
    assert [r["step"] for r in curve] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([r["lm_loss"] for r in curve], dtype=torch.float64),
                               torch.tensor([r["lm_loss"] for r in expected], dtype=torch.float64), **LOSS_TOL)
    weights, reference_weights = (load_file(Path(d) / "model" / "model.safetensors") for d in (run, reference))
    assert weights.keys() == reference_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], reference_weights[name], **WEIGHT_TOL, msg=name)


def trainer_state(checkpoint):
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


def test_distributed_two_processes_match_one(runs):
    one, two, log = runs
    assert "training on 2 process(es), MULTI_CPU" in log
    assert_same_run(two, one)
    # both read the same sequences: the data position after the last step is the same
    last = f"checkpoints/step_{STEPS}"
    assert trainer_state(two / last)["data_position"] == trainer_state(one / last)["data_position"]
    curve = read_log(two)
    assert curve[-1]["lm_loss"] < curve[0]["lm_loss"] - 0.3  # it learns


def test_distributed_run_leaves_only_complete_checkpoints(runs):
    """A finished run leaves no half-written `.tmp-step_N`, in 1 process or 2, and every checkpoint holds
    each rank's RNG state (the rename once raced rank 1's write of its own state)."""
    one, two, _ = runs
    for run, ranks in ((one, 1), (two, 2)):
        entries = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert all(name.startswith("step_") for name in entries), entries
        for name in entries:
            states = sorted(p.name for p in (run / "checkpoints" / name).glob("random_states_*.pkl"))
            assert states == [f"random_states_{r}.pkl" for r in range(ranks)], (name, states)


def copy_run_at(run_dir, step, to):
    """A run directory as a run killed after checkpoint `step` would leave it."""
    shutil.copytree(run_dir, to)
    shutil.rmtree(to / "model")
    for checkpoint in (to / "checkpoints").iterdir():
        if int(checkpoint.name.removeprefix("step_")) > step:
            shutil.rmtree(checkpoint)
    return to


def test_distributed_checkpoint_resumes_across_world_sizes(runs, prepared, tmp_path, caplog):
    one, two, _ = runs
    init, data_dir, config_file, _ = prepared
    # written by 2 processes, resumed in 1
    resumed = copy_run_at(two, 4, tmp_path / "two_then_one")
    with caplog.at_level("INFO", logger="dsmoe.train"):
        train(run_config(), init, data_dir, resumed)
    assert "resuming from" in caplog.text and "step_4" in caplog.text
    assert_same_run(resumed, one)
    # written by 1 process, resumed in 2
    resumed = copy_run_at(one, 8, tmp_path / "one_then_two")
    log = launch(2, init, data_dir, resumed, config_file)
    assert "resuming from" in log and "step_8" in log
    assert_same_run(resumed, two)


def rank_processes(launcher):
    """The training processes (torchrun workers) under a launch, by rank."""
    ranks = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            environ = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "LOCAL_RANK" in environ and "dsmoe.cli" in " ".join(child.cmdline()):
            ranks[int(environ["LOCAL_RANK"])] = child
    return ranks


def test_distributed_sigkill_of_one_rank_leaves_a_resumable_checkpoint(runs, prepared, tmp_path):
    one, _, _ = runs
    init, data_dir, config_file, _ = prepared
    out = tmp_path / "killed"
    proc = launch(2, init, data_dir, out, config_file, wait=False)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "step_4").exists():
            assert proc.poll() is None, f"the run ended before step 4:\n{Path(f'{out}.log').read_text()[-3000:]}"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        os.kill(rank_processes(proc)[1].pid, signal.SIGKILL)
        rc = proc.wait(timeout=120)  # torchrun stops rank 0 and fails
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc != 0 and not (out / "model").exists(), "the run finished before rank 1 was killed"
    complete = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*"))
    assert complete and all((out / "checkpoints" / f"step_{s}" / "trainer_state.json").is_file() for s in complete)
    train(run_config(), init, data_dir, out)  # resumes from the newest complete checkpoint, in one process
    assert_same_run(out, one)


def test_distributed_data_stream_gives_disjoint_slices_across_world_sizes(prepared):
    """Each rank reads its own slice of the global batch; a resume on another world size goes on
    with the next global batch: no sequence is read twice or skipped."""
    _, data_dir, _, _ = prepared
    manifest, tc = data.read_manifest(data_dir), run_config()["train"]

    def stream(world, start, steps):
        ranks = [ProcessBatches(data_dir, manifest, tc, SimpleNamespace(num_processes=world, process_index=r), start)
                 for r in range(world)]
        batches = []
        for _ in range(steps):
            slices = [r.next_batch() for r in ranks]
            assert all(len(s) == BATCH // world for s in slices)
            batches.append(torch.cat(slices))
        return batches

    one = stream(1, 0, STEPS)
    for first, second in ((2, 1), (1, 2), (2, 4)):
        mixed = stream(first, 0, 5) + stream(second, 5, STEPS - 5)
        assert all(torch.equal(a, b) for a, b in zip(mixed, one, strict=True)), (first, second)
    # within a step the ranks' sequences are distinct sequences of the data (no slot served twice)
    sampler = data.MixtureSampler({n: len(s) for n, s in data.load_train(data_dir).items()},
                                  {n: e["weight"] for n, e in manifest["sources"].items()}, BATCH, tc["seed"])
    drawn = [sampler.next_batch() for _ in range(STEPS)]
    flat = [pair for batch in drawn for pair in batch]
    sizes = {n: len(s) for n, s in data.load_train(data_dir).items()}
    for name, size in sizes.items():
        picks = [i for n, i in flat if n == name]
        assert len(set(picks[:size])) == len(picks[:size]), f"{name}: a sequence repeats inside one epoch"


FSDP2_SCRIPT = ROOT / "tests" / "fsdp2_worker.py"


def test_distributed_fsdp2_fully_shard_matches_one_process(tmp_path):
    """torch's FSDP2 (`fully_shard`, gloo) on 2 CPU processes: each decoder layer sharded, AdamW steps;
    the losses and the gathered weights equal one unsharded process's."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(FSDP2_SCRIPT), str(tmp_path / "fsdp2.pt")]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sharded = torch.load(tmp_path / "fsdp2.pt")
    assert sharded["sharded"], "the gate weights were not DTensors: fully_shard did not shard them"
    sys.path.insert(0, str(FSDP2_SCRIPT.parent))
    try:
        from fsdp2_worker import train_steps
    finally:
        sys.path.pop(0)
    reference = train_steps(rank=0, world=1)
    torch.testing.assert_close(sharded["losses"], reference["losses"], **LOSS_TOL)
    for name, value in reference["state"].items():
        torch.testing.assert_close(sharded["state"][name], value, **WEIGHT_TOL, msg=name)


# FSDP2 through accelerate launch (the workflow's FSDP config) on CPU processes: tests/test_fsdp.py


def test_distributed_workflow_dry_run_launches_fsdp_on_four_gpus(tmp_path):
    result = snakemake("results/smoke/models/dsmoe/model", "--configfile", str(SMOKE), "-n", "-p",
                       "--set-resources", "pretrain:gpu=4", workdir=tmp_path)
    found = re.search(r"accelerate launch --config_file (\S+) --num_processes 4 --main_process_port 0 -m dsmoe.cli train ",
                      result.stdout)
    assert found, result.stdout[-3000:]
    config = yaml.safe_load((tmp_path / found[1]).read_text())  # the path works from the working directory
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2


@pytest.mark.slow
def test_distributed_workflow_pretrains_the_smoke_model_on_two_cpu_processes(smoke_run, tmp_path):
    """The smoke DAG's pretraining of one model again, through the workflow's launch line on 2 CPU
    processes (`--set-resources pretrain:cpu_processes=2`), on a copy of the smoke run."""
    workdir = tmp_path / "run"
    shutil.copytree(smoke_run, workdir, symlinks=True)
    run_dir = workdir / "results" / "smoke" / "models" / "dsmoe"
    shutil.rmtree(run_dir)
    result = snakemake("results/smoke/models/dsmoe/model", "--configfile", str(SMOKE), "--cores", "2",
                       "--set-resources", "pretrain:cpu_processes=2", workdir=workdir)
    jobs = result.stdout + result.stderr
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2" in jobs
    assert "rule pretrain:" in jobs and "rule convert:" not in jobs and "rule data:" not in jobs
    log = (workdir / "results" / "smoke" / "logs" / "pretrain" / "dsmoe.log").read_text()
    assert "training on 2 process(es), MULTI_CPU" in log, log[-3000:]
    assert (run_dir / "model" / "model.safetensors").is_file()
