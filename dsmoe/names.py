"""Names shared by the package, the Snakemake workflow and the notebooks: one place for each.

A *method* is what a results row is (the `variant` column of the CSVs): a DSMoE training variant
(`dsmoe.model.VARIANTS`) or one of the dense rows below.
"""

# The model's own variants (dsmoe/model/configuration_dsmoe.py keeps these too, since a checkpoint's code
# imports nothing of the package; tests/test_layout.py checks both are the same). Kept here so that
# the Snakefile's parse imports no torch.
VARIANTS = ("dsmoe", "no_ste", "no_gx", "topk", "topk_switch")
TOPK_VARIANTS = ("topk", "topk_switch")  # fixed k experts per token, no τ
SIGMOID_VARIANTS = tuple(v for v in VARIANTS if v not in TOPK_VARIANTS)  # gated by σ(h·Y) ≥ τ: gate margins, all-on
NEAR_TAU = 0.05  # gate_margins.csv's near_tau_share: the share of σ(h·Y) within ±NEAR_TAU of τ
ALL_ON = "@all_on"  # `dsmoe eval ppl --all-experts-on` labels its rows MODEL@all_on (every expert on at coefficient 1)

# train keys that only log or checkpoint: two runs that differ in them train the same model
LOG_ONLY_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "micro_batch_size", "all_experts_off_steps")

DENSE = "dense"  # the base model as it comes
DENSE_CONTINUED = "dense_continued"  # the base model trained on the same data and budget
DROP = "drop_oracle"  # training-free partition and drop: an oracle on the dense FFN (it computes every expert)
PRUNE_KINDS = ("sparsegpt", "llm_pruner_channel", "llm_pruner_block", "ffn_channel", "wanda")  # `dsmoe baseline prune --kind`
UNSTRUCTURED_PRUNE_KINDS = ("sparsegpt", "wanda")  # zeroed weights, kept at zero through training


def prune_method(kind):
    """The method name of a pruned baseline: prune_sparsegpt, prune_ffn_channel, prune_wanda."""
    return f"prune_{kind}"


DENSE_METHODS = (DENSE, DENSE_CONTINUED, DROP, *map(prune_method, PRUNE_KINDS))
METHOD_ORDER = [DENSE, DENSE_CONTINUED, *VARIANTS, *map(prune_method, PRUNE_KINDS), DROP]
# τ-sweeps of trained models: sweep name -> (variant swept, its τ grid in config `eval`, Eq. 8's n/k at
# inference for no_gx: Fig. 2 is drawn both ways, None: the variant always rescales)
SWEEPS = {
    "dsmoe": ("dsmoe", "tau_sweep", None),
    "no_gx": ("no_gx", "no_gx_tau_sweep", True),
    "no_gx_unscaled": ("no_gx", "no_gx_tau_sweep", False),
}
# results/<run>/data/<name>.csv; *windows: per-window NLL of eval ppl | sweep | baseline drop | milestones
# (bootstrap intervals);
# routing diagnostics (issue 28): gate_margins (eval ppl), all_on (eval ppl --all-experts-on: its ppl.csv rows),
# massive (eval massive-activations of the base model)
RUN_DATA = ["ppl", "layers", "windows", "bench", "bench_layers", "sweep", "sweep_layers", "sweep_windows", "drop",
            "drop_windows", "milestones", "milestone_windows", "gate_margins", "all_on", "massive"]
TABLES = ["table1", "table2", "table3", "table4", "table5_6", "claims"]  # results/<run>/tables/<name>.{csv,md}
DIAGNOSTIC_TABLES = ["diagnostics", "massive"]  # results/<run>/tables/<name>.{csv,md}, written by the heatmaps notebook
FIXED_ROUTING = TOPK_VARIANTS  # variants whose routing is fixed (always k experts): their heatmaps are a reference

# The paper's benchmark columns (Table 2/3 keys in dsmoe/report/paper_results.yaml) -> the lm-eval task
# that plays each (dsmoe.evaluation.harness.PAPER_SUITE): the one name map between the two.
PAPER_TASKS = {
    "hellaswag": "hellaswag",
    "lambada": "lambada_openai",
    "piqa": "piqa",
    "siqa": "social_iqa",
    "storycloze": "storycloze_2016",
    "winogrande": "winogrande",
    "gsm8k": "gsm8k",
    "naturalqs": "nq_open",
    "triviaqa": "triviaqa",
    "webqs": "webqs",
}
