rule tau_sweep:
    """Table 4: the trained DSMoE model evaluated at each τ of eval.tau_sweep, without retraining."""
    input:
        model=model_dir("dsmoe"),
        data=rules.data.output.data,
    output:
        sweep=f"{RESULTS}/eval/sweep/dsmoe/sweep.csv",
        layers=f"{RESULTS}/eval/sweep/dsmoe/sweep_layers.csv",
    params:
        taus=sweep_taus("dsmoe"),
        max_sequences=max_sequences_flag(),
        batch_size=config["eval"]["batch_size"],
    log:
        f"{LOGS}/tau_sweep/dsmoe.log",
    conda:
        ENV
    shell:
        "dsmoe eval sweep --model {input.model} --data {input.data} --label dsmoe --taus {params.taus}"
        " --batch-size {params.batch_size} {params.max_sequences}"
        " --out {output.sweep} --layers-out {output.layers} > {log} 2>&1"
