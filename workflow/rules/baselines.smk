rule prune:
    """Static pruning of the dense base model (SparseGPT, LLM-Pruner channel and block; FFN channels and Wanda as
    extra rows), matched in size to the trained DSMoE model's activated params unless
    baselines.prune_fraction fixes it; the pruned model is then trained like the others (rule pretrain)."""
    input:
        unpack(prune_inputs),
    output:
        model=directory(f"{RESULTS}/init/prune_{{kind}}"),
    params:
        size=prune_size_flag,
        calibration_sequences=config["baselines"]["calibration_sequences"],
    log:
        f"{LOGS}/prune/{{kind}}.log",
    conda:
        ENV
    shell:
        "dsmoe baseline prune --model {input.model} --kind {wildcards.kind} {params.size}"
        " --data {input.data} --calibration-sequences {params.calibration_sequences}"
        " --out {output.model} > {log} 2>&1"


rule drop_sweep:
    """Training-free partition and drop (an oracle on the dense FFN, after DualSparse-MoE): drop weak
    experts per token, over a sweep of thresholds; drop_windows.csv: each threshold's per-window NLL."""
    input:
        model=rules.base_model.output.model,
        data=rules.data.output.data,
    output:
        drop=f"{RESULTS}/eval/drop/drop.csv",
        windows=f"{RESULTS}/eval/drop/drop_windows.csv",  # written beside --out
    params:
        label=DROP,
        thresholds=" ".join(str(t) for t in config["baselines"]["drop_thresholds"]),
        rule=config["baselines"]["drop_rule"],
        n_experts=config["dsmoe"]["n_experts"],
        max_sequences=max_sequences_flag(),
        batch_size=config["eval"]["batch_size"],
    log:
        f"{LOGS}/drop_sweep.log",
    conda:
        ENV
    shell:
        "dsmoe baseline drop --model {input.model} --data {input.data} --label {params.label}"
        " --rule {params.rule} --thresholds {params.thresholds} --n-experts {params.n_experts}"
        " --batch-size {params.batch_size} {params.max_sequences} --out {output.drop} > {log} 2>&1"


rule drop_topk:
    """The training-free per-token top-k drop (config baselines.drop_keep_experts): each token keeps its K
    experts of largest ||o_i||, one row per K; Table 1 shows each row at its activation. drop_windows.csv:
    each K's per-window NLL (the claim against DSMoE at matched activation)."""
    input:
        model=rules.base_model.output.model,
        data=rules.data.output.data,
    output:
        drop=f"{RESULTS}/eval/drop/topk/drop.csv",
        windows=f"{RESULTS}/eval/drop/topk/drop_windows.csv",  # written beside --out
    params:
        label=DROP,
        keep_experts=" ".join(str(k) for k in config["baselines"]["drop_keep_experts"] or []),
        n_experts=config["dsmoe"]["n_experts"],
        max_sequences=max_sequences_flag(),
        batch_size=config["eval"]["batch_size"],
    log:
        f"{LOGS}/drop_topk.log",
    conda:
        ENV
    shell:
        "dsmoe baseline drop --model {input.model} --data {input.data} --label {params.label}"
        " --rule topk --keep-experts {params.keep_experts} --n-experts {params.n_experts}"
        " --batch-size {params.batch_size} {params.max_sequences} --out {output.drop} > {log} 2>&1"
