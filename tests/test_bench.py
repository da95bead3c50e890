"""lm-eval benchmarks (dsmoe.evaluation.harness) and the offline stdlib tasks (dsmoe/evaluation/tasks)."""

import copy
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import dsmoe
from dsmoe import cli
from dsmoe.evaluation import harness
from dsmoe.evaluation.tasks import stdlib


@pytest.fixture(scope="module")
def local_tasks():
    return harness.make_task_manager(list(harness.LOCAL_SUITE))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return dsmoe.load_model(str(tiny_model_dir))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_local_task_data_is_held_out_and_deterministic(tmp_path):
    for name in stdlib.BUILDERS:
        items = read_jsonl(stdlib.jsonl_path(name))
        assert 100 <= len(items) <= stdlib.MAX_ITEMS
        for item in items:
            key = item["id"].split(":")[0].split("#")[0]
            assert stdlib.held_out(key), item["id"]
    for item in read_jsonl(stdlib.jsonl_path("stdlib_nextline")):
        assert len(set(item["choices"])) == 4 and 0 <= item["gold"] < 4
    for item in read_jsonl(stdlib.jsonl_path("pydoc_cloze")):
        assert item["target"].isalpha() and len(item["context"].split()) >= 20
    built = stdlib.build("pydoc_cloze", tmp_path / "cloze.jsonl").read_text()
    if sys.version_info[:2] == (3, 11):  # the shipped files were built with 3.11's stdlib
        assert built == stdlib.jsonl_path("pydoc_cloze").read_text()
    else:
        assert built == stdlib.build("pydoc_cloze", tmp_path / "again.jsonl").read_text()


def test_local_suite_on_tiny_dense_and_dsmoe(tiny):
    model, tokenizer = tiny
    results, df = harness.run_bench(model, tokenizer, harness.LOCAL_SUITE, limit=2, batch_size=4)
    assert set(results["results"]) == set(harness.LOCAL_SUITE)
    assert set(df["metric"]) == {"acc", "acc_norm", "perplexity"}
    primary = df[df["primary"]]
    assert primary["task"].tolist() == list(harness.LOCAL_SUITE) and primary["metric"].tolist() == ["acc", "acc"]
    assert primary["value"].between(0, 1).all() and (df["samples"] == 2).all()
    assert (df["activated_params_pct"] == 100).all()

    torch.manual_seed(0)
    moe = dsmoe.convert(copy.deepcopy(model), n_experts=4, tau=0.5, gate_init_std=1.0).eval()
    results, df = harness.run_bench(moe, tokenizer, {"dsmoe_stdlib_nextline": (0, "acc,none")}, limit=2, batch_size=4)
    activation = results["activation"]["dsmoe_stdlib_nextline"]
    assert activation["tokens"] > 0 and len(activation["mean_active_experts"]) == 2
    assert 0 < df["activated_params_pct"].iloc[0] < 100
    assert df["mean_active_experts"].iloc[0] == pytest.approx(sum(activation["mean_active_experts"]) / 2)


def test_loglikelihood_matches_hand_computation(tiny, local_tasks):
    model, tokenizer = tiny
    lm = harness.wrap_model(model, tokenizer, batch_size=4)
    out = harness.evaluate_task(lm, model, "dsmoe_stdlib_nextline", 0, limit=1, task_manager=local_tasks, log_samples=True)
    sample = out["samples"]["dsmoe_stdlib_nextline"][0]
    doc = sample["doc"]
    for choice, (loglik, _) in zip(doc["choices"], sample["filtered_resps"]):
        ids = tokenizer(doc["context"] + "\n" + choice, add_special_tokens=False).input_ids
        n_context = len(tokenizer(doc["context"], add_special_tokens=False).input_ids)
        assert len(ids) <= model.config.max_position_embeddings
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits.double(), -1)[0]
        expected = sum(logp[j - 1, ids[j]].item() for j in range(n_context, len(ids)))
        assert float(loglik) == pytest.approx(expected, rel=1e-4, abs=1e-3)
    chosen = max(range(4), key=lambda i: float(sample["filtered_resps"][i][0]))
    assert out["results"]["dsmoe_stdlib_nextline"]["acc,none"] == float(chosen == doc["gold"])


def test_unknown_task_lists_close_matches(local_tasks):
    with pytest.raises(ValueError, match="close matches: dsmoe_pydoc_cloze"):
        harness.check_task_names(["dsmoe_pydoc_clze"], local_tasks)


@pytest.mark.slow
def test_paper_task_names_are_lm_eval_tasks():
    manager = harness.make_task_manager(["hellaswg"])  # indexes every lm-eval task (~15 s)
    harness.check_task_names(list(harness.PAPER_SUITE) + list(harness.LOCAL_SUITE), manager)
    with pytest.raises(ValueError, match="close matches: hellaswag"):
        harness.check_task_names(["hellaswg"], manager)


def test_storycloze_needs_its_data_dir(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    import lm_eval

    manager = TaskManager(include_path=str(Path(lm_eval.__file__).parent / "tasks" / "storycloze"), include_defaults=False)
    monkeypatch.delenv(harness.STORYCLOZE_ENV, raising=False)
    assert harness.task_spec("storycloze_2016", manager) is None
    with pytest.raises(FileNotFoundError, match="Story Cloze"):
        harness.task_spec("storycloze_2016", manager, tmp_path / "missing")
    from test_storycloze import write_official_csvs  # the official 2016 CSV files (tests/test_storycloze.py)

    monkeypatch.setenv(harness.STORYCLOZE_ENV, str(write_official_csvs(tmp_path)))
    spec = harness.task_spec("storycloze_2016", manager)
    assert spec["task"] == "storycloze_2016" and spec["dataset_kwargs"]["data_dir"] == str(tmp_path)
    assert harness.task_spec("piqa", manager) == "piqa"


def test_cli_bench_outputs_and_reruns(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["eval", "bench", "--model", str(tiny_model_dir), "--limit", "2", "--batch-size", "4", "--out", str(out)]
    assert cli.main(args) == 0
    df = pd.read_csv(out / "bench.csv")
    assert list(df.columns[:7]) == ["model", "variant", "task", "metric", "value", "stderr", "activated_params_pct"]
    assert set(df["variant"]) == {"dense"} and set(df["model"]) == {tiny_model_dir.name}
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == set(harness.LOCAL_SUITE) and results["dsmoe"]["variant"] == "dense"
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "up to date" in capsys.readouterr().out
    # a new label reuses every task's cached result: the values are identical
    assert cli.main([*args, "--label", "renamed"]) == 0
    renamed = pd.read_csv(out / "bench.csv")
    assert set(renamed["model"]) == {"renamed"} and renamed["value"].tolist() == df["value"].tolist()


def test_cli_bench_errors(tiny_model_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    assert cli.main(["eval", "bench", "--model", str(tiny_model_dir), "--tau", "0", *out]) == 2
    assert "open interval" in capsys.readouterr().err
    assert cli.main(["eval", "bench", "--model", str(tmp_path), *out]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
