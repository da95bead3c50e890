"""Story Cloze 2016 as a local lm-eval task over the official CSV files (dsmoe/evaluation/tasks/
storycloze_2016.yaml): a tiny CSV in the official columns through lm-eval's evaluator, the clear errors
(no directory, a missing file, wrong columns) before any task, and the workflow stopping before any job."""

import csv

import pytest
import yaml
from transformers import LlamaForCausalLM

from dsmoe.evaluation import harness
from conftest import SMOKE, snakemake, tiny_llama_config

STORIES = [
    ("Tom had a dog.", "He walked it daily.", "One day it ran off.", "Tom searched all night.", "He found it at dawn.",
     "He sold his car.", 1),
    ("Ann baked a cake.", "She added sugar.", "She put it in the oven.", "It smelled sweet.", "The sea was cold.",
     "Her family ate it.", 2),
    ("Sam lost his keys.", "He looked under the bed.", "He checked his coat.", "They were in the door.",
     "Sam laughed at himself.", "Sam flew to Mars.", 1),
]


def write_official_csvs(folder, rows=STORIES):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("val", "test"):
        path = folder / f"cloze_test_{split}__spring2016 - cloze_test_ALL_{split}.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(harness.STORYCLOZE_COLUMNS)
            for i, row in enumerate(rows):
                writer.writerow([f"id-{split}-{i}", *row])
    return folder


def test_storycloze_runs_over_the_official_csv_files(tmp_path, bpe_tokenizer):
    folder = write_official_csvs(tmp_path / "storycloze")
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(bpe_tokenizer))).eval()
    tasks = {"storycloze_2016": harness.PAPER_SUITE["storycloze_2016"]}
    results, df = harness.run_bench(model, bpe_tokenizer, tasks, limit=3, batch_size=2, storycloze_dir=folder)
    assert results["n-samples"]["storycloze_2016"]["effective"] == 3
    row = df[df.primary].iloc[0]
    assert row.task == "storycloze_2016" and row.metric == "acc" and 0 <= row.value <= 1
    config = results["configs"]["storycloze_2016"]
    assert config["test_split"] == "test" and config["output_type"] == "multiple_choice"


def test_storycloze_docs_take_the_right_ending(tmp_path):
    from lm_eval.api.task import ConfigurableTask

    task = ConfigurableTask(config=harness.storycloze_spec(write_official_csvs(tmp_path / "sc")))
    docs = list(task.test_docs())
    assert [task.doc_to_target(d) for d in docs] == [0, 1, 0]
    assert task.doc_to_choice(docs[1]) == ["The sea was cold.", "Her family ate it."]
    assert task.doc_to_text(docs[0]) == "Tom had a dog. He walked it daily. One day it ran off. Tom searched all night."


def test_storycloze_errors_come_before_any_task(tmp_path, monkeypatch):
    monkeypatch.delenv(harness.STORYCLOZE_ENV, raising=False)
    tasks = harness.select_tasks("paper")
    with pytest.raises(ValueError, match="storycloze_2016 needs the official Story Cloze 2016 CSV files.*skip_tasks"):
        harness.run_bench(None, None, tasks)  # no model needed: nothing runs
    with pytest.raises(FileNotFoundError, match="does not exist"):
        harness.check_storycloze(tasks, tmp_path / "missing")
    folder = write_official_csvs(tmp_path / "one_file")
    next(folder.glob("cloze_test_test*")).unlink()
    with pytest.raises(FileNotFoundError, match="expected one file 'cloze_test_test__spring2016"):
        harness.check_storycloze(tasks, folder)
    folder = write_official_csvs(tmp_path / "columns")
    path = next(folder.glob("cloze_test_val*"))
    path.write_text(path.read_text().replace("AnswerRightEnding", "answer"))
    with pytest.raises(ValueError, match="not a Story Cloze 2016 CSV: no column.*AnswerRightEnding"):
        harness.check_storycloze(tasks, folder)
    harness.check_storycloze({"hellaswag": (0, None)}, None)  # not asked for: nothing needed


def test_workflow_refuses_the_paper_suite_without_storycloze_files(tmp_path):
    config = yaml.safe_load(SMOKE.read_text())
    config.setdefault("eval", {})["bench_suite"] = "paper"
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(config))
    result = snakemake("--configfile", str(tmp_path / "paper.yaml"), "-n", workdir=tmp_path, check=False)
    assert result.returncode != 0 and "set eval.storycloze_dir" in result.stdout + result.stderr
    config["eval"]["skip_tasks"] = ["storycloze_2016"]
    (tmp_path / "skip.yaml").write_text(yaml.safe_dump(config))
    result = snakemake("results/smoke/eval/bench/dsmoe/bench.csv", "--configfile", str(tmp_path / "skip.yaml"), "-n", "-p",
                       workdir=tmp_path)  # one job's DAG: the flags are the same for every model
    assert "--tasks hellaswag lambada_openai piqa social_iqa winogrande gsm8k" in result.stdout
