"""The committed CPU study (results/cpu-study/, `make cpu-study`): its CSVs load through the notebooks'
own code, the tables and figures rebuild from them without rerunning anything, the README shows the
claims as the run wrote them, and nothing large or a model weight is committed."""

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
pytestmark = pytest.mark.skipif(not (STUDY / "data" / "ppl.csv").is_file(), reason="results/cpu-study not committed")


@pytest.fixture(scope="module")
def data():
    return report.load_run(STUDY)


def test_committed_csvs_load_through_the_notebooks_code(data):
    assert set(RUN_DATA) <= set(data)
    for name in ("ppl", "layers", "windows", "sweep", "sweep_windows", "milestones"):
        assert not data[name].empty, f"results/cpu-study/data/{name}.csv is empty"
    models = set(data["ppl"]["model"])
    assert {"dense", "dsmoe", "no_ste", "no_gx", "topk", "dense_continued"} <= models
    assert any(model.startswith("prune_") for model in models)


def test_tables_claims_and_figures_rebuild_from_the_committed_csvs(data, tmp_path):
    """What the notebooks compute (tables.py, tau_curves.py, heatmaps.py), on the committed data."""
    paper = report.load_paper()
    for table in (report.table1(data["ppl"], paper), report.table3(data["ppl"], data["bench"], paper),
                  report.table4(data["sweep"], paper), report.table5_6(data["milestones"], paper)):
        assert not table.empty
    claims = report.claims(data["ppl"], data["sweep"], data["layers"], windows=data["windows"],
                           sweep_windows=data["sweep_windows"], milestones=data["milestones"],
                           milestone_windows=data["milestone_windows"])
    report.save_table(claims, tmp_path, "claims")
    assert_same_table(tmp_path / "claims.csv", STUDY / "tables" / "claims.csv")  # the committed claims are the code's
    assert set(claims["reproduced"]) <= {"yes", "no", "n/a", "not testable"}
    report.tau_curves(data["sweep"], paper)
    report.heatmap(data["layers"], "dsmoe")
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


def test_the_readme_shows_the_claims_as_the_run_wrote_them():
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"<!-- claims:start -->\n(.*?)<!-- claims:end -->", readme, re.S)
    assert shown, "README has no claims block"
    assert shown.group(1).strip() == (STUDY / "tables" / "claims.md").read_text().strip()
    for figure in re.findall(r"\]\((results/cpu-study/figures/[^)]+\.png)\)", readme):
        assert (ROOT / figure).is_file(), figure
    assert "results/cpu-study/figures/heatmap_dsmoe.png" in readme


def test_committed_results_hold_no_weights_and_fit_10_mb():
    files = subprocess.run(["git", "ls-files", "results/cpu-study"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout with the study committed")
    assert not [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".npy", ".gguf"))]
    assert sum((ROOT / f).stat().st_size for f in files if (ROOT / f).is_file()) <= 10 * 2**20
