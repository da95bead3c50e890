rule collect:
    """Table and figure data: every evaluation CSV of the run, concatenated per kind (the all-experts-on
    ppl.csv files into all_on.csv)."""
    input:
        ppl=eval_outputs("ppl", "ppl.csv"),
        layers=eval_outputs("ppl", "layers.csv"),
        windows=eval_outputs("ppl", "windows.csv"),
        bench=eval_outputs("bench", "bench.csv"),
        bench_layers=eval_outputs("bench", "bench_layers.csv"),
        sweep=expand(f"{RESULTS}/eval/sweep/{{sweep}}/sweep.csv", sweep=SWEPT),
        sweep_layers=expand(f"{RESULTS}/eval/sweep/{{sweep}}/sweep_layers.csv", sweep=SWEPT),
        sweep_windows=expand(f"{RESULTS}/eval/sweep/{{sweep}}/sweep_windows.csv", sweep=SWEPT),
        drop=drop_outputs(),
        drop_windows=drop_outputs("drop_windows.csv"),
        milestones=milestone_outputs(),
        milestone_windows=milestone_outputs("milestone_windows.csv"),
        gate_margins=eval_outputs("ppl", "gate_margins.csv"),
        all_on=ALL_ON_OUTPUTS,
        massive=MASSIVE_OUTPUTS,
    output:
        ppl=f"{RESULTS}/data/ppl.csv",
        layers=f"{RESULTS}/data/layers.csv",
        windows=f"{RESULTS}/data/windows.csv",
        bench=f"{RESULTS}/data/bench.csv",
        bench_layers=f"{RESULTS}/data/bench_layers.csv",
        sweep=f"{RESULTS}/data/sweep.csv",
        sweep_layers=f"{RESULTS}/data/sweep_layers.csv",
        sweep_windows=f"{RESULTS}/data/sweep_windows.csv",
        drop=f"{RESULTS}/data/drop.csv",
        drop_windows=f"{RESULTS}/data/drop_windows.csv",
        milestones=f"{RESULTS}/data/milestones.csv",
        milestone_windows=f"{RESULTS}/data/milestone_windows.csv",
        gate_margins=f"{RESULTS}/data/gate_margins.csv",
        all_on=f"{RESULTS}/data/all_on.csv",
        massive=f"{RESULTS}/data/massive.csv",
    params:
        out_dir=subpath(output.ppl, parent=True),
        files=collect_files,
    log:
        f"{LOGS}/collect.log",
    conda:
        ENV
    shell:
        "dsmoe report collect --out {params.out_dir} {params.files} --all-on {input.all_on} > {log} 2>&1"


rule notebook_tables:
    """Tables 1-6 beside the paper's numbers (Tables 5-6 also as a curve), and the reproduced: yes/no lines."""
    input:
        notebook=NOTEBOOKS / "tables.ipynb",
        data=rules.collect.output,
        paper=PAPER_RESULTS,
    output:
        tables=[
            report(path, caption="../report/tables.rst", category="Tables")
            for path in table_files()
        ],
        figures=[
            report(path, caption="../report/token_curve.rst", category="Figures", subcategory="Tables 5-6")
            for path in figure_files(["token_curve"])
        ],
        notebook=f"{RESULTS}/notebooks/tables.ipynb",
    params:
        run=subpath(output.notebook, ancestor=2),
    log:
        f"{LOGS}/notebooks/tables.log",
    conda:
        ENV
    shell:
        "papermill {input.notebook} {output.notebook} -p run_dir {params.run}"
        " -p paper_results {input.paper} > {log} 2>&1"


rule notebook_heatmaps:
    """Fig. 3: mean active experts per layer and validation source (and benchmark task), per model; the routing
    diagnostics (gate margins, all experts on, massive activations)."""
    input:
        notebook=NOTEBOOKS / "heatmaps.ipynb",
        data=rules.collect.output,
    output:
        heatmaps=[
            report(path, caption="../report/heatmap.rst", category="Figures", subcategory="Fig. 3")
            for path in figure_files(heatmap_names())
        ],
        profile=[
            report(path, caption="../report/layer_profile.rst", category="Figures", subcategory="Fig. 3")
            for path in figure_files(["layer_profile"])
        ],
        gate_margins=[
            report(path, caption="../report/gate_margins.rst", category="Figures", subcategory="Diagnostics")
            for path in figure_files(diagnostic_figure_names())
        ],
        tables=[
            report(path, caption="../report/diagnostics.rst", category="Tables")
            for path in diagnostic_table_files()
        ],
        notebook=f"{RESULTS}/notebooks/heatmaps.ipynb",
    params:
        run=subpath(output.notebook, ancestor=2),
        models=" ".join(CONVERTED),
        task_models=" ".join(DYNAMIC),
    log:
        f"{LOGS}/notebooks/heatmaps.log",
    conda:
        ENV
    shell:
        "papermill {input.notebook} {output.notebook} -p run_dir {params.run}"
        " -p models '{params.models}' -p task_models '{params.task_models}' > {log} 2>&1"


rule notebook_tau_curves:
    """Table 4 as curves, and Fig. 2: the no-G model thresholded at inference, DSMoE starred."""
    input:
        notebook=NOTEBOOKS / "tau_curves.ipynb",
        data=rules.collect.output,
        paper=PAPER_RESULTS,
    output:
        figures=[
            report(path, caption="../report/tau_curves.rst", category="Figures", subcategory="Table 4, Fig. 2")
            for path in figure_files([name for name in figure_names() if name in ("tau_curves", "no_gx_curve")])
        ],
        notebook=f"{RESULTS}/notebooks/tau_curves.ipynb",
    params:
        run=subpath(output.notebook, ancestor=2),
    log:
        f"{LOGS}/notebooks/tau_curves.log",
    conda:
        ENV
    shell:
        "papermill {input.notebook} {output.notebook} -p run_dir {params.run}"
        " -p paper_results {input.paper} > {log} 2>&1"


rule notebook_explorer:
    """Routing explorer: active experts per token and layer of the trained DSMoE model on a text."""
    input:
        notebook=NOTEBOOKS / "explorer.ipynb",
        model=model_dir("dsmoe"),
    output:
        figures=[
            report(path, caption="../report/explorer.rst", category="Figures", subcategory="Explorer")
            for path in figure_files(["explorer"])
        ],
        notebook=f"{RESULTS}/notebooks/explorer.ipynb",
    params:
        run=subpath(output.notebook, ancestor=2),
    log:
        f"{LOGS}/notebooks/explorer.log",
    conda:
        ENV
    shell:
        "papermill {input.notebook} {output.notebook} -p run_dir {params.run}"
        " -p model_dir {input.model} > {log} 2>&1"
