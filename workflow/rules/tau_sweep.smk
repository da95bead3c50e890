rule tau_sweep:
    """A trained model evaluated at each τ of its grid, without retraining: DSMoE on eval.tau_sweep
    (Table 4), the model trained without G(x) (Eq. 20) on the finer eval.no_gx_tau_sweep (Fig. 2),
    twice: with Eq. 8's n/k at inference (sweep no_gx) and without it (no_gx_unscaled)."""
    input:
        model=sweep_model,
        data=rules.data.output.data,
    output:
        sweep=f"{RESULTS}/eval/sweep/{{sweep}}/sweep.csv",
        layers=f"{RESULTS}/eval/sweep/{{sweep}}/sweep_layers.csv",
        windows=f"{RESULTS}/eval/sweep/{{sweep}}/sweep_windows.csv",
    params:
        taus=sweep_taus,
        rescale=sweep_rescale_flag,
        max_sequences=max_sequences_flag(),
        batch_size=config["eval"]["batch_size"],
    log:
        f"{LOGS}/tau_sweep/{{sweep}}.log",
    wildcard_constraints:
        sweep=one_of(SWEPT),
    conda:
        ENV
    shell:
        "dsmoe eval sweep --model {input.model} --data {input.data} --label {wildcards.sweep} --taus {params.taus}"
        " {params.rescale} --batch-size {params.batch_size} {params.max_sequences}"
        " --out {output.sweep} --layers-out {output.layers} --windows-out {output.windows} > {log} 2>&1"
