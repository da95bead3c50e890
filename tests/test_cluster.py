"""The cluster path on one machine: multi-node rendezvous (two launchers, --num_machines 2, c10d on
127.0.0.1, gloo) trains like the same world size on one node; the paper configs' dry runs under
`--profile slurm` give every job that loads a model a GPU and one node (docs/cluster.md)."""

import csv
import re
import socket
import subprocess

import pytest
import torch
from conftest import ENV, ROOT, snakemake
from safetensors.torch import load_file
from test_preempt import setup  # noqa: F401  (the tiny model, its data and run config)

from dsmoe.launch import launch_prefix, node_launch

GPU_RULES = ("prune", "pretrain", "eval_ppl", "tau_sweep", "drop_sweep", "lm_eval", "eval_milestones")
CPU_MODEL_RULES = ("base_model", "data", "convert", "notebook_explorer")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir):
    with open(run_dir / "train_log.csv", newline="") as handle:
        return [float(row["lm_loss"]) for row in csv.DictReader(handle)]


def test_two_node_rendezvous_matches_one_node(setup, tmp_path):  # noqa: F811
    init, data_dir, config_file = setup
    args = f"train --config {config_file} --init {init} --data {data_dir}"
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(f"{launch_prefix(cpu_processes=2)} {args} --out {tmp_path / 'one'}", shell=True, cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    nodes = [subprocess.Popen(f"{node_launch(2, 2, rank, '127.0.0.1', port, cpu=True)} {args} --out {tmp_path / 'two'}",
                              shell=True, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "training on 2 process(es)" in outputs[0] + outputs[1]
    curve_one, curve_two = losses(tmp_path / "one"), losses(tmp_path / "two")
    print(f"\none node, 2 processes:   {[round(x, 4) for x in curve_one]}\ntwo nodes, 1 process each: "
          f"{[round(x, 4) for x in curve_two]}")
    assert curve_two == pytest.approx(curve_one, abs=1e-5)
    left, right = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("one", "two"))
    for name in left:
        torch.testing.assert_close(right[name], left[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("configfile", ["paper-llama-3.2-1b.yaml", "paper-llama-2-7b.yaml"])
def test_paper_dry_run_under_slurm_profile_gives_model_rules_gpu_and_nodes(configfile, tmp_path):
    result = snakemake("--profile", "slurm", "--configfile", str(ROOT / "config" / configfile), "-n", workdir=tmp_path)
    jobs = re.findall(r"^rule (\w+):\n(?:.*\n)*?\s+resources: (.*)$", result.stdout, re.MULTILINE)
    seen = {rule for rule, _ in jobs}
    assert set(GPU_RULES) <= seen, seen
    for rule, resources in jobs:
        fields = dict(item.split("=", 1) for item in resources.split(", "))
        if rule in GPU_RULES:
            assert fields.get("gpu") == "1" and fields.get("nodes") == "1", (rule, resources)
            assert int(fields["runtime"]) >= 120 and int(fields["mem_mb"]) >= 64000, (rule, resources)
        if rule in CPU_MODEL_RULES:
            assert fields.get("nodes") == "1", (rule, resources)
        if rule == "pretrain":
            assert fields["slurm_extra"] == "--signal=B:USR1@600" and fields["runtime"] == "1440"


def test_training_gpus_from_a_second_configfile_keep_other_rules_resources(tmp_path):
    extra = tmp_path / "gpus.yaml"
    extra.write_text("cluster: {train_gpus: 16, train_nodes: 2}\n")
    result = snakemake("--profile", "slurm", "--configfile", str(ROOT / "config" / "paper-llama-3.2-1b.yaml"), str(extra),
                       "-n", "-p", workdir=tmp_path)
    assert "nodes=2, gres=gpu:8, mpi=srun, tasks=2" in result.stdout
    assert "srun --nodes=2 --ntasks-per-node=1" in result.stdout and "--rdzv_backend c10d" in result.stdout
    assert re.search(r"rule eval_ppl:\n(?:.*\n)*?\s+resources: .*gpu=1, nodes=1", result.stdout)
