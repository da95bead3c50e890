# DSMoE reproduction: base model -> data -> convert -> continued pretraining -> τ-sweeps,
# perplexity, lm-eval tasks, baselines -> tables, figures and notebooks under results/<run_name>/.
#   snakemake --cores all                                   # config/config.yaml on this machine
#   snakemake --cores all --configfile config/smoke.yaml    # a tiny random model, minutes
#   snakemake --cores all --profile slurm --configfile config/paper-llama-3.2-1b.yaml


include: "workflow/rules/common.smk"
include: "workflow/rules/base_model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/tau_sweep.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/figures.smk"


onstart:
    write_run_config()  # results/<run>/config.yaml, read by the `dsmoe` commands


rule all:
    input:
        all_outputs(),
    default_target: True
