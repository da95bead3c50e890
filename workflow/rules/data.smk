rule data:
    """Tokenised training streams and held-out validation sequences, one per source."""
    input:
        model=rules.base_model.output.model,
    output:
        data=directory(f"{RESOURCES}/data"),
    params:
        config=RUN_CONFIG,
        data=config["data"],
        tokens=config["train"]["tokens"],
    log:
        f"{LOGS}/data.log",
    conda:
        ENV
    shell:
        offline_check("data") + "dsmoe data prepare --config {params.config} --model {input.model} --out {output.data} > {log} 2>&1"
