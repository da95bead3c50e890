"""Downstream tasks through lm-evaluation-harness (paper Table 2), with activated params per task.

The loaded model is wrapped in lm-eval's `HFLM` and each task runs through `lm_eval.simple_evaluate`
inside a `RoutingRecorder`, so every task gets its own activated-params count (the paper's activation
differs by dataset; the count covers every token the harness feeds the model, batch padding included).
Suites:

- `local` (offline, the default): the lm-eval YAML tasks in `dsmoe/evaluation/tasks/` over held-out stdlib text
  (`dsmoe_stdlib_nextline`, multiple choice; `dsmoe_pydoc_cloze`, LAMBADA-style cloze).
- `paper`: hellaswag, lambada_openai, piqa, social_iqa, storycloze_2016, winogrande at 0-shot; gsm8k,
  nq_open, triviaqa, webqs at 5-shot. Needs the Hugging Face datasets (network or a filled cache).
  storycloze_2016 runs the local task tasks/storycloze_2016.yaml over the two official 2016 CSV files
  (downloaded by hand): pass `--storycloze-dir DIR` or set `DSMOE_STORYCLOZE_DIR`; without them the
  run stops before any task with an error saying so (the workflow: eval.storycloze_dir, or
  eval.skip_tasks: [storycloze_2016]).

Values are lm-eval's (accuracy in [0, 1]); `primary` marks the metric Table 2 reports.
"""

import contextlib
import difflib
import json
import logging
import math
import os
from pathlib import Path

from ..atomic import atomic_file

# pandas, torch and the model load inside the functions that use them: the workflow's parse reads
# only the suites and the Story Cloze checks here.

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
STORYCLOZE_ENV = "DSMOE_STORYCLOZE_DIR"
BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics (perplexity); lm-eval's default 100000 is slow on CPU

# lm-eval task -> (few-shot examples, the metric Table 2 reports as lm-eval names it: "metric,filter").
# Each metric is the one that reproduces the paper's dense rows (Table 2, LLaMA-1B / LLaMA-7B); the
# reasons are written out in dsmoe/report/paper_results.yaml (table2.metric_reasons), which must
# list the same shots and metrics (tests/test_tables.py). bench.csv keeps every metric either way.
PAPER_SUITE = {
    "hellaswag": (0, "acc_norm,none"),  # 64.09 / 76.39: lm-eval's acc is ~48 / ~57 for these models, acc_norm ~64 / ~76
    "lambada_openai": (0, "acc,none"),  # 61.05 / 72.34: the OpenAI split (lambada_standard is ~5 points lower)
    "piqa": (0, "acc_norm,none"),  # 75.51 / 79.05: Llama-2-7B scores acc ~78.1, acc_norm ~79.1
    "social_iqa": (0, "acc,none"),  # the task's only metric
    "storycloze_2016": (0, "acc,none"),  # the task's only metric
    "winogrande": (0, "acc,none"),  # the task's only metric
    "gsm8k": (5, "exact_match,strict-match"),  # 4.85 / 14.70 cannot tell the filters apart; strict is the leaderboard's
    "nq_open": (5, "exact_match,remove_whitespace"),  # the task's only filter
    "triviaqa": (5, "exact_match,remove_whitespace"),  # the task's only filter
    "webqs": (5, "exact_match,none"),  # the task's only metric
}
LOCAL_SUITE = {
    "dsmoe_stdlib_nextline": (0, "acc,none"),
    "dsmoe_pydoc_cloze": (0, "acc,none"),
}
SUITES = {"local": LOCAL_SUITE, "paper": PAPER_SUITE}
CSV_COLUMNS = ["model", "variant", "task", "metric", "value", "stderr", "activated_params_pct",
               "tau", "num_fewshot", "samples", "primary", "mean_active_experts"]


def make_task_manager(names):
    """A TaskManager over the local tasks, plus lm-eval's own (slow to index) unless every name is local."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return local if set(names) <= set(local.all_tasks) else TaskManager(include_path=str(TASKS_DIR))


def check_task_names(names, task_manager):
    known = set(task_manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else "; `lm_eval ls tasks` lists them"
            raise ValueError(f"unknown lm-eval task {name!r}{hint}")


STORYCLOZE_TASK = "storycloze_2016"
# the official file names: "cloze_test_val__spring2016 - cloze_test_ALL_val.csv", "..._test__spring2016 - ..."
STORYCLOZE_FILES = {"validation": "cloze_test_val__spring2016*.csv", "test": "cloze_test_test__spring2016*.csv"}
STORYCLOZE_COLUMNS = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
                      "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]


def storycloze_files(storycloze_dir):
    """{split: file name} of the official 2016 CSV files in `storycloze_dir`, checked: both there, the columns right."""
    import csv

    folder = Path(storycloze_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"Story Cloze data dir {str(storycloze_dir)!r} does not exist")
    files = {}
    for split, pattern in STORYCLOZE_FILES.items():
        found = sorted(folder.glob(pattern))
        if len(found) != 1:
            raise FileNotFoundError(f"Story Cloze data dir {str(folder)!r}: expected one file {pattern!r} (the official "
                                    f"2016 {split} CSV), found {len(found)}")
        with open(found[0], newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        missing = [c for c in STORYCLOZE_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{found[0]} is not a Story Cloze 2016 CSV: no column(s) {', '.join(missing)}")
        files[split] = found[0].name
    return files


def storycloze_spec(storycloze_dir):
    """The local Story Cloze task's config over the CSV files in `storycloze_dir`, run as storycloze_2016."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(str(TASKS_DIR / "storycloze_2016.yaml"), resolve_func=True)
    return {**config, "task": STORYCLOZE_TASK,
            "dataset_kwargs": {"data_dir": str(storycloze_dir), "data_files": storycloze_files(storycloze_dir)}}


def task_spec(name, task_manager, storycloze_dir=None):
    """What `simple_evaluate` gets for a task: its name, or for storycloze_2016 the local task's config over
    the CSV files (None without a directory)."""
    if name != STORYCLOZE_TASK:
        return name
    storycloze_dir = storycloze_dir or os.environ.get(STORYCLOZE_ENV)
    return storycloze_spec(storycloze_dir) if storycloze_dir else None


def check_storycloze(tasks, storycloze_dir=None):
    """Before any task runs: storycloze_2016 needs its directory (and its two files)."""
    storycloze_dir = storycloze_dir or os.environ.get(STORYCLOZE_ENV)
    if STORYCLOZE_TASK not in tasks:
        return
    if not storycloze_dir:
        raise ValueError(f"{STORYCLOZE_TASK} needs the official Story Cloze 2016 CSV files (downloaded by hand: "
                         "https://cs.rochester.edu/nlp/rocstories/): pass --storycloze-dir DIR or set "
                         f"{STORYCLOZE_ENV} (the workflow: eval.storycloze_dir), or leave the task out "
                         f"(--tasks; the workflow: eval.skip_tasks: [{STORYCLOZE_TASK}])")
    storycloze_files(storycloze_dir)


def routing_recorder(model):
    from ..accounting import RoutingRecorder
    from ..model import dsmoe_layers

    return RoutingRecorder(model) if dsmoe_layers(model) else contextlib.nullcontext()


def activation_report(model, recorder):
    if recorder is None:
        from ..accounting import activated_params

        return {"tokens": None, "mean_active_experts": [], **activated_params(model)}
    report = recorder.report()
    report.pop("k_histogram")
    return report


def evaluate_task(lm, model, spec, num_fewshot, limit=None, task_manager=None, log_samples=False):
    """Run one task; return lm-eval's output with `activation` (the routing report of this task) added."""
    from lm_eval import simple_evaluate

    with routing_recorder(model) as recorder:
        out = simple_evaluate(model=lm, tasks=[spec], num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
                              log_samples=log_samples, bootstrap_iters=BOOTSTRAP_ITERS)
    out["activation"] = activation_report(model, recorder)
    return out


def dataset_error(name, err):
    """A clear error for a task whose dataset cannot be loaded (offline, not cached, no such dataset)."""
    offline = [var for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(var, "") not in ("", "0")]
    why = f", offline ({', '.join(offline)} set) and not in the Hugging Face cache" if offline else ""
    return ValueError(f"lm-eval task {name!r}: its dataset cannot be loaded{why} ({type(err).__name__}: {err}). "
                      "The paper suite downloads its datasets from the Hugging Face Hub: run it once online (the "
                      "cache then serves offline runs), or use --suite local")


def wrap_model(model, tokenizer, batch_size=8):
    """lm-eval's HFLM around an already loaded causal LM."""
    from lm_eval.models.huggingface import HFLM

    max_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return HFLM(pretrained=model.eval(), tokenizer=tokenizer, backend="causal", batch_size=batch_size, max_length=max_length)


def bench_rows(task, out, primary_metric):
    """Tidy rows (task, metric, value, stderr, ...) from one task's lm-eval output."""
    results, rows = out["results"][task], []
    for key, value in results.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        stderr = results.get(f"{metric}_stderr,{filter_name}")
        rows.append({
            "task": task,
            "metric": metric if filter_name == "none" else key,
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else math.nan,
            "activated_params_pct": out["activation"]["activated_params_pct"],
            "num_fewshot": out["n-shot"].get(task),
            "samples": out["n-samples"].get(task, {}).get("effective"),
            "primary": key == primary_metric,
            "mean_active_experts": _mean(out["activation"]["mean_active_experts"]),
        })
    return rows


def bench_layers(activation):
    """Per task and layer mean active experts (the Fig. 3 heatmap over tasks) from run_bench's `activation`."""
    import pandas as pd

    rows = [{"task": task, "layer": layer, "mean_active_experts": k}
            for task, report in activation.items() for layer, k in enumerate(report["mean_active_experts"])]
    return pd.DataFrame(rows, columns=["task", "layer", "mean_active_experts"])


def _mean(values):
    return sum(values) / len(values) if values else math.nan


def run_bench(model, tokenizer, tasks, limit=None, batch_size=8, storycloze_dir=None, cache_dir=None, cache_key=""):
    """Evaluate `tasks` ({name: (num_fewshot, primary metric)}); return (merged lm-eval results, tidy DataFrame).

    With `cache_dir`, each task's output is kept there under `cache_key` and reused by a rerun.
    """
    import pandas as pd
    from lm_eval.utils import handle_non_serializable

    check_storycloze(tasks, storycloze_dir)
    task_manager = make_task_manager([name for name in tasks if name != STORYCLOZE_TASK])
    check_task_names([name for name in tasks if name != STORYCLOZE_TASK], task_manager)
    lm = wrap_model(model, tokenizer, batch_size)
    merged = {"results": {}, "configs": {}, "versions": {}, "n-shot": {}, "higher_is_better": {}, "n-samples": {}, "activation": {}}
    rows = []
    for name, (num_fewshot, primary) in tasks.items():
        spec = task_spec(name, task_manager, storycloze_dir)
        cache = Path(cache_dir) / f"{name}.json" if cache_dir else None
        if cache and cache.is_file() and json.loads(cache.read_text()).get("key") == cache_key:
            out = json.loads(cache.read_text())["output"]
        else:
            try:
                out = evaluate_task(lm, model, spec, num_fewshot, limit, task_manager)
            except OSError as err:  # ConnectionError, FileNotFoundError, DatasetNotFoundError from `datasets`
                raise dataset_error(name, err) from err
            out = json.loads(json.dumps({k: out[k] for k in merged if k in out}, default=handle_non_serializable))
            if cache:
                with atomic_file(cache) as handle:
                    json.dump({"key": cache_key, "output": out}, handle)
        for key in merged:
            if key == "activation":
                merged[key][name] = out[key]
            else:
                merged[key].update(out.get(key, {}))
        rows += bench_rows(name, out, primary)
    return merged, pd.DataFrame(rows)


def select_tasks(suite, names=None, num_fewshot=0):
    known = {**LOCAL_SUITE, **PAPER_SUITE}
    if names is None:
        return dict(SUITES[suite])
    return {name: known.get(name, (num_fewshot, None)) for name in names}
