"""The Snakemake workflow: dry runs of every shipped config, lint, the smoke config end to end
(locally and through a real single-node SLURM), and resuming an interrupted pretraining job."""

import atexit
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SMOKE = ROOT / "config" / "smoke.yaml"
# One thread per job, so that --cores 2 runs two of the smoke run's tiny jobs at once.
LOCAL_SMOKE_ARGS = ["--configfile", str(SMOKE), "--cores", "2", "--set-threads", "pretrain=1"]


def snakemake(*args, workdir=None, env=None, timeout=600, check=True):
    """Run snakemake from the repository root (where `--profile slurm` and profiles/ are found)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
    if workdir is not None:
        cmd += ["--directory", str(workdir)]
    result = subprocess.run(cmd + list(args), cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd + list(args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def planned_outputs(workdir, configfile):
    """Every output file of the run's DAG, from `snakemake --summary`."""
    summary = snakemake("--configfile", str(configfile), "--summary", workdir=workdir).stdout
    rows = [line.split("\t") for line in summary.splitlines() if "\t" in line]
    return [Path(workdir) / row[0] for row in rows[1:]]


def assert_complete(workdir, configfile, run_name="smoke"):
    outputs = planned_outputs(workdir, configfile)
    assert len(outputs) > 40, outputs
    for path in outputs:
        assert path.exists(), f"{path} is missing"
        if path.is_dir():
            assert any(path.iterdir()), f"{path} is empty"
        else:
            assert path.stat().st_size > 0, f"{path} is empty"
    results = Path(workdir) / "results" / run_name
    for name in ("table1", "table2", "table3", "table4", "claims"):
        assert (results / "tables" / f"{name}.md").stat().st_size > 0
    for name in ("heatmap_dsmoe", "layer_profile", "tau_curves", "no_gx_curve", "explorer"):
        assert (results / "figures" / f"{name}.png").stat().st_size > 0
        assert (results / "figures" / f"{name}.pdf").stat().st_size > 0


@functools.lru_cache(maxsize=None)
def smoke_workdir():
    """The smoke config run once per test session, locally; shared with tests/test_notebooks.py.

    DSMOE_SMOKE_WORKDIR=DIR reuses (and brings up to date) the smoke run of an earlier session."""
    if os.environ.get("DSMOE_SMOKE_WORKDIR"):
        workdir = Path(os.environ["DSMOE_SMOKE_WORKDIR"])
    else:
        workdir = Path(tempfile.mkdtemp(prefix="dsmoe-smoke-"))
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    snakemake(*LOCAL_SMOKE_ARGS, workdir=workdir, timeout=1800)
    return workdir


@pytest.fixture(scope="session")
def smoke_run():
    return smoke_workdir()


@pytest.mark.parametrize("configfile", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_dry_run(configfile, tmp_path):
    result = snakemake("--configfile", str(configfile), "-n", "--quiet", "rules", workdir=tmp_path)
    for rule in ("run_config", "base_model", "data", "convert", "pretrain", "eval_ppl", "lm_eval", "tau_sweep",
                 "prune", "drop_sweep", "collect", "notebook_tables", "notebook_explorer"):
        assert rule in result.stdout, f"{configfile.name}: rule {rule} not planned"


def files_under(directory):
    return {path.relative_to(directory) for path in Path(directory).rglob("*") if not path.is_dir()}


@pytest.mark.parametrize("args", [["-n"], ["--lint"]], ids=["dry_run", "lint"])
def test_parsing_writes_no_file(args, tmp_path):
    """Nothing is written when the Snakefile is parsed: the run config is a rule's output.

    Snakemake itself writes only under .snakemake/ (a dry run: its I/O cache; --lint: its log)."""
    snakemake("--configfile", str(SMOKE), *args, workdir=tmp_path)
    written = files_under(tmp_path)
    assert all(path.parts[0] == ".snakemake" for path in written), sorted(written)
    assert not files_under(tmp_path / ".snakemake" / "metadata"), "a job was recorded"


def test_default_config_is_used_without_configfile(tmp_path):
    result = snakemake("-n", "--quiet", "rules", workdir=tmp_path, check=False)
    # from a fresh working directory, config/config.yaml is not there: Snakemake names it
    assert result.returncode != 0 and "config/config.yaml" in result.stderr + result.stdout


def test_lint():
    result = snakemake("--lint", "--configfile", str(SMOKE))
    assert "Congratulations" in result.stdout + result.stderr


def test_dag_renders(tmp_path):
    dot = snakemake("--configfile", str(SMOKE), "--dag", workdir=tmp_path).stdout
    assert dot.lstrip().startswith("digraph") and "pretrain" in dot and "notebook_tables" in dot


@pytest.mark.parametrize("bad, words", [
    ("train: {lr: fast}", ["lr", "number"]),
    ("dsmoe: {tau: 1.5}", ["tau", "1.5"]),
    ("variants: [dsmoe, moe]", ["variants", "moe"]),
    # rules across keys (dsmoe.config.check_cross_fields), issue 12 item 11
    ("dsmoe: {n_experts: 2, top_k: 3}", ["dsmoe.top_k", "exceeds dsmoe.n_experts=2"]),
    ("dsmoe: {n_experts: 3}", ["dsmoe.n_experts", "intermediate size 64"]),
    ("train: {batch_size: 6, micro_batch_size: 4}", ["train.batch_size", "micro_batch_size=4"]),
    ("data: {seq_len: 32, sources: [{name: stdlib-code, kind: builtin}, {name: stdlib-code, kind: builtin}]}",
     ["data.sources[1].name", "unique"]),
])
def test_bad_config_stops_before_any_job(tmp_path, bad, words):
    config = tmp_path / "bad.yaml"
    config.write_text(SMOKE.read_text() + "\n" + bad + "\n")
    result = snakemake("--configfile", str(config), "-n", workdir=tmp_path, check=False)
    message = result.stdout + result.stderr
    assert result.returncode != 0
    assert all(word in message for word in words), message[-3000:]
    assert not (tmp_path / "resources").exists()


def test_exponent_float_in_configfile(tmp_path):
    """`lr: 1e-4` (YAML 1.1: a string) in a --configfile is the number it looks like (issue 12 item 12)."""
    config = tmp_path / "lr.yaml"
    text = SMOKE.read_text()
    assert "lr: 1.0e-3" in text
    config.write_text(text.replace("lr: 1.0e-3", "lr: 1e-4"))
    snakemake("--configfile", str(config), "--cores", "1", "results/smoke/config.yaml", workdir=tmp_path)
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


@pytest.mark.slow
@pytest.mark.slurm
def test_smoke_end_to_end_through_slurm(tmp_path):
    """`--profile slurm` against a real single-node SLURM started here (slurmctld, slurmd, munged).

    The workflow profile's per-rule requests are sized for GPU nodes; this node has no GPU and a
    few GB, so the test replaces them (--workflow-profile none) with small defaults."""
    sys.path.insert(0, str(Path(__file__).parent))
    from slurm_cluster import SlurmUnavailable, start_cluster

    try:
        cluster = start_cluster(tmp_path / "slurm")
    except SlurmUnavailable as err:
        pytest.skip(f"no local SLURM: {err}")
    workdir = tmp_path / "run"
    env = {**cluster.env, "PATH": ENV["PATH"]}
    try:
        snakemake("--cores", "all", "--profile", "slurm", "--configfile", str(SMOKE), "--workflow-profile", "none",
                  "--default-resources", "mem_mb=1000", "runtime=30", "cpus_per_task=1",
                  "--slurm-init-seconds-before-status-checks", "5", "--slurm-logdir", str(tmp_path / "slurm-logs"),
                  workdir=workdir, env=env, timeout=2400)
        assert_complete(workdir, SMOKE)
    finally:
        cluster.stop()
