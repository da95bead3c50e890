rule base_model:
    """The dense base model and tokenizer: the embedded GGUF, a local dir or a Hugging Face id."""
    output:
        model=directory(f"{RESOURCES}/base"),
    params:
        config=RUN_CONFIG,
        base_model=config["base_model"],
        random_init=config["random_init"],
        dtype=config["dtype"],
    log:
        f"{LOGS}/base_model.log",
    conda:
        ENV
    shell:
        offline_check("model", "data", "tasks") + "dsmoe base --config {params.config} --out {output.model} > {log} 2>&1"
