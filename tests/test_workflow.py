"""The Snakemake workflow: dry runs of every shipped config, lint, the smoke config end to end
(locally and through a real single-node SLURM), and resuming an interrupted pretraining job."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ENV, LOCAL_SMOKE_ARGS, ROOT, SMOKE, assert_complete, snakemake  # noqa: F401

CONFIGS = sorted((ROOT / "config").glob("*.yaml"))


def files_under(directory):
    return {path.relative_to(directory) for path in Path(directory).rglob("*") if not path.is_dir()}


def assert_parsing_wrote_no_file(workdir):
    """Nothing is written when the Snakefile is parsed: the run config is written when a run starts.

    Snakemake itself writes only under .snakemake/ (a dry run: its I/O cache; --lint: its log)."""
    written = files_under(workdir)
    assert all(path.parts[0] == ".snakemake" for path in written), sorted(written)
    assert not files_under(Path(workdir) / ".snakemake" / "metadata"), "a job was recorded"


@pytest.mark.parametrize("configfile", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_dry_run(configfile, tmp_path):
    extra, workdir = [], tmp_path / "run"
    if configfile.stem.startswith("paper-"):  # the paper's Story Cloze needs CSVs downloaded by hand (tests/test_storycloze.py)
        (tmp_path / "no_storycloze.yaml").write_text("eval: {skip_tasks: [storycloze_2016]}\n")
        extra = [str(tmp_path / "no_storycloze.yaml")]
    result = snakemake("--configfile", str(configfile), *extra, "-n", "--quiet", "rules", workdir=workdir)
    baselines = yaml.safe_load(configfile.read_text()).get("baselines", {})
    drops = (["drop_sweep"] if baselines.get("drop_thresholds") != [] else []) + \
        (["drop_topk"] if baselines.get("drop_keep_experts") else [])
    prune = ["prune"] if baselines.get("prune") != [] else []
    if prune or drops:  # a run with baselines has the training-free drop (one kind at least) beside them
        assert drops, f"{configfile.name} runs no drop baseline"
    else:  # a one-row run (a second seed, the paper's recipe): DSMoE alone
        assert yaml.safe_load(configfile.read_text())["variants"] == ["dsmoe"], configfile.name
    for rule in ("base_model", "data", "convert", "pretrain", "eval_ppl", "lm_eval", "tau_sweep",
                 "eval_milestones", *prune, *drops, "eval_all_on", "eval_massive", "collect", "notebook_tables",
                 "notebook_explorer"):
        assert rule in result.stdout, f"{configfile.name}: rule {rule} not planned"
    assert_parsing_wrote_no_file(workdir)


def test_dry_run_plans_the_routing_diagnostics(tmp_path):
    """Issue 28: all experts on for each trained sigmoid-gated model (not top-k), the base model's massive
    activations, every gate_margins.csv collected, the all-on rows into data/all_on.csv (never ppl.csv), and
    the heatmaps notebook's diagnostics table, massive table and gate-margin figure among the run's outputs."""
    result = snakemake("--configfile", str(SMOKE), "-n", "-p", workdir=tmp_path)
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.MULTILINE))
    assert jobs["eval_all_on"] == "3" and jobs["eval_massive"] == "1", result.stdout
    commands = re.findall(r"^Shell command: (.*)$", result.stdout, re.MULTILINE)
    all_on = sorted(c for c in commands if "--all-experts-on" in c)
    assert [re.search(r"--label (\w+)", c).group(1) for c in all_on] == ["dsmoe", "no_gx", "no_ste"]
    assert all("--out results/smoke/eval/all_on/" in c for c in all_on)
    massive = next(c for c in commands if "massive-activations" in c)
    assert "--model resources/smoke/base" in massive and "--n-experts 8" in massive
    collect = next(c for c in commands if "report collect" in c)
    files, on = collect.split(" --all-on ")
    assert sum("gate_margins.csv" in f for f in files.split()) == 8  # every evaluated model's
    assert "results/smoke/eval/massive/massive.csv" in files.split() and "all_on" not in files
    assert on.split()[:3] == [f"results/smoke/eval/all_on/{m}/ppl.csv" for m in ("dsmoe", "no_ste", "no_gx")]
    summary = snakemake("--configfile", str(SMOKE), "--summary", workdir=tmp_path).stdout
    for path in ("data/gate_margins.csv", "data/all_on.csv", "data/massive.csv", "tables/diagnostics.md",
                 "tables/massive.md", "figures/gate_margins.png"):
        assert f"results/smoke/{path}" in summary, path


def test_default_config_is_used_without_configfile(tmp_path):
    result = snakemake("-n", "--quiet", "rules", workdir=tmp_path, check=False)
    # from a fresh working directory, config/config.yaml is not there: Snakemake names it
    assert result.returncode != 0 and "config/config.yaml" in result.stderr + result.stdout


def test_lint(tmp_path):
    result = snakemake("--lint", "--configfile", str(SMOKE), workdir=tmp_path)
    assert "Congratulations" in result.stdout + result.stderr
    assert_parsing_wrote_no_file(tmp_path)


def test_dag_renders(tmp_path):
    dot = snakemake("--configfile", str(SMOKE), "--dag", workdir=tmp_path).stdout
    assert dot.lstrip().startswith("digraph") and "pretrain" in dot and "notebook_tables" in dot


BAD_CONFIGS = [
    ("train: {lr: fast}", ["lr", "number"]),
    ("dsmoe: {tau: 1.5}", ["tau", "1.5"]),
    ("variants: [dsmoe, moe]", ["variants", "moe"]),
    # rules across keys (dsmoe.config.check_cross_fields), issue 12 item 11
    ("dsmoe: {n_experts: 2, top_k: 3}", ["dsmoe.top_k", "exceeds dsmoe.n_experts=2"]),
    ("dsmoe: {n_experts: 3}", ["dsmoe.n_experts", "intermediate size 64"]),
    ("train: {batch_size: 6, micro_batch_size: 4}", ["train.batch_size", "micro_batch_size=4"]),
    ("data: {seq_len: 32, sources: [{name: stdlib-code, kind: builtin}, {name: stdlib-code, kind: builtin}]}",
     ["data.sources[1].name", "unique"]),
]


def bad_config(tmp_path, bad):
    config = tmp_path / "bad.yaml"
    config.write_text(SMOKE.read_text() + "\n" + bad + "\n")
    return config


@pytest.mark.parametrize("bad, words", [BAD_CONFIGS[0], BAD_CONFIGS[3]], ids=["schema", "cross_fields"])
def test_bad_config_stops_the_workflow_before_any_job(tmp_path, bad, words):
    result = snakemake("--configfile", str(bad_config(tmp_path, bad)), "-n", workdir=tmp_path, check=False)
    message = result.stdout + result.stderr
    assert result.returncode != 0
    assert all(word in message for word in words), message[-3000:]
    assert not (tmp_path / "resources").exists()


@pytest.mark.parametrize("bad, words", BAD_CONFIGS)
def test_bad_config_is_refused_by_the_workflows_checks(tmp_path, bad, words):
    """The checks common.smk runs when the Snakefile is parsed (the test above shows they stop it), in
    the same order on the same YAML, in this process: each bad config gets a message naming its key."""
    import yaml
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    from dsmoe.config import check_cross_fields, coerce_numbers

    config = yaml.safe_load(bad_config(tmp_path, bad).read_text())
    with pytest.raises((WorkflowError, ValueError)) as raised:
        coerce_numbers(config)
        validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
        check_cross_fields(config)
    message = str(raised.value) + "".join(str(a) for a in getattr(raised.value, "args", ()))
    assert all(word in message for word in words), message[-3000:]


def test_exponent_float_in_configfile(tmp_path):
    """`lr: 1e-4` (YAML 1.1: a string) in a --configfile is the number it looks like (issue 12 item 12)."""
    config = tmp_path / "lr.yaml"
    text = SMOKE.read_text()
    assert "lr: 1.0e-3" in text
    config.write_text(text.replace("lr: 1.0e-3", "lr: 1e-4"))
    snakemake("--configfile", str(config), "--cores", "1", "resources/smoke/base", workdir=tmp_path)  # one quick job
    import yaml

    written = yaml.safe_load((tmp_path / "results" / "smoke" / "config.yaml").read_text())
    assert written["train"]["lr"] == 1e-4


@pytest.mark.slow
def test_smoke_end_to_end_locally(smoke_run):
    assert_complete(smoke_run, SMOKE)
    # a second run finds nothing to do
    result = snakemake(*LOCAL_SMOKE_ARGS, "-n", workdir=smoke_run)
    assert "Nothing to be done" in result.stdout + result.stderr
    report = Path(smoke_run) / "report.html"
    snakemake("--configfile", str(SMOKE), "--report", str(report), workdir=smoke_run)
    assert report.stat().st_size > 100_000 and "heatmap_dsmoe.png" in report.read_text(errors="replace")


@pytest.mark.slow
def test_config_change_reruns_only_its_readers(smoke_run, tmp_path):
    """A new no-G τ grid reruns its sweep and what collects it, nothing else (dry run)."""
    config = tmp_path / "smoke.yaml"
    config.write_text(SMOKE.read_text().replace("no_gx_tau_sweep: [0.2, 0.5, 0.8]", "no_gx_tau_sweep: [0.2, 0.5, 0.9]"))
    assert config.read_text() != SMOKE.read_text()
    result = snakemake("--configfile", str(config), "-n", "--quiet", "rules", workdir=smoke_run)
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.MULTILINE))
    # two sweeps read the no-G grid: no_gx with and without Eq. 8's n/k at inference (Fig. 2 both ways)
    assert jobs == {"tau_sweep": "2", "collect": "1", "notebook_tables": "1", "notebook_heatmaps": "1",
                    "notebook_tau_curves": "1", "all": "1", "total": "7"}, result.stdout


@pytest.mark.slow
def test_a_variants_train_overrides_retrain_that_variant_alone(smoke_run, tmp_path):
    """train_overrides.no_ste reruns no-STE's training and what reads its model, no other training (dry run)."""
    config = tmp_path / "smoke.yaml"
    config.write_text(SMOKE.read_text() + "\ntrain_overrides: {no_ste: {sparsity_lambda: 0.25}}\n")
    result = snakemake("--configfile", str(config), "-n", workdir=smoke_run)
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.MULTILINE))
    assert jobs["pretrain"] == "1" and "convert" not in jobs and "prune" not in jobs, result.stdout
    assert re.findall(r"wildcards: trained=(\w+)", result.stdout) == ["no_ste"]


@pytest.mark.slow
def test_interrupted_pretraining_resumes(smoke_run, tmp_path):
    """Kill the whole run (SIGKILL) after pretraining wrote a checkpoint; --rerun-incomplete resumes
    from it and reruns no finished rule. Works on a copy of the smoke run."""
    workdir = tmp_path / "run"
    shutil.copytree(smoke_run, workdir, symlinks=True)
    results = workdir / "results" / "smoke"
    run_dir = results / "models" / "dsmoe"
    target = "results/smoke/models/dsmoe/model"
    upstream = [workdir / "resources" / "smoke" / "data" / "manifest.json", results / "init" / "dsmoe"]
    before = {path: path.stat().st_mtime for path in upstream}
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    cmd = [sys.executable, "-m", "snakemake", target, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           *LOCAL_SMOKE_ARGS]
    first_log = tmp_path / "interrupted.log"
    with open(first_log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list((run_dir / "checkpoints").glob("step_*")):
            assert proc.poll() is None, f"snakemake ended before the first checkpoint:\n{first_log.read_text()[-3000:]}"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "model").exists(), "training finished before it could be interrupted"

    snakemake("--unlock", "--configfile", str(SMOKE), workdir=workdir)
    result = snakemake(target, "--rerun-incomplete", *LOCAL_SMOKE_ARGS, workdir=workdir)
    log = (results / "logs" / "pretrain" / "dsmoe.log").read_text()
    assert "resuming from" in log, log[-2000:]
    assert (run_dir / "model").is_dir()
    jobs = result.stdout + result.stderr
    assert "rule pretrain:" in jobs and "rule convert:" not in jobs and "rule data:" not in jobs
    assert {path: path.stat().st_mtime for path in upstream} == before


# The smoke DAG through a real local SLURM with the real workflow profile (stand-in GPUs), and preemption
# through it: tests/test_cluster.py (one cluster for all SLURM tests).
