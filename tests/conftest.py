import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# `make test` runs the suite on 2 pytest-xdist workers (one per core), each of 1 thread: two torch
# processes of 2 threads each on 2 cores run several times slower than one. Tests that share the
# smoke run, and the ones that start the local SLURM, stay on one worker each (--dist loadgroup).
SMOKE_FIXTURES = {"smoke_run", "smoke_results"}
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"  # the processes the tests start, too
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups (else no test is grouped)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SMOKE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("smoke"))
        elif "slurm" in item.keywords:
            item.add_marker(pytest.mark.xdist_group("slurm"))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_collection_finish(session):
    """Under --dist loadgroup, every grouped test must carry its group (pytest-xdist appends it to the id):
    else the smoke run is made once per worker and two local SLURMs start at once."""
    if not (XDIST_WORKER and session.config.getvalue("loadgroup")):
        return
    ungrouped = [item.nodeid for item in session.items
                 if (SMOKE_FIXTURES & set(getattr(item, "fixturenames", ())) or "slurm" in item.keywords)
                 and "@" not in item.nodeid]
    if ungrouped:
        raise pytest.UsageError(f"tests without their xdist group: {ungrouped[:3]}")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: tiny matmuls, and training processes started beside the test, only
    contend for a shared CPU's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    fields = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    fields.update(overrides)
    return LlamaConfig(**fields)


@pytest.fixture(scope="session")
def llama_config():
    """`llama_config(**overrides)`: a tiny random LlamaConfig."""
    return tiny_llama_config


def tiny_bpe_tokenizer():
    """A byte-level BPE with 320 tokens trained on a few pydoc topics: tokenises any text, offline, fast."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sorted(topics.values())[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return tiny_bpe_tokenizer()


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from dsmoe.hub import resolve_model

    directory, gguf_file = resolve_model("smollm2-135m")
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random dense LLaMA with SmolLM2's tokenizer, saved as a transformers checkpoint."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = smollm2_tokenizer
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), tie_word_embeddings=True,
                                               bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id))
    path = tmp_path_factory.mktemp("tiny") / "dense"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def synthetic_windows(frame, sources=(("code", 12), ("prose", 8)), tokens=31, spread=0.3):
    """windows.csv rows for each row of a ppl/sweep/milestones-like frame (source "all" rows, where it has
    a source): log(ppl) x tokens per window plus zero-mean noise, so each row's pooled ppl is exactly its
    ppl. The noise is mostly common to every row (window difficulty: pairing), partly the row's own."""
    import zlib

    import numpy as np
    import pandas as pd

    rows = frame[frame["source"] == "all"] if "source" in frame else frame
    keys = [c for c in ("model", "variant", "tau", "step", "train_tokens", "final") if c in rows]
    names = [s for s, n in sources for _ in range(n)]
    index = [w for _, n in sources for w in range(n)]
    common = np.random.default_rng(0).normal(0.0, spread, len(names))
    frames = []
    for row in rows.to_dict("records"):
        seed = zlib.crc32(repr([row[k] for k in keys]).encode())
        noise = common + np.random.default_rng(seed).normal(0.0, spread / 5, len(names))
        nll = tokens * (np.log(row["ppl"]) + noise - noise.mean())
        frames.append(pd.DataFrame({**{k: row[k] for k in keys}, "source": names, "window": index, "nll": nll,
                                    "tokens": tokens}))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- the Snakemake workflow and its smoke run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SMOKE = ROOT / "config" / "smoke.yaml"
# One thread per job, so that --cores 2 runs two of the smoke run's tiny jobs at once.
LOCAL_SMOKE_ARGS = ["--configfile", str(SMOKE), "--cores", "2", "--set-threads", "pretrain=1"]


def snakemake(*args, workdir=None, env=None, timeout=600, check=True):
    """Run snakemake from the repository root (where `--profile slurm` and profiles/ are found)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
    if workdir is not None:
        cmd += ["--directory", str(workdir)]
    result = subprocess.run(cmd + list(args), cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd + list(args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def planned_outputs(workdir, *configfiles, env=None):
    """Every output file of the run's DAG, from `snakemake --summary`."""
    summary = snakemake("--configfile", *map(str, configfiles), "--summary", workdir=workdir, env=env).stdout
    rows = [line.split("\t") for line in summary.splitlines() if "\t" in line]
    return [Path(workdir) / row[0] for row in rows[1:]]


def assert_complete(workdir, *configfiles, run_name="smoke", least_outputs=40, env=None):
    outputs = planned_outputs(workdir, *configfiles, env=env)
    assert len(outputs) > least_outputs, outputs
    for path in outputs:
        assert path.exists(), f"{path} is missing"
        if path.is_dir():
            assert any(path.iterdir()), f"{path} is empty"
        else:
            assert path.stat().st_size > 0, f"{path} is empty"
    results = Path(workdir) / "results" / run_name
    for name in ("table1", "table2", "table3", "table4", "table5_6", "claims"):
        assert (results / "tables" / f"{name}.md").stat().st_size > 0
    for name in ("ppl", "layers", "windows", "sweep", "sweep_windows", "milestones", "milestone_windows", "gate_margins",
                 "all_on", "massive"):
        assert (results / "data" / f"{name}.csv").stat().st_size > 0
    for name in ("heatmap_dsmoe", "heatmap_tasks_dsmoe", "layer_profile", "tau_curves", "no_gx_curve", "token_curve",
                 "explorer", "gate_margins"):
        assert (results / "figures" / f"{name}.png").stat().st_size > 0
        assert (results / "figures" / f"{name}.pdf").stat().st_size > 0


@functools.lru_cache(maxsize=None)
def smoke_workdir():
    """The smoke config run once per test session, locally; shared by the workflow, notebook and distributed tests.

    DSMOE_SMOKE_WORKDIR=DIR reuses (and brings up to date) the smoke run of an earlier session."""
    if os.environ.get("DSMOE_SMOKE_WORKDIR"):
        workdir = Path(os.environ["DSMOE_SMOKE_WORKDIR"])
    else:
        workdir = Path(tempfile.mkdtemp(prefix="dsmoe-smoke-"))
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    snakemake(*LOCAL_SMOKE_ARGS, workdir=workdir, timeout=1800)
    return workdir


@pytest.fixture(scope="session")
def smoke_run():
    return smoke_workdir()
