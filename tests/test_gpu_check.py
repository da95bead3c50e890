"""benchmarks/gpu_check.py's plumbing on the CPU (`--cpu-smoke`: every section at tiny shapes): the
sections that take seconds here, through the real entry points, into the JSON and Markdown report.
The others (preempt, fsdp, fsdp_wanda, eval, lm_eval: 3 minutes on 2 cores) share the same runner and
are exercised by their own tests (test_preempt.py, test_fsdp.py, test_evaluate.py)."""

import json
import subprocess
import sys

from conftest import ROOT, ENV

SECTIONS = ["environment", "train", "dense", "generation", "profile", "ffn"]


def test_gpu_check_cpu_smoke_writes_one_report(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path / "out"),
               "--sections", *SECTIONS]
    result = subprocess.run(command, cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    failed = {k: v.get("error") for k, v in report["sections"].items() if v["status"] != "ok"}
    assert result.returncode == 0 and not failed, (failed, result.stdout[-3000:], result.stderr[-3000:])
    sections = report["sections"]
    assert list(sections) == ["environment", "setup", "train", "dense", "generation", "profile", "ffn"]
    assert sections["environment"]["result"]["torch"]
    train = sections["train"]["result"]
    assert train["steps"] == 3 and train["tokens_per_s"] > 0 and train["checkpoint_s"] > 0
    assert sections["dense"]["result"]["dsmoe_over_dense"] > 0
    assert sections["generation"]["result"]["same_text"] == 8
    assert "aten::nonzero" in sections["profile"]["result"]["per_step"]
    assert [row["T"] for row in sections["ffn"]["result"]] == [1, 16]
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| train | ok |" in markdown and "FFN T=16" in markdown
