rule eval_ppl:
    """Per-source validation perplexity, activated params and per-layer active experts (Table 1, Fig. 3);
    per-window NLL for the claims' bootstrap intervals; the σ(h·Y) − τ histograms of sigmoid-gated layers."""
    input:
        model=eval_model_dir,
        data=rules.data.output.data,
    output:
        ppl=f"{RESULTS}/eval/ppl/{{model}}/ppl.csv",
        layers=f"{RESULTS}/eval/ppl/{{model}}/layers.csv",
        windows=f"{RESULTS}/eval/ppl/{{model}}/windows.csv",
        gate_margins=f"{RESULTS}/eval/ppl/{{model}}/gate_margins.csv",
    params:
        out_dir=subpath(output.ppl, parent=True),
        max_sequences=max_sequences_flag(),
        batch_size=config["eval"]["batch_size"],
    log:
        f"{LOGS}/eval_ppl/{{model}}.log",
    conda:
        ENV
    shell:
        "dsmoe eval ppl --model {input.model} --data {input.data} --label {wildcards.model}"
        " --batch-size {params.batch_size} {params.max_sequences} --out {params.out_dir} > {log} 2>&1"


rule eval_all_on:
    """Routing diagnostics: a trained sigmoid-gated model with every expert on at coefficient 1 (its dense FFN),
    rows MODEL@all_on; collected into data/all_on.csv, apart from Table 1's ppl.csv."""
    input:
        model=lambda wildcards: model_dir(wildcards.gated),
        data=rules.data.output.data,
    output:
        ppl=f"{RESULTS}/eval/all_on/{{gated}}/ppl.csv",
        layers=f"{RESULTS}/eval/all_on/{{gated}}/layers.csv",
        windows=f"{RESULTS}/eval/all_on/{{gated}}/windows.csv",
    params:
        out_dir=subpath(output.ppl, parent=True),
        max_sequences=max_sequences_flag(),
        batch_size=config["eval"]["batch_size"],
    log:
        f"{LOGS}/eval_all_on/{{gated}}.log",
    conda:
        ENV
    shell:
        "dsmoe eval ppl --model {input.model} --data {input.data} --label {wildcards.gated} --all-experts-on"
        " --no-gate-margins --batch-size {params.batch_size} {params.max_sequences} --out {params.out_dir} > {log} 2>&1"


rule eval_massive:
    """Routing diagnostics: the base model's largest FFN units at position 0 per layer and their expert (Eq. 6)."""
    input:
        model=model_dir(DENSE),
        data=rules.data.output.data,
    output:
        massive=f"{RESULTS}/eval/massive/massive.csv",
    params:
        n_experts=config["dsmoe"]["n_experts"],
        max_sequences=max_sequences_flag(),
        batch_size=config["eval"]["batch_size"],
    log:
        f"{LOGS}/eval_massive.log",
    conda:
        ENV
    shell:
        "dsmoe eval massive-activations --model {input.model} --data {input.data} --n-experts {params.n_experts}"
        " --batch-size {params.batch_size} {params.max_sequences} --out {output.massive} > {log} 2>&1"


BENCH_TASK_FLAGS = bench_task_flags()


rule lm_eval:
    """Downstream tasks through lm-evaluation-harness (Table 2): offline local tasks or the paper's ten."""
    input:
        model=eval_model_dir,
    output:
        bench=f"{RESULTS}/eval/bench/{{model}}/bench.csv",
        bench_layers=f"{RESULTS}/eval/bench/{{model}}/bench_layers.csv",
        results=f"{RESULTS}/eval/bench/{{model}}/results.json",
    params:
        out_dir=subpath(output.bench, parent=True),
        suite=config["eval"]["bench_suite"],
        limit=bench_limit_flag(),
        batch_size=config["eval"]["batch_size"],
        tasks=BENCH_TASK_FLAGS,
    log:
        f"{LOGS}/benchmark/{{model}}.log",
    conda:
        ENV
    shell:
        "dsmoe eval lm-eval --model {input.model} --label {wildcards.model} --suite {params.suite}"
        " --batch-size {params.batch_size} {params.limit} {params.tasks} --out {params.out_dir} > {log} 2>&1"


rule eval_milestones:
    """Tables 5-6: perplexity of the DSMoE models kept at eval.milestone_tokens, and of the final one."""
    input:
        model=f"{RESULTS}/models/dsmoe/model",
        data=rules.data.output.data,
    output:
        milestones=f"{RESULTS}/eval/milestones/dsmoe/milestones.csv",
        windows=f"{RESULTS}/eval/milestones/dsmoe/milestone_windows.csv",
    params:
        run_dir=subpath(input.model, parent=True),
        max_sequences=max_sequences_flag(),
        batch_size=config["eval"]["batch_size"],
    log:
        f"{LOGS}/eval_milestones.log",
    conda:
        ENV
    shell:
        "dsmoe eval milestones --run {params.run_dir} --data {input.data} --label dsmoe"
        " --batch-size {params.batch_size} {params.max_sequences} --out {output.milestones}"
        " --windows-out {output.windows} > {log} 2>&1"
