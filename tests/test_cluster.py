"""The cluster path on one machine: multi-node rendezvous (two launchers, --num_machines 2, c10d on
127.0.0.1, gloo) trains like the same world size on one node; the paper configs' dry runs under
`--profile slurm` give every job that loads a model a GPU and one node (docs/cluster.md)."""

import csv
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
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
    skip = tmp_path / "skip.yaml"  # storycloze_2016 needs CSV files downloaded by hand
    skip.write_text("eval: {skip_tasks: [storycloze_2016]}\n")
    result = snakemake("--profile", "slurm", "--configfile", str(ROOT / "config" / configfile), str(skip), "-n",
                       workdir=tmp_path)
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
            assert fields["slurm_extra"] == "--signal=USR1@600" and fields["runtime"] == "1440"


def test_training_gpus_from_a_second_configfile_keep_other_rules_resources(tmp_path):
    extra = tmp_path / "gpus.yaml"
    extra.write_text("cluster: {train_gpus: 16, train_nodes: 2}\neval: {skip_tasks: [storycloze_2016]}\n")
    result = snakemake("--profile", "slurm", "--configfile", str(ROOT / "config" / "paper-llama-3.2-1b.yaml"), str(extra),
                       "-n", "-p", workdir=tmp_path)
    assert "nodes=2, gres=gpu:8, mpi=srun, tasks=2" in result.stdout
    assert "srun --nodes=2 --ntasks-per-node=1" in result.stdout and "--rdzv_backend c10d" in result.stdout
    assert re.search(r"rule eval_ppl:\n(?:.*\n)*?\s+resources: .*gpu=1, nodes=1", result.stdout)
    skip = tmp_path / "skip.yaml"  # the GPUs on the command line instead (integers coerced from strings)
    skip.write_text("eval: {skip_tasks: [storycloze_2016]}\n")
    on_command_line = snakemake("--profile", "slurm", "--configfile", str(ROOT / "config" / "paper-llama-3.2-1b.yaml"),
                                str(skip), "-n", "--config", "cluster={train_gpus: 8}", workdir=tmp_path).stdout
    assert re.search(r"rule pretrain:\n(?:.*\n)*?\s+resources: .*nodes=1, gpu=8", on_command_line)


# ---------------------------------------------------------------- offline compute nodes: dsmoe fetch --check

HUB_MODEL = "fake-org/tiny-llama"
HUB_DATASET = "fake-org/tiny-text"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(hf_home, repo_id, files_from, repo_type="model"):
    """A repository in the Hugging Face cache layout (hub/<type>s--org--name/refs/main, snapshots/<sha>/),
    as `dsmoe fetch` (snapshot_download) leaves it; the Hub is never asked."""
    repo = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    shutil.copytree(files_from, repo / "snapshots" / REVISION)
    return repo


@pytest.fixture
def hub_cache(tmp_path, bpe_tokenizer):
    """`(env, config_file)`: HF_HOME with a tiny Hub model and a Hub dataset cached, offline; a run config
    reading both (the local lm-eval suite: no task dataset)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsmoe.hub import save_model

    hf_home = tmp_path / "hf"
    config = LlamaConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    save_model(LlamaForCausalLM(config), bpe_tokenizer, tmp_path / "model")
    cache_repo(hf_home, HUB_MODEL, tmp_path / "model")
    (tmp_path / "dataset" / "data").mkdir(parents=True)
    (tmp_path / "dataset" / "README.md").write_text("# tiny text\n")
    (tmp_path / "dataset" / "data" / "train.jsonl").write_text(
        "".join(f'{{"text": "document {i}: {"words " * (i + 3)}"}}\n' for i in range(40)))
    cache_repo(hf_home, HUB_DATASET, tmp_path / "dataset", "dataset")
    run = {"base_model": HUB_MODEL, "data": {"sources": [{"name": "web", "kind": "hf", "path": HUB_DATASET}]},
           "eval": {"bench_suite": "local"}}
    config_file = tmp_path / "hub.yaml"
    config_file.write_text(yaml.safe_dump(run))
    env = {**ENV, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return env, config_file


def dsmoe_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "dsmoe.cli", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_fetch_check_passes_on_a_filled_cache_and_names_what_an_emptied_one_lacks(hub_cache, tmp_path):
    env, config_file = hub_cache
    result = dsmoe_cli("fetch", "--check", "--config", config_file, env=env)
    assert result.returncode == 0 and "holds all 2 item(s)" in result.stdout, result.stderr[-2000:]
    base = dsmoe_cli("base", "--config", config_file, "--out", tmp_path / "base", env=env)  # loads offline, from the cache
    assert base.returncode == 0 and (tmp_path / "base" / "model.safetensors").is_file(), base.stderr[-2000:]

    hf_home = Path(env["HF_HOME"]) / "hub"
    snapshot = hf_home / f"models--{HUB_MODEL.replace('/', '--')}" / "snapshots" / REVISION
    (snapshot / "model.safetensors").unlink()  # a download cut short
    shutil.rmtree(hf_home / f"datasets--{HUB_DATASET.replace('/', '--')}")
    result = dsmoe_cli("fetch", "--check", "--config", config_file, env=env)
    assert result.returncode == 2  # the CLI's status for an expected error, printed in one line
    assert f"model '{HUB_MODEL}': lacks model.safetensors" in result.stderr, result.stderr
    assert f"data '{HUB_DATASET}': not in the cache" in result.stderr
    assert f"dsmoe fetch --config {config_file}" in result.stderr


def test_an_hf_source_streams_from_the_fetched_snapshot_offline(hub_cache, monkeypatch):
    from huggingface_hub import constants

    from dsmoe.data.sources import source_documents

    env, _ = hub_cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(env["HF_HOME"]) / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    documents, _ = source_documents({"name": "web", "kind": "hf", "path": HUB_DATASET, "shuffle_buffer": 100})
    texts = list(documents)
    assert len(texts) == 40 and all(text.startswith("document ") for text in texts)


# ---------------------------------------------------------------- a real local SLURM with stand-in GPUs


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """One single-node SLURM for this module's tests (tests/slurm_cluster.py): 8 stand-in GPUs, 16 CPUs, 256 GB."""
    sys.path.insert(0, str(Path(__file__).parent))
    from slurm_cluster import SlurmUnavailable, start_cluster

    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as err:
        pytest.skip(f"no local SLURM: {err}")
    yield cluster
    cluster.stop()


def through_slurm(cluster, workdir, *args, env=None, **kwargs):
    """`snakemake --profile slurm` with the real workflow profile (profiles/default), logging each sbatch call."""
    env = {**cluster.env, "PATH": ENV["PATH"], **(env or {})}
    return snakemake("--cores", "all", "--profile", "slurm", "--verbose", "--slurm-init-seconds-before-status-checks", "2",
                     "--seconds-between-status-checks", "2", "--slurm-keep-successful-logs", *args,
                     workdir=workdir, env=env, **kwargs)


def sbatch_calls(result):
    """{rule: [sbatch call, ...]} from the plugin's debug log."""
    calls = {}
    for call in re.findall(r"sbatch call: (sbatch .*)", result.stdout + result.stderr):
        rule = re.search(r"--comment '?rule_(\w+?)(?:_wildcards|'|\s)", call).group(1)
        calls.setdefault(rule, []).append(call)
    return calls


# One output of each rule that loads a model, DSMoE's where there is a choice: 10 jobs (the smoke DAG has 42).
SLURM_TARGETS = [f"results/smoke/{path}" for path in (
    "eval/ppl/dsmoe/ppl.csv", "eval/bench/dsmoe/bench.csv", "eval/sweep/dsmoe/sweep.csv", "eval/drop/drop.csv",
    "eval/milestones/dsmoe/milestones.csv", "init/prune_sparsegpt")]


@pytest.mark.slow
@pytest.mark.slurm
def test_smoke_dag_through_slurm_with_the_real_profile(slurm, tmp_path):
    """A job of every model-loading rule of the smoke DAG is submitted with the workflow profile's own requests
    (GPUs, one node, runtime, memory: nothing scaled down), accepted by a node that advertises them, and run on
    the CPU, offline."""
    fixed_prune = tmp_path / "fixed_prune.yaml"  # prune need not wait for DSMoE's measured activation: one level less
    fixed_prune.write_text("baselines: {prune_fraction: 0.5}\n")
    result = through_slurm(slurm, tmp_path, *SLURM_TARGETS, "--configfile", str(ROOT / "config" / "smoke.yaml"),
                           str(fixed_prune), timeout=1200)
    calls = sbatch_calls(result)
    print("\n".join(f"{rule}: {lines[0]}" for rule, lines in sorted(calls.items())))
    assert set(GPU_RULES) | {"base_model", "data", "convert"} <= set(calls), sorted(calls)
    for rule, lines in calls.items():
        for call in lines:
            assert re.search(r" -t \d+", call), call
            if rule in GPU_RULES:
                assert "--gpus=1" in call and "--nodes=1" in call, call
            if rule in CPU_MODEL_RULES:
                assert "--nodes=1" in call and "--gpus" not in call, call
    assert " -t 1440" in calls["pretrain"][0] and "--mem 128" in calls["pretrain"][0]
    assert "--signal=USR1@600" in calls["pretrain"][0]
    for target in SLURM_TARGETS:  # the whole DAG runs locally: tests/test_workflow.py
        path = tmp_path / target
        assert path.exists() and (any(path.iterdir()) if path.is_dir() else path.stat().st_size > 0), target
    for job_log in (tmp_path / ".snakemake" / "slurm_logs").rglob("*.log"):  # each job ran its own rule, nothing upstream
        rule = job_log.relative_to(tmp_path / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_")
        assert set(re.findall(r"^(?:local)?rule (\w+):", job_log.read_text(), re.M)) == {rule}, job_log
    base_log = next((tmp_path / ".snakemake" / "slurm_logs" / "rule_base_model").rglob("*.log")).read_text()
    assert "holds all 0 item(s)" in base_log  # the offline check ran in the job (HF_HUB_OFFLINE=1)


def pretrain_job_id(cluster):
    """The running pretrain job's id (the plugin's --comment names the rule)."""
    out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i %k"], env=cluster.env, capture_output=True, text=True).stdout
    return next((line.split()[0] for line in out.splitlines() if "rule_pretrain" in line), None)


@pytest.mark.slow
@pytest.mark.slurm
def test_preemption_through_slurm_resubmits_and_resumes_to_the_uninterrupted_model(slurm, tmp_path):
    """`scancel --signal=USR1 JOB` mid-run (the path of the profile's --signal=USR1@600): the trainer, whose parents
    in the job ignore USR1, checkpoints and exits 75; Snakemake resubmits; attempt 2 resumes and ends with the
    model an uninterrupted run gives."""
    import time

    from test_preempt import assert_same_model, read_log

    longer = tmp_path / "longer.yaml"  # 120 steps (about 10 steps/s here): time to signal mid-run
    longer.write_text("train: {tokens: 15360, checkpoint_every: 10}\neval: {milestone_tokens: []}\n")
    configs = [str(ROOT / "config" / "smoke.yaml"), str(longer)]
    # The pretrain job's inputs are made locally: only the job under test goes through SLURM.
    snakemake("resources/smoke/data", "results/smoke/init/dsmoe", "--cores", "2", "--configfile", *configs,
              workdir=tmp_path)
    run_dir, target = tmp_path / "results" / "smoke" / "models" / "dsmoe", "results/smoke/models/dsmoe/model"
    env = {**slurm.env, "PATH": ENV["PATH"]}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
               "--cores", "all", "--profile", "slurm", "--slurm-init-seconds-before-status-checks", "2",
               "--seconds-between-status-checks", "2", target,  # before the options that take every word after them
               "--set-threads", "pretrain=1",  # one thread, as the run outside SLURM below
               "--configfile", *configs]
    head = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, job = time.time() + 600, None
    while job is None or not ((run_dir / "train_log.csv").is_file() and len(read_log(run_dir)) >= 5):
        assert head.poll() is None and time.time() < deadline, head.stdout.read()[-4000:] if head.poll() is not None else "slow"
        job = job or pretrain_job_id(slurm)
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    output = head.communicate(timeout=600)[0]
    assert head.returncode == 0, output[-4000:]
    assert "rule pretrain:" in output and "rule data:" not in output and "rule convert:" not in output, output[-4000:]
    stop = json.loads((run_dir / "resubmit.json").read_text())  # attempt 1's own record: Snakemake clears the log
    assert stop["reason"] == "SIGUSR1" and stop["attempt"] == 1 and 0 < stop["step"] < 120, stop
    log = (tmp_path / "results" / "smoke" / "logs" / "pretrain" / "dsmoe.log").read_text()
    assert f"resuming from results/smoke/models/dsmoe/checkpoints/step_{stop['step']}" in log, log[-3000:]

    whole = tmp_path / "whole"  # the same training, uninterrupted, outside SLURM
    subprocess.run([sys.executable, "-m", "dsmoe.cli", "train", "--config", str(tmp_path / "results/smoke/config.yaml"),
                    "--init", str(tmp_path / "results/smoke/init/dsmoe"), "--data", str(tmp_path / "resources/smoke/data"),
                    "--variant", "dsmoe", "--out", str(whole)], cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, check=True,
                   capture_output=True)  # one thread as in the job: fp32 sums in another order on two
    assert_same_model(whole, run_dir)
    before, after = read_log(whole), read_log(run_dir)
    assert after[-1]["lm_loss"] == pytest.approx(before[-1]["lm_loss"], abs=1e-6)
    print(f"\nscancel --signal=USR1 through SLURM: final lm_loss uninterrupted {before[-1]['lm_loss']:.6f}, "
          f"preempted+resubmitted+resumed {after[-1]['lm_loss']:.6f}")


def test_only_a_stale_test_cluster_link_is_removed(tmp_path, monkeypatch):
    """A test killed before its cluster's stop() leaves /etc/slurm/slurm.conf linked to its config: the next
    start removes that link (its slurmctld has ended), never a real file or another cluster's config."""
    sys.path.insert(0, str(Path(__file__).parent))
    import slurm_cluster

    link = tmp_path / "etc" / "slurm.conf"
    link.parent.mkdir()
    monkeypatch.setattr(slurm_cluster, "DEFAULT_CONF", link)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for folder, name in ((ours, "dsmoe-test"), (theirs, "production")):
        folder.mkdir()
        (folder / "slurm.conf").write_text(f"ClusterName={name}\n")
    (ours / "slurmctld.pid").write_text("999999999\n")  # ended
    link.symlink_to(ours / "slurm.conf")
    slurm_cluster.remove_stale_link()
    assert not link.is_symlink()
    link.symlink_to(theirs / "slurm.conf")
    slurm_cluster.remove_stale_link()
    assert link.is_symlink()
    link.unlink()
    link.write_text("ClusterName=dsmoe-test\n")  # a real file is never touched
    slurm_cluster.remove_stale_link()
    assert link.is_file()
