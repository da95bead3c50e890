rule tau_sweep:
    """A trained model evaluated at each τ of its grid, without retraining: DSMoE on eval.tau_sweep
    (Table 4), the model trained without G(x) (Eq. 20) on the finer eval.no_gx_tau_sweep (Fig. 2)."""
    input:
        model=f"{RESULTS}/models/{{variant}}/model",
        data=rules.data.output.data,
    output:
        sweep=f"{RESULTS}/eval/sweep/{{variant}}/sweep.csv",
        layers=f"{RESULTS}/eval/sweep/{{variant}}/sweep_layers.csv",
    params:
        taus=sweep_taus,
        max_sequences=max_sequences_flag(),
        batch_size=config["eval"]["batch_size"],
    log:
        f"{LOGS}/tau_sweep/{{variant}}.log",
    wildcard_constraints:
        variant=one_of(SWEPT),
    conda:
        ENV
    shell:
        "dsmoe eval sweep --model {input.model} --data {input.data} --label {wildcards.variant} --taus {params.taus}"
        " --batch-size {params.batch_size} {params.max_sequences}"
        " --out {output.sweep} --layers-out {output.layers} > {log} 2>&1"
