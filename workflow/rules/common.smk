"""Helpers shared by the rules: the validated config, the run's paths, the models it builds."""

import os
import signal
from pathlib import Path

import yaml
from snakemake.utils import min_version, validate

from dsmoe.config import check_cross_fields, coerce_numbers, variant_train
from dsmoe.launch import FSDP_CONFIG, launch_prefix
from dsmoe.names import (DENSE, DENSE_CONTINUED, DIAGNOSTIC_TABLES, DROP, FIXED_ROUTING, PRUNE_KINDS, RUN_DATA,
                         SIGMOID_VARIANTS, SWEEPS, TABLES, TOPK_VARIANTS, prune_method)

min_version("9.0")


# config/config.yaml unless --configfile names another run config (never a merge of the two).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"



# Fills every default from the schema (dsmoe/schemas/config.schema.yaml, the single source of
# defaults) and stops before any job runs (a dry run too) when the config does not match it, or
# when keys contradict each other (dsmoe.config.check_cross_fields, as in the `dsmoe` commands).
# Snakemake reads --configfile as YAML 1.1, where `lr: 1e-4` is a string; numbers are coerced first.
coerce_numbers(config)
validate(config, "../schemas/config.schema.yaml")
check_cross_fields(config)

# Cluster jobs read nothing from the Hub: `dsmoe fetch --config C`, run on the login node, filled the Hugging
# Face cache (dsmoe/fetch.py, docs/cluster.md). The job's own shell decides (SLURM_JOB_ID is set in a SLURM
# job): the rules' commands must read the same in the head snakemake and in the job's, or the job's snakemake
# sees changed code upstream and runs those rules again.
IN_SLURM_JOB = '[ -n "${{SLURM_JOB_ID:-}}" ]'  # braces doubled: snakemake formats shell commands and prefixes
if config["cluster"]["offline"]:

    shell.prefix(f"set -euo pipefail; if {IN_SLURM_JOB}; then export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1; fi; ")


# In a cluster job, every snakemake process (the batch script's and the job step's, both parse this file)
# ignores SIGUSR1, and so does the rule's shell (inherited): the profile's `--signal=USR1@SECONDS` and
# `scancel --signal=USR1 JOB` reach the trainer, which installs its own handler, checkpoints and exits 75
# (resubmit), instead of killing its parents first (docs/cluster.md: what SLURM sends where).
if workflow.remote_exec:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def offline_check(*kinds):
    """In a SLURM job of an offline run: `dsmoe fetch --check` of these kinds first, failing (on the job's
    stderr, its SLURM log) before anything loads and naming what the cache lacks. Elsewhere: nothing."""
    if not config["cluster"]["offline"]:
        return ""
    return f"if {IN_SLURM_JOB}; then dsmoe fetch --check --config {{params.config}} --only {' '.join(kinds)} >&2; fi; "


RUN = config["run_name"]
RESOURCES = f"resources/{RUN}"
RESULTS = f"results/{RUN}"
LOGS = f"{RESULTS}/logs"
ENV = "../../environment.yml"
BASEDIR = Path(os.path.relpath(workflow.basedir))  # the repository, relative to the working directory
NOTEBOOKS = BASEDIR / "notebooks"
PAPER_RESULTS = BASEDIR / "dsmoe" / "report" / "paper_results.yaml"

CONVERTED = list(config["variants"])  # dsmoe, no_ste, no_gx, topk: converted, then trained
PRUNED = [prune_method(kind) for kind in config["baselines"]["prune"]]  # pruned, then trained dense
TRAINED = CONVERTED + ([DENSE_CONTINUED] if config["dense_continued"] else []) + PRUNED
EVALUATED = [DENSE] + TRAINED  # DENSE is the base model as it comes
SWEPT = [name for name, (variant, _, _) in SWEEPS.items() if variant in CONVERTED]  # dsmoe, no_gx (both ways of Fig. 2)
DYNAMIC = [variant for variant in CONVERTED if variant not in FIXED_ROUTING]  # routing that can differ by token
SIGMOID = [variant for variant in CONVERTED if variant in SIGMOID_VARIANTS]  # σ(h·Y) ≥ τ: gate margins, all-experts-on
RUN_CONFIG = f"{RESULTS}/config.yaml"  # written when a run starts, read by the `dsmoe` commands


def one_of(names):
    """A wildcard constraint matching any of these names ("none", no name, when there are none)."""
    return "|".join(names) or "none"


wildcard_constraints:
    variant=one_of(CONVERTED),
    trained=one_of(TRAINED),
    model=one_of(EVALUATED),
    kind=one_of(PRUNE_KINDS),
    gated=one_of(SIGMOID),


def write_run_config():
    """The validated config with all defaults, as the `dsmoe` commands read it.

    Written when a run starts (onstart, in the Snakefile; not when the Snakefile is parsed, nor
    for -n or --lint), and only when its content changes. It is no rule's input: each rule lists
    the config sections it reads as params, so that a change reruns only the rules that read it.
    Written by a rule, it would rerun on every change and, even as an ancient() input, hide the
    params changes of all the jobs downstream (snakemake/snakemake#4166).
    """
    path = Path(RUN_CONFIG)
    text = yaml.safe_dump(config, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".config.yaml.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)


def model_dir(label):
    """The checkpoint directory that a model label evaluates."""
    if label == DENSE:
        return f"{RESOURCES}/base"
    return f"{RESULTS}/models/{label}/model"


def eval_model_dir(wildcards):
    return model_dir(wildcards.model)


def calibrated_gates(variant):
    return config["dsmoe"]["gate_init"] == "calibrated" and variant not in TOPK_VARIANTS


def partition(variant):
    """Expert split of a variant: LLaMA-MoE's own for the top-k variants, contiguous (Eq. 6) for DSMoE."""
    return config["dsmoe"]["topk_partition"] if variant in TOPK_VARIANTS else "contiguous"


def convert_inputs(wildcards):
    """The base model, plus the tokenised data when the gates are calibrated (beyond the paper) or
    the experts are split by co-activation."""
    inputs = {"model": f"{RESOURCES}/base"}
    if calibrated_gates(wildcards.variant) or partition(wildcards.variant) == "coactivation":
        inputs["data"] = f"{RESOURCES}/data"
    return inputs


def gate_init_flags(wildcards, input):
    flags = f"--partition {partition(wildcards.variant)}"
    if "data" not in input.keys():
        return flags
    settings = config["dsmoe"]
    flags += f" --calibration-data {input.data} --calibration-sequences {settings['calibration_sequences']}"
    if calibrated_gates(wildcards.variant):
        flags += f" --gate-init calibrated --calibration-target {settings['calibration_target']}"
        flags += f" --calibration-spread {settings['calibration_spread']}"
    return flags


def train_init(wildcards):
    """What continued pretraining starts from: the converted or pruned model, else the dense base model."""
    if wildcards.trained == DENSE_CONTINUED:
        return f"{RESOURCES}/base"
    return f"{RESULTS}/init/{wildcards.trained}"


def train_variant(wildcards):
    """The trainer's --variant: the DSMoE forward of a converted model, else plain dense training."""
    return wildcards.trained if wildcards.trained in CONVERTED else "dense"


def train_launcher(wildcards, resources):
    """`dsmoe`, `accelerate launch` over the job's GPUs (FSDP) or its `cpu_processes` (DDP), or one launcher
    per node through srun (config cluster.train_nodes > 1): dsmoe/launch.py."""
    nodes = int(config["cluster"]["train_nodes"])
    gpus = int(config["cluster"]["train_gpus"]) if nodes > 1 else resources.get("gpu", 0)
    return launch_prefix(gpus, resources.get("cpu_processes", 1), BASEDIR / FSDP_CONFIG, nodes)


def train_resources():
    """Rule pretrain's sbatch requests, from config `cluster` (docs/cluster.md).

    One node: `--gpus=N --nodes=1`. Several: `--gres=gpu:N/M` per node, one task per node, and the
    job marked `mpi` so that the SLURM executor runs the rule's own srun (one launcher per node)
    instead of wrapping it in `srun -n1`. Checked when the Snakefile is parsed (a dry run too)."""
    cluster = config["cluster"]
    gpus, nodes = int(cluster["train_gpus"]), int(cluster["train_nodes"])
    launch_prefix(gpus, 1, FSDP_CONFIG, nodes)  # raises when the GPUs do not split evenly over the nodes
    common = {"nodes": nodes, "mem_mb": int(cluster["train_mem_mb"]), "runtime": int(cluster["train_runtime"])}
    if nodes == 1:
        return {**common, "gpu": gpus} if gpus else common
    return {**common, "gres": f"gpu:{gpus // nodes}", "mpi": "srun", "tasks": nodes, "tasks_per_gpu": 0}


TRAIN_RESOURCES = train_resources()


def sweep_model(wildcards):
    return f"{RESULTS}/models/{SWEEPS[wildcards.sweep][0]}/model"


def sweep_taus(wildcards):
    return " ".join(str(tau) for tau in config["eval"][SWEEPS[wildcards.sweep][1]])


def sweep_rescale_flag(wildcards):
    """Fig. 2 both ways: the no_gx sweeps with and without Eq. 8's n/k at inference."""
    rescale = SWEEPS[wildcards.sweep][2]
    return "" if rescale is None else f"--no-gx-inference-rescale {str(rescale).lower()}"


def milestone_flag(wildcards):
    """Only the DSMoE run keeps models at token milestones (Tables 5-6)."""
    return "--milestones" if wildcards.trained == "dsmoe" and config["eval"]["milestone_tokens"] else ""


def milestone_outputs(filename="milestones.csv"):
    return [f"{RESULTS}/eval/milestones/dsmoe/{filename}"] if "dsmoe" in CONVERTED else []


def max_sequences_flag():
    cap = config["eval"]["ppl_max_sequences"]
    return "" if cap is None else f"--max-sequences {cap}"


def bench_limit_flag():
    limit = config["eval"]["bench_limit"]
    return "" if limit is None else f"--limit {limit}"


def prune_inputs(wildcards):
    """The base model and data, plus (prune_fraction null) the trained DSMoE model's ppl.csv."""
    inputs = {"model": f"{RESOURCES}/base", "data": f"{RESOURCES}/data"}
    if config["baselines"]["prune_fraction"] is None:
        inputs["match"] = f"{RESULTS}/eval/ppl/dsmoe/ppl.csv"
    return inputs


def prune_size_flag(wildcards, input):
    """A fixed pruning fraction, or the activated-params percent read from input.match; and the
    layers LLM-Pruner-block prunes where the config sets them."""
    flags = f"--match-ppl-csv {input.match}" if "match" in input.keys() else f"--fraction {config['baselines']['prune_fraction']}"
    block_layers = config["baselines"]["block_layers"]
    if wildcards.kind == "llm_pruner_block" and block_layers is not None:
        flags += " --block-layers {} {}".format(*block_layers)
    return flags


def drop_outputs(filename="drop.csv"):
    """The drop baseline's CSVs (drop.csv, or drop_windows.csv): the threshold sweep (unless
    baselines.drop_thresholds is empty) and the per-token top-k drop (where baselines.drop_keep_experts
    lists K values); collect joins them."""
    baselines = config["baselines"]
    return ([f"{RESULTS}/eval/drop/{filename}"] if baselines["drop_thresholds"] else []) + (
        [f"{RESULTS}/eval/drop/topk/{filename}"] if baselines["drop_keep_experts"] else [])


def eval_outputs(kind, filename):
    return expand(f"{RESULTS}/eval/{kind}/{{model}}/{filename}", model=EVALUATED)


ALL_ON_OUTPUTS = expand(f"{RESULTS}/eval/all_on/{{gated}}/ppl.csv", gated=SIGMOID)  # collect's --all-on
MASSIVE_OUTPUTS = [f"{RESULTS}/eval/massive/massive.csv"] if SIGMOID else []  # the base model, Eq. 6's experts


def collect_files(wildcards, input):
    """Rule collect's files collected by name (ppl.csv, ...): all its inputs but the all-experts-on ppl.csv."""
    return [path for path in input if path not in ALL_ON_OUTPUTS]


def heatmap_names():
    """Fig. 3: per model, layers x validation sources; per dynamic model, layers x benchmark tasks."""
    return [f"heatmap_{model}" for model in CONVERTED] + [f"heatmap_tasks_{model}" for model in DYNAMIC]


def figure_names():
    names = ["layer_profile", "explorer"] if "dsmoe" in CONVERTED else ["layer_profile"]
    names += heatmap_names() + ["token_curve"]
    names += ["tau_curves"] if "dsmoe" in SWEPT else []
    names += ["no_gx_curve"] if "no_gx" in SWEPT else []
    return names + diagnostic_figure_names()


def diagnostic_figure_names():
    """The gate-margin histograms of the DSMoE model (heatmaps notebook)."""
    return ["gate_margins"] if "dsmoe" in SIGMOID else []


def diagnostic_table_files():
    """Routing diagnostics (heatmaps notebook): ppl at τ and all-experts-on, share near τ; massive activations."""
    return [f"{RESULTS}/tables/{name}.{ext}" for name in DIAGNOSTIC_TABLES for ext in ("csv", "md")] if SIGMOID else []


def figure_files(names):
    return [f"{RESULTS}/figures/{name}.{ext}" for name in names for ext in ("png", "pdf")]


def table_files():
    return [f"{RESULTS}/tables/{name}.{ext}" for name in TABLES for ext in ("csv", "md")]


def all_outputs():
    return (
        table_files()
        + diagnostic_table_files()
        + figure_files(figure_names())
        + expand(f"{RESULTS}/data/{{name}}.csv", name=RUN_DATA)
    )


report: "../report/workflow.rst"


def bench_task_names():
    """The lm-eval tasks of the lm_eval jobs: eval.bench_tasks or the suite's, less eval.skip_tasks."""
    from dsmoe.evaluation.harness import SUITES

    names = config["eval"]["bench_tasks"] or list(SUITES[config["eval"]["bench_suite"]])
    return [name for name in names if name not in config["eval"]["skip_tasks"]]


def bench_task_flags():
    """--tasks when the tasks are not the suite's; --storycloze-dir from eval.storycloze_dir."""
    from dsmoe.evaluation.harness import STORYCLOZE_ENV, STORYCLOZE_TASK, storycloze_files

    names, flags = bench_task_names(), []
    if config["eval"]["bench_tasks"] or config["eval"]["skip_tasks"]:
        flags.append("--tasks " + " ".join(names))
    storycloze_dir = config["eval"]["storycloze_dir"] or os.environ.get(STORYCLOZE_ENV)
    if STORYCLOZE_TASK in names:
        if not storycloze_dir:  # before any job: not an hour into the evaluation
            raise ValueError(f"the lm-eval tasks include {STORYCLOZE_TASK}, which needs the official Story Cloze 2016 "
                             "CSV files (downloaded by hand): set eval.storycloze_dir to their directory, or leave the "
                             f"task out with eval.skip_tasks: [{STORYCLOZE_TASK}]")
        storycloze_files(storycloze_dir)
        flags.append(f"--storycloze-dir '{storycloze_dir}'")
    return " ".join(flags)
