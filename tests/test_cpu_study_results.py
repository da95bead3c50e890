"""The committed CPU study runs (results/<run>/, `make cpu-study STUDY=<run>`): the first study, the mild and
the paper level (and again at 3 of 8), their second seeds, the mild level at 3x the budget and the paper's own
recipe. Their CSVs load through the notebooks' own code,
the tables and figures rebuild from them without rerunning anything (Table 1 and the claims compared with the
committed ones, numbers to a tolerance; the seed spreads and budget gaps too), docs/results.md shows the first study's claims
as the run wrote them, the README's figures exist, and nothing large or a model weight is committed."""

import re
import subprocess
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from dsmoe import report  # noqa: E402
from dsmoe.names import RUN_DATA  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "results" / "cpu-study"
# each committed level: the models its Table 1 must hold
LEVELS = {"cpu-study": {"dense", "dsmoe", "no_ste", "no_gx", "topk", "dense_continued", "prune_sparsegpt"},
          "cpu-study-mild": {"dense", "dsmoe", "topk", "dense_continued", "drop_oracle_top6", "prune_sparsegpt"},
          "cpu-study-paper": {"dense", "dsmoe", "topk", "no_ste", "no_gx", "drop_oracle_top3", "prune_sparsegpt"},
          "cpu-study-mild-3x": {"dense", "dsmoe", "prune_sparsegpt", "drop_oracle_top6"},
          "cpu-study-paper-3of8": {"dense", "dsmoe", "topk", "drop_oracle_top3", "prune_sparsegpt"},
          "cpu-study-mild-seed2": {"dense", "dsmoe"},
          "cpu-study-paper-seed2": {"dense", "dsmoe"},
          "cpu-study-paper-3of8-seed2": {"dense", "dsmoe"},
          "cpu-study-paper-recipe": {"dense", "dsmoe"}}
SEEDS = {"cpu-study-mild": ["cpu-study-mild", "cpu-study-mild-seed2"],
         "cpu-study-paper": ["cpu-study-paper", "cpu-study-paper-seed2"],
         "cpu-study-paper-3of8": ["cpu-study-paper-3of8", "cpu-study-paper-3of8-seed2"]}  # tables/seeds of the first run
BUDGETS = {"cpu-study-mild": ["cpu-study-mild", "cpu-study-mild-3x"]}  # tables/budget of the first run (dsmoe report budget)


def committed(name):
    return pytest.param(name, marks=pytest.mark.skipif(not (ROOT / "results" / name / "data" / "ppl.csv").is_file(),
                                                       reason=f"results/{name} not committed"))


@pytest.fixture(scope="module", params=[committed(name) for name in LEVELS])
def level(request):
    return request.param, report.load_run(ROOT / "results" / request.param)


def test_committed_csvs_load_through_the_notebooks_code(level):
    name, data = level
    assert set(RUN_DATA) <= set(data)
    for kind in ("ppl", "layers", "windows", "sweep", "sweep_windows", "milestones"):
        assert not data[kind].empty, f"results/{name}/data/{kind}.csv is empty"
    models = set(report.table1(data["ppl"], report.load_paper(), data["drop"])["model"])
    assert LEVELS[name] <= models


def test_tables_claims_and_figures_rebuild_from_the_committed_csvs(level, tmp_path):
    """What the notebooks compute (tables.py, tau_curves.py, heatmaps.py), on the committed data."""
    name, data = level
    study = ROOT / "results" / name
    paper = report.load_paper()
    table1 = report.table1(data["ppl"], paper, data["drop"])
    for table in (table1, report.table3(data["ppl"], data["bench"], paper),
                  report.table4(data["sweep"], paper), report.table5_6(data["milestones"], paper)):
        assert not table.empty
    claims = report.run_claims(data, report.run_config(study).get("train", {}).get("tokens"))
    for table, kind in ((claims, "claims"), (table1, "table1")):  # the committed tables are the code's
        report.save_table(table, tmp_path, kind)
        assert_same_table(tmp_path / f"{kind}.csv", study / "tables" / f"{kind}.csv")
    assert set(claims["reproduced"]) <= {"yes", "no", "n/a", "not testable"}
    report.tau_curves(data["sweep"], paper)
    report.heatmap(data["layers"], "dsmoe")
    if "no_gx" in set(data["sweep"].get("variant", [])):
        report.no_gx_curve(data["sweep"], report.overall(data["ppl"]).loc["dsmoe"])


# Rebuilt on another CPU, floats differ in their last digits (BLAS kernels, vector width, summation order):
# text columns must match exactly, numbers to 1e-6 relative.
FLOAT_TOL = dict(rtol=1e-6, atol=1e-9)


def assert_same_table(rebuilt, committed):
    import pandas as pd

    new, old = (pd.read_csv(path, keep_default_na=False) for path in (rebuilt, committed))
    assert list(new.columns) == list(old.columns) and len(new) == len(old)
    numeric = [c for c in old.columns if pd.api.types.is_numeric_dtype(old[c]) and pd.api.types.is_numeric_dtype(new[c])]
    text = [c for c in old.columns if c not in numeric]
    pd.testing.assert_frame_equal(new[text].astype(str), old[text].astype(str))
    pd.testing.assert_frame_equal(new[numeric], old[numeric], check_dtype=False, check_exact=False, **FLOAT_TOL)


@pytest.mark.skipif(not (STUDY / "tables" / "claims.md").is_file(), reason="results/cpu-study not committed")
def test_the_docs_show_the_first_studys_claims_as_the_run_wrote_them_and_the_readmes_figures_exist():
    results = (ROOT / "docs" / "results.md").read_text()
    shown = re.search(r"<!-- claims:start -->\n(.*?)<!-- claims:end -->", results, re.S)
    assert shown, "docs/results.md has no claims block"
    assert shown.group(1).strip() == (STUDY / "tables" / "claims.md").read_text().strip()
    figures = re.findall(r"\]\((results/cpu-study[\w-]*/figures/[^)]+\.png)\)", (ROOT / "README.md").read_text())
    assert "results/cpu-study-paper/figures/gate_margins.png" in figures
    for figure in figures:
        assert (ROOT / figure).is_file(), figure


ACROSS_RUNS = [("seeds", runs) for runs in SEEDS.values()] + [("budget", runs) for runs in BUDGETS.values()]


@pytest.mark.parametrize("kind, names", ACROSS_RUNS, ids=[f"{kind}-{names[0]}" for kind, names in ACROSS_RUNS])
def test_the_seed_spreads_and_budget_gaps_rebuild_from_the_committed_csvs(kind, names, tmp_path):
    runs = [ROOT / "results" / name for name in names]
    if not all((run / "data" / "ppl.csv").is_file() for run in runs):
        pytest.skip(f"{names} not all committed")
    build = {"seeds": report.seed_table, "budget": report.budget_table}[kind]
    report.save_table(build(runs), tmp_path, kind)
    assert_same_table(tmp_path / f"{kind}.csv", runs[0] / "tables" / f"{kind}.csv")


@pytest.mark.parametrize("name", list(LEVELS))
def test_committed_results_hold_no_weights_and_fit_10_mb(name):
    files = subprocess.run(["git", "ls-files", f"results/{name}"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout with the study committed")
    assert not [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".npy", ".gguf"))]
    assert sum((ROOT / f).stat().st_size for f in files if (ROOT / f).is_file()) <= 10 * 2**20
