rule no_gx_sweep:
    """Fig. 2: the model trained without G(x) (Eq. 20), thresholded at inference on a fine τ grid."""
    input:
        model=model_dir("no_gx"),
        data=rules.data.output.data,
    output:
        sweep=f"{RESULTS}/eval/sweep/no_gx/sweep.csv",
        layers=f"{RESULTS}/eval/sweep/no_gx/sweep_layers.csv",
    params:
        taus=sweep_taus("no_gx"),
        max_sequences=max_sequences_flag(),
        batch_size=config["eval"]["batch_size"],
    log:
        f"{LOGS}/tau_sweep/no_gx.log",
    conda:
        ENV
    shell:
        "dsmoe eval sweep --model {input.model} --data {input.data} --label no_gx --taus {params.taus}"
        " --batch-size {params.batch_size} {params.max_sequences}"
        " --out {output.sweep} --layers-out {output.layers} > {log} 2>&1"
