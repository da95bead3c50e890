rule pretrain:
    """Continued pretraining of a converted, pruned or dense model on the run's data and budget.

    Checkpoints live beside the declared output, in models/<name>/checkpoints/: an interrupted job
    resumes from the newest one when rerun (`snakemake --rerun-incomplete`); --overwrite lets a
    changed train config (a params change, so a rerun) discard checkpoints of the old one. The DSMoE
    run also keeps its model at eval.milestone_tokens in models/dsmoe/milestones/ (Tables 5-6).

    On a cluster a run longer than one job chains jobs: the trainer stops before the job's runtime
    (or on SIGUSR1/SIGTERM), checkpoints and exits 75; Snakemake resubmits it (retries:
    cluster.max_resubmits) and the next job resumes. A real error is retried cluster.retry_failures
    times, after which the next attempt refuses to start (dsmoe/train/preempt.py).
    """
    input:
        init=train_init,
        data=rules.data.output.data,
    output:
        model=directory(f"{RESULTS}/models/{{trained}}/model"),
    params:
        config=RUN_CONFIG,
        train=lambda wildcards: variant_train(config, wildcards.trained),  # train_overrides: that row reruns alone
        variant=train_variant,
        launch=train_launcher,
        run_dir=subpath(output.model, parent=True),
        milestones=milestone_flag,
        milestone_tokens=lambda wildcards: config["eval"]["milestone_tokens"] if milestone_flag(wildcards) else [],
    resources:
        **TRAIN_RESOURCES,
        attempt=lambda wildcards, attempt: attempt,
    retries: int(config["cluster"]["max_resubmits"])
    log:
        f"{LOGS}/pretrain/{{trained}}.log",
    conda:
        ENV
    shell:
        "{params.launch} train --config {params.config} --init {input.init} --data {input.data}"
        " --variant {params.variant} {params.milestones} --overwrite --out {params.run_dir}"
        " --time-limit {resources.runtime} --attempt {resources.attempt} >> {log} 2>&1"
