"""Notebooks: executed on the smoke run's results, each expected figure and table written; the
paired .py files in sync and the .ipynb files stripped of outputs; the table and claim helpers."""

import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from dsmoe import report
from dsmoe.report.run_data import FALLBACK_RUN

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = {
    "tables": [f"tables/{name}.{ext}" for name in ("table1", "table2", "table3", "table4", "table5_6", "claims")
               for ext in ("csv", "md")] + ["figures/token_curve.png", "figures/token_curve.pdf"],
    "heatmaps": [f"figures/{name}.{ext}" for name in ("heatmap_dsmoe", "heatmap_no_ste", "heatmap_no_gx", "heatmap_topk",
                                                      "heatmap_tasks_dsmoe", "heatmap_tasks_no_ste", "heatmap_tasks_no_gx",
                                                      "layer_profile", "gate_margins") for ext in ("png", "pdf")]
    + [f"tables/{name}.{ext}" for name in ("diagnostics", "massive") for ext in ("csv", "md")],
    "tau_curves": [f"figures/{name}.{ext}" for name in ("tau_curves", "no_gx_curve") for ext in ("png", "pdf")],
    "explorer": ["figures/explorer.png", "figures/explorer.pdf"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_is_paired_and_stripped(name):
    import jupytext

    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") and not cell.get("execution_count")
               for cell in notebook.cells if cell.cell_type == "code"), f"{name}.ipynb holds outputs"
    paired = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert [c.source for c in paired.cells] == [c.source for c in notebook.cells], f"{name}.py and .ipynb differ"
    assert any("parameters" in c.metadata.get("tags", []) for c in notebook.cells), "no papermill parameters cell"


@pytest.fixture(scope="module")
def smoke_results():
    from conftest import smoke_workdir

    return Path(smoke_workdir()) / "results" / "smoke"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_on_smoke_results(name, smoke_results, tmp_path):
    import papermill

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_results / "data", run_dir / "data")
    parameters = {"run_dir": str(run_dir)}
    if name == "explorer":
        parameters["model_dir"] = str(smoke_results / "models" / "dsmoe" / "model")
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(tmp_path / f"{name}.ipynb"),
                               parameters=parameters, kernel_name="python3", progress_bar=False, cwd=str(NOTEBOOKS))
    for relative in EXPECTED[name]:
        path = run_dir / relative
        assert path.is_file() and path.stat().st_size > 0, f"{name} did not write {relative}"
    if name == "tables":
        claims = pd.read_csv(run_dir / "tables" / "claims.csv", keep_default_na=False)  # "n/a" stays a string
        pruned = sum(m.startswith("prune_") for m in set(pd.read_csv(run_dir / "data" / "ppl.csv")["model"]))
        assert len(claims) == 8 + max(1, pruned) and set(claims["reproduced"]) <= {"yes", "no", "n/a", "not testable"}
        assert list(claims.columns) == ["claim", "reproduced", "evidence", "ppl_a", "ppl_b", "activated_pct_a",
                                        "activated_pct_b", "diff", "ci_low", "ci_high", "regime"]
        assert not claims["evidence"].str.contains("no per-window data").any()  # the workflow collects the windows
        assert (claims["ci_low"] != "").sum() >= 5  # the comparisons carry their intervals
        table56 = pd.read_csv(run_dir / "tables" / "table5_6.csv")
        assert (table56["source"] == "this run").sum() == 4  # three milestones and the final model
    if name == "heatmaps":  # the routing diagnostics of every trained sigmoid-gated model, beside dense
        diagnostics = pd.read_csv(run_dir / "tables" / "diagnostics.csv").set_index("model")
        assert {"dense", "dense_continued", "dsmoe", "no_ste", "no_gx"} == set(diagnostics.index)
        assert diagnostics.loc[["dsmoe", "no_ste", "no_gx"], ["ppl_all_on", "near_tau_share"]].notna().all().all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tables", "heatmaps", "tau_curves"])
def test_notebook_falls_back_to_the_committed_study(name, tmp_path):
    """With no results/default, a notebook reads results/cpu-study-paper, says so first, writes nothing there,
    and runs clean: no error, nothing on stderr, its figures shown."""
    import papermill

    from dsmoe.report import nbcheck

    study = ROOT / "results" / FALLBACK_RUN
    if not (study / "data" / "ppl.csv").is_file():
        pytest.skip(f"results/{FALLBACK_RUN} not committed")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / FALLBACK_RUN).symlink_to(study)
    before = sorted(p.name for p in (study / "tables").iterdir())
    out = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out), kernel_name="python3", progress_bar=False,
                               parameters={"run_dir": str(tmp_path / "results" / "default")}, cwd=str(NOTEBOOKS))
    assert "showing the committed CPU study" in nbcheck.first_output(out)
    assert nbcheck.problems(out, name) == []
    assert sorted(p.name for p in (study / "tables").iterdir()) == before


@pytest.mark.slow
def test_lab_check_in_a_real_browser():
    """`make lab-check` (tools/lab_check.py) where Chromium and Playwright are installed; the skip says which is missing."""
    import subprocess
    import sys

    if not Path("/usr/bin/chromium").is_file():
        pytest.skip("lab-check not run: /usr/bin/chromium missing (apt-get install chromium, or `make lab-check`)")
    pytest.importorskip("playwright", reason="lab-check not run: playwright missing (pip install -e '.[lab]')")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "lab_check.py"), "--notebooks", "tau_curves"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr


def test_paper_results_transcribed():
    paper = report.load_paper()
    table4 = {row["tau"]: row for row in paper["table4"]}
    assert table4[0.5]["llama1b_ppl"] == 7.41 and table4[0.5]["llama7b_activated_params_pct"] == 58.46
    dsmoe_1b = next(r for r in paper["table1"]["rows"] if r["base"] == "LLaMA-1B" and r["method"] == "DSMoE")
    assert dsmoe_1b["activated_params"] == 735e6 and dsmoe_1b["params"] == 1.24e9
    rows = paper["table2"]["rows"]
    assert len(rows) == 12 and all(len(r["scores"]) == len(paper["table2"]["tasks"]) == 10 for r in rows)
    # Table 1's DSMoE PPL equals Table 4's at the training τ (0.5), as printed in the paper
    assert dsmoe_1b["ppl"] == table4[0.5]["llama1b_ppl"]


def _ppl_rows(values):
    return pd.DataFrame([{"model": m, "variant": m, "tau": 0.5, "source": "all", "ppl": p, "tokens": 100,
                          "activated_params": pct * 1e4, "activated_params_pct": pct, "mean_active_experts": 4.0}
                         for m, p, pct in values])


def _sweep(variant, points):
    return pd.DataFrame([{"model": variant, "variant": variant, "tau": t, "ppl": p, "activated_params_pct": pct,
                          "mean_active_experts": pct / 12.5} for t, p, pct in points])


def _claims(ppl, sweep, spread=0.3):
    """`report.claims` with per-window data for every row (`synthetic_windows`, noise of `spread`)."""
    from conftest import synthetic_windows

    return report.claims(ppl, sweep, windows=synthetic_windows(ppl, spread=spread),
                         sweep_windows=synthetic_windows(sweep, spread=spread)).set_index("claim")


def test_claims_yes_and_no():
    ppl = _ppl_rows([("dsmoe", 10.0, 60.0), ("no_ste", 12.0, 60.0), ("topk", 11.0, 61.0)])
    good = pd.concat([_sweep("dsmoe", [(0.3, 9.0, 65.0), (0.5, 10.0, 60.0), (0.7, 12.0, 55.0)]),
                      _sweep("no_gx", [(0.2, 15.0, 70.0), (0.5, 20.0, 58.0)])])
    claims = _claims(ppl, good)["reproduced"]
    # no pruning baseline, no top-k drop, no unscaled no-G sweep, no layers, no milestones
    assert list(claims) == ["yes", "yes", "yes", "n/a", "n/a", "yes", "n/a", "n/a", "n/a"]

    bad_ppl = _ppl_rows([("dsmoe", 13.0, 60.0), ("no_ste", 12.0, 60.0), ("topk", 9.0, 61.0)])
    bad = pd.concat([_sweep("dsmoe", [(0.3, 9.0, 65.0), (0.5, 8.0, 60.0), (0.7, 12.0, 62.0)]),
                     _sweep("no_gx", [(0.2, 5.0, 70.0), (0.5, 6.0, 58.0)])])
    claims = _claims(bad_ppl, bad)["reproduced"]
    assert list(claims) == ["no", "no", "no", "n/a", "n/a", "no", "n/a", "n/a", "n/a"]


def test_claims_interpolate_at_matched_activation():
    # top-k at 62.5% active: DSMoE's sweep gives PPL 9.5 there (between 9 at 65% and 10 at 60%)
    ppl = _ppl_rows([("dsmoe", 10.0, 60.0), ("topk", 9.6, 62.5)])
    sweep = _sweep("dsmoe", [(0.3, 9.0, 65.0), (0.5, 10.0, 60.0)])
    line = _claims(ppl, sweep, spread=0.05).loc["DSMoE beats top-k at matched activation"]  # 0.1 apart: little noise
    assert line["reproduced"] == "yes" and "9.5" in line["evidence"] and line["ci_high"] < 0


def test_collect_refuses_unknown_and_missing_files(tmp_path):
    (tmp_path / "weird.csv").write_text("model\nx\n")
    with pytest.raises(ValueError, match="weird"):
        report.collect([tmp_path / "weird.csv"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nope"):
        report.collect([tmp_path / "nope" / "ppl.csv"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
