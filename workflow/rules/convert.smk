rule convert:
    """Split every FFN of the base model into experts and add the gates (one model per variant)."""
    input:
        unpack(convert_inputs),
    output:
        model=directory(f"{RESULTS}/init/{{variant}}"),
    params:
        n_experts=config["dsmoe"]["n_experts"],
        tau=config["dsmoe"]["tau"],
        top_k=config["dsmoe"]["top_k"],
        gate_init_std=config["dsmoe"]["gate_init_std"],
        gate_init=gate_init_flags,  # and --partition
        seed=config["train"]["seed"],
        rescale=str(config["dsmoe"]["no_gx_inference_rescale"]).lower(),
    log:
        f"{LOGS}/convert/{{variant}}.log",
    conda:
        ENV
    shell:
        "dsmoe convert --model {input.model} --variant {wildcards.variant}"
        " --n-experts {params.n_experts} --tau {params.tau} --top-k {params.top_k}"
        " --gate-init-std {params.gate_init_std} {params.gate_init} --no-gx-inference-rescale {params.rescale}"
        " --seed {params.seed} --out {output.model} > {log} 2>&1"
