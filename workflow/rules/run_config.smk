rule run_config:
    """The validated config with every default filled in, as the `dsmoe` commands read it.

    Rewritten whenever the config changes (params); the rules read it as ancient() input and list
    the sections they depend on as params, so that a change reruns only the rules that read it.
    """
    output:
        RUN_CONFIG,
    params:
        config=config,
    log:
        f"{LOGS}/run_config.log",
    localrule: True
    run:
        write_run_config(output[0], log[0])
