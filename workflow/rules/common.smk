"""Helpers shared by the rules: the validated config, the run's paths, the models it builds."""

import os
from pathlib import Path

import yaml
from snakemake.utils import min_version, validate

from dsmoe.config import check_cross_fields, coerce_numbers
from dsmoe.names import DENSE, DENSE_CONTINUED, PRUNE_KINDS, RUN_DATA, SWEEP_GRIDS, TABLES, prune_method

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
SWEPT = [variant for variant in SWEEP_GRIDS if variant in CONVERTED]  # each on its own τ grid
RUN_CONFIG = f"{RESULTS}/config.yaml"  # written by rule run_config, read by the `dsmoe` commands


def one_of(names):
    """A wildcard constraint matching any of these names ("none", no name, when there are none)."""
    return "|".join(names) or "none"


wildcard_constraints:
    variant=one_of(CONVERTED),
    trained=one_of(TRAINED),
    model=one_of(EVALUATED),
    kind=one_of(PRUNE_KINDS),


def write_run_config(path, log):
    """The validated config with all defaults, as the `dsmoe` commands read it (rule run_config)."""
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    Path(log).write_text(f"wrote {path}\n")


def model_dir(label):
    """The checkpoint directory that a model label evaluates."""
    if label == DENSE:
        return f"{RESOURCES}/base"
    return f"{RESULTS}/models/{label}/model"


def eval_model_dir(wildcards):
    return model_dir(wildcards.model)


def convert_inputs(wildcards):
    """The base model, plus the tokenised data when the gates are calibrated (beyond the paper)."""
    inputs = {"model": f"{RESOURCES}/base"}
    if config["dsmoe"]["gate_init"] == "calibrated" and wildcards.variant != "topk":
        inputs["data"] = f"{RESOURCES}/data"
    return inputs


def gate_init_flags(wildcards, input):
    if "data" not in input.keys():
        return ""
    settings = config["dsmoe"]
    return (f"--gate-init calibrated --calibration-data {input.data}"
            f" --calibration-sequences {settings['calibration_sequences']}"
            f" --calibration-target {settings['calibration_target']}")


def train_init(wildcards):
    """What continued pretraining starts from: the converted or pruned model, else the dense base model."""
    if wildcards.trained == DENSE_CONTINUED:
        return f"{RESOURCES}/base"
    return f"{RESULTS}/init/{wildcards.trained}"


def train_variant(wildcards):
    """The trainer's --variant: the DSMoE forward of a converted model, else plain dense training."""
    return wildcards.trained if wildcards.trained in CONVERTED else "dense"


def train_launcher(wildcards, resources):
    """One process per GPU through accelerate when the job holds several GPUs, else plain `dsmoe`."""
    gpus = int(resources.get("gpu", 0) or 0)
    if gpus > 1:
        return f"accelerate launch --multi_gpu --num_processes {gpus} -m dsmoe.cli"
    return "dsmoe"


def sweep_taus(wildcards):
    return " ".join(str(tau) for tau in config["eval"][SWEEP_GRIDS[wildcards.variant]])


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
    """A fixed pruning fraction, or the activated-params percent read from input.match."""
    if "match" in input.keys():
        return f"--match-ppl-csv {input.match}"
    return f"--fraction {config['baselines']['prune_fraction']}"


def eval_outputs(kind, filename):
    return expand(f"{RESULTS}/eval/{kind}/{{model}}/{filename}", model=EVALUATED)


def figure_names():
    names = ["layer_profile", "explorer"] if "dsmoe" in CONVERTED else ["layer_profile"]
    names += [f"heatmap_{model}" for model in CONVERTED]
    names += ["tau_curves"] if "dsmoe" in SWEPT else []
    names += ["no_gx_curve"] if "no_gx" in SWEPT else []
    return names


def figure_files(names):
    return [f"{RESULTS}/figures/{name}.{ext}" for name in names for ext in ("png", "pdf")]


def table_files():
    return [f"{RESULTS}/tables/{name}.{ext}" for name in TABLES for ext in ("csv", "md")]


def all_outputs():
    return (
        table_files()
        + figure_files(figure_names())
        + expand(f"{RESULTS}/data/{{name}}.csv", name=RUN_DATA)
    )


report: "../report/workflow.rst"
