"""The sections of benchmarks/gpu_check.py: each takes the check's `Context` and returns a dict for the report.

Training and evaluation run the project's own entry points (`dsmoe train` / `dsmoe eval` as
subprocesses where a signal, a launcher or a time limit is involved; `dsmoe.train.train` in-process
where the GPU's peak memory or a profile is read)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def main():", "The quick brown fox", "import os\nimport sys\n\nclass Loader", "x = 1",
           "for i in range(10):", "Return the sum of", "a", "The lexical analysis of a Python program reads"]


def run_command(ctx, words, log, timeout, env=None, wait=True):
    """A command line (`dsmoe ...`, `accelerate launch ...`) from the repository root, output in `log`."""
    handle = open(log, "w")
    proc = subprocess.Popen(words, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **ctx.env, **(env or {})})
    if not wait:
        return proc
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise TimeoutError(f"{' '.join(map(str, words))} ran past {timeout:.0f} s (log {log})")
    if rc != 0:
        raise RuntimeError(f"{' '.join(map(str, words))} failed ({rc}): {Path(log).read_text()[-1500:]}")
    return Path(log).read_text()


def drop_checkpoints(*runs):
    """A 1B run's checkpoint is ~19 GB (fp32 weights and AdamW state): each goes once its section is done."""
    import shutil

    for run in runs:
        shutil.rmtree(Path(run) / "checkpoints", ignore_errors=True)


def dsmoe_cli(*words):
    return [sys.executable, "-m", "dsmoe.cli", *map(str, words)]


def train_log(run_dir):
    path = Path(run_dir) / "train_log.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def environment(ctx):
    import accelerate
    import lm_eval
    import transformers

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "lm_eval": getattr(lm_eval, "__version__", "?"), "device": ctx.device_name, "peak_tflops": ctx.peak}
    if ctx.device == "cuda":
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        from dsmoe.model import sparse_ffn

        info["sparse_schedule_bf16"] = "grouped_mm" if sparse_ffn.grouped_mm_runs(
            torch.zeros(2, 8, device="cuda", dtype=torch.bfloat16)) else "masked"
    return info


def cuda_tests(ctx):
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                            capture_output=True, text=True, timeout=ctx.budget("cuda_tests"))
    lines = result.stdout.strip().splitlines()
    if result.returncode not in (0, 5):  # 5: none collected (a CPU smoke)
        raise RuntimeError(f"pytest -m gpu: {lines[-1] if lines else result.stderr[-500:]}\n" + result.stdout[-3000:])
    return {"summary": lines[-1] if lines else "", "returncode": result.returncode}


def main_training(ctx):
    """DSMoE training of the Llama-3.2-1B-shaped model (truncate mode, bf16): tokens/s, MFU, peak memory,
    checkpoint time (the final checkpoint, timed in-process)."""
    from dsmoe.train import trainer

    saved, original = [], trainer.save_checkpoint

    def timed_save(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        ctx.synchronize()
        saved.append(time.perf_counter() - start)
        return out

    trainer.save_checkpoint = timed_save
    try:
        if ctx.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        config = ctx.train_config(ctx.shape["steps"], checkpoint_every=ctx.shape["steps"])
        start = time.perf_counter()
        trainer.train(config, ctx.work / "dsmoe_init", ctx.data_dir, ctx.work / "dsmoe_run")
        wall = time.perf_counter() - start
    finally:
        trainer.save_checkpoint = original
        drop_checkpoints(ctx.work / "dsmoe_run")
    rows = train_log(ctx.work / "dsmoe_run")
    timed = rows[1:] or rows  # the first interval holds the warmup (allocation, autotuning)
    tokens_per_s = sum(r["tokens_per_s"] for r in timed) / len(timed)
    result = {"steps": len(rows), "tokens_per_step": ctx.tokens_per_step, "tokens_per_s": tokens_per_s,
              "step_s": ctx.tokens_per_step / tokens_per_s, "flops_per_token": ctx.flops_per_token,
              "final_lm_loss": rows[-1]["lm_loss"], "checkpoint_s": saved[-1] if saved else None, "wall_s": wall}
    result["mfu"] = tokens_per_s * ctx.flops_per_token / (ctx.peak * 1e12) if ctx.peak else None
    if ctx.device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def preempt_and_resume(ctx):
    """`dsmoe train` stopped by SIGTERM near its end (dsmoe/train/preempt.py: checkpoint, exit 75), then resumed."""
    steps = ctx.shape["preempt_steps"]
    config = ctx.write_config("preempt.yaml", ctx.train_config(steps, checkpoint_every=10**6))
    run = ctx.work / "preempt_run"
    words = dsmoe_cli("train", "--config", config, "--init", ctx.work / "dsmoe_init", "--data", ctx.data_dir, "--out", run)
    first = stop_near_the_end(ctx, words, run, steps, ctx.work / "preempt_1.log")
    try:
        log = run_command(ctx, words, ctx.work / "preempt_2.log", ctx.budget("preempt"))
    finally:
        drop_checkpoints(run)
    resumed = "resuming from" in log
    done = (run / "model" / "model.safetensors").is_file() or any((run / "model").glob("*.safetensors"))
    if not (first["rc"] == 75 and resumed and done):
        raise RuntimeError(f"SIGTERM at step {first['signal_at_step']}: exit {first['rc']} (75 expected), resumed {resumed}, "
                           f"final model {done}")
    return {**first, "resumed": resumed, "final_model": done}


def training_workers(proc):
    """The `dsmoe.cli` processes of a launch (the process itself without a launcher)."""
    import psutil

    parent = psutil.Process(proc.pid)
    workers = [p for p in parent.children(recursive=True) if "dsmoe.cli" in " ".join(p.cmdline())]
    return workers or [parent]


def stop_near_the_end(ctx, words, run, steps, log, env=None):
    """Start `words`, SIGTERM the process group once train_log.csv reaches step steps - 2; its exit status."""
    proc = run_command(ctx, words, log, None, env=env, wait=False)
    deadline = time.monotonic() + ctx.budget("preempt")
    step = 0
    while proc.poll() is None and time.monotonic() < deadline:
        rows = train_log(run)
        step = int(rows[-1]["step"]) if rows else 0
        if step >= steps - 2:
            for worker in training_workers(proc):  # as a scheduler's preemption reaches the training processes
                worker.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    try:
        rc = proc.wait(timeout=ctx.budget("preempt"))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []
    # under a launcher (accelerate launch, torchrun) the worker's exit 75 reaches the caller as a failure:
    # the worker's own line says it stopped cleanly (dsmoe/train/preempt.py)
    clean = rc == 75 or "after writing its checkpoint: exit 75" in Path(log).read_text(errors="replace")
    return {"signal_at_step": step, "rc": rc, "stopped_cleanly": clean, "checkpoints": checkpoints}


def dense_ratio(ctx, dsmoe_step_s):
    """20 steps of the unconverted model (--variant dense): the DSMoE/dense step-time ratio."""
    from dsmoe.train import train

    steps = ctx.shape["dense_steps"]
    try:
        train(ctx.train_config(steps, checkpoint_every=10**6), ctx.work / "dense_init", ctx.data_dir,
              ctx.work / "dense_run", variant="dense")
    finally:
        drop_checkpoints(ctx.work / "dense_run")
    rows = train_log(ctx.work / "dense_run")
    timed = rows[1:] or rows
    dense_step_s = ctx.tokens_per_step / (sum(r["tokens_per_s"] for r in timed) / len(timed))
    return {"dense_step_s": dense_step_s, "dsmoe_step_s": dsmoe_step_s,
            "dsmoe_over_dense": dsmoe_step_s / dense_step_s if dsmoe_step_s else None}


def fsdp_kill_and_resume(ctx, init_name, wanda=False):
    """FSDP2 through accelerate launch (workflow/accelerate/fsdp.yaml) on 1 process: SIGTERM, resume, finish."""
    steps = ctx.shape["fsdp_steps"]
    config = ctx.write_config(f"fsdp_{init_name}.yaml", ctx.train_config(steps, checkpoint_every=10**6))
    run = ctx.work / f"fsdp_{init_name}_run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "workflow/accelerate/fsdp.yaml"),
                "--num_processes", "1", "--main_process_port", "0", "-m", "dsmoe.cli"]
    words = launcher + ["train", "--config", str(config), "--init", str(ctx.work / init_name), "--data", str(ctx.data_dir),
                        "--out", str(run)]
    env = {"ACCELERATE_USE_CPU": "true"} if ctx.device == "cpu" else {}
    first = stop_near_the_end(ctx, words, run, steps, ctx.work / f"fsdp_{init_name}_1.log", env=env)
    try:
        log = run_command(ctx, words, ctx.work / f"fsdp_{init_name}_2.log", ctx.budget("fsdp"), env=env)
        sharded = any((run / "checkpoints").glob("step_*/pytorch_model_fsdp_0"))
    finally:
        drop_checkpoints(run)
    result = {**first, "fsdp": "FSDP" in log, "resumed": "resuming from" in log, "sharded_checkpoint": sharded}
    if wanda:
        start, end = (load_file(next(Path(d).glob("*.safetensors"))) for d in (ctx.work / init_name, run / "model"))
        result["zeros_kept"] = all(torch.equal(end[k] == 0, v == 0) for k, v in start.items() if k.endswith("proj.weight"))
    if not (result["fsdp"] and result["resumed"] and result["stopped_cleanly"] and result.get("zeros_kept", True)):
        raise RuntimeError(f"FSDP kill and resume ({init_name}): {result}")
    return result


def perplexity_and_sweep(ctx):
    """`dsmoe eval ppl` and `dsmoe eval sweep --taus 0.5 0.95` of the trained model, then its logits on the
    sparse path against the masked reference at both τ."""
    model_dir = ctx.work / "dsmoe_run" / "model"
    out = {}
    run_command(ctx, dsmoe_cli("eval", "ppl", "--model", model_dir, "--data", ctx.data_dir, "--max-sequences", 8,
                               "--out", ctx.work / "ppl"), ctx.work / "ppl.log", ctx.budget("eval"))
    with open(ctx.work / "ppl" / "ppl.csv", newline="") as handle:
        out["ppl"] = list(csv.DictReader(handle))
    run_command(ctx, dsmoe_cli("eval", "sweep", "--model", model_dir, "--data", ctx.data_dir, "--max-sequences", 8,
                               "--taus", 0.5, 0.95, "--out", ctx.work / "sweep.csv"), ctx.work / "sweep.log", ctx.budget("eval"))
    with open(ctx.work / "sweep.csv", newline="") as handle:
        out["sweep"] = list(csv.DictReader(handle))
    out["sparse_vs_masked"] = sparse_against_masked(ctx, model_dir)
    return out


def sparse_against_masked(ctx, model_dir):
    import dsmoe
    from dsmoe.model import dsmoe_layers, modeling_dsmoe, sparse_ffn

    model, _ = dsmoe.load_model(str(model_dir), dtype=ctx.dtype, tokenizer=False)
    model = model.to(ctx.device).eval()
    ids = torch.randint(0, ctx.tokenizer_size, (2, min(ctx.shape["seq_len"], 256)), generator=torch.Generator().manual_seed(0))
    ids = ids.to(ctx.device)
    sparse_path = modeling_dsmoe.sparse_expert_ffn
    rows = []
    for tau in (0.5, 0.95):
        for layer in dsmoe_layers(model):
            layer.tau = tau
        with torch.no_grad():
            sparse = model(input_ids=ids).logits.float()
            modeling_dsmoe.sparse_expert_ffn = lambda x, wg, wu, wd, coef, active, act, **kw: sparse_ffn.masked_expert_ffn(
                x, wg.to(x.dtype), wu.to(x.dtype), wd.to(x.dtype), coef * active, act)
            try:
                masked = model(input_ids=ids).logits.float()
            finally:
                modeling_dsmoe.sparse_expert_ffn = sparse_path
        diff = (sparse - masked).abs().max().item()
        rows.append({"tau": tau, "max_abs_diff": diff, "max_abs_logit": masked.abs().max().item(),
                     "same_argmax": (sparse.argmax(-1) == masked.argmax(-1)).float().mean().item()})
    return rows


def batched_generation(ctx):
    """8 prompts through lm-eval's generate_until at batch 8 (left-padded) against batch 1: same text."""
    import dsmoe
    from lm_eval.api.instance import Instance

    from dsmoe.evaluation.harness import wrap_model

    model, tokenizer = dsmoe.load_model(str(ctx.work / "dsmoe_run" / "model"), dtype=ctx.dtype)
    model = model.to(ctx.device).eval()
    texts, seconds = {}, {}
    for batch in (1, 8):
        lm = wrap_model(model, tokenizer, batch_size=batch)
        requests = [Instance(request_type="generate_until", doc={}, idx=i, arguments=(
            p, {"until": ["\n\n"], "max_gen_toks": ctx.shape["gen_tokens"], "do_sample": False})) for i, p in enumerate(PROMPTS)]
        start = time.perf_counter()
        texts[batch] = lm.generate_until(requests, disable_tqdm=True)
        ctx.synchronize()
        seconds[batch] = time.perf_counter() - start
    same = sum(a == b for a, b in zip(texts[1], texts[8]))
    return {"prompts": len(PROMPTS), "same_text": same, "batch_1_s": seconds[1], "batch_8_s": seconds[8]}


def lm_eval_local(ctx):
    out = ctx.work / "bench"
    run_command(ctx, dsmoe_cli("eval", "lm-eval", "--model", ctx.work / "dsmoe_run" / "model", "--suite", "local",
                               "--limit", ctx.shape["lm_eval_limit"], "--out", out), ctx.work / "bench.log", ctx.budget("eval"))
    with open(out / "bench.csv", newline="") as handle:
        return [{k: row[k] for k in ("task", "metric", "value", "activated_params_pct")}
                for row in csv.DictReader(handle) if row["primary"] == "True"]


# _local_scalar_dense counts CPU scalars too (AdamW's step counters): on CUDA the synchronize and memcpy calls tell
SYNC_EVENTS = ("aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize",
               "cudaMemcpyAsync")


def profile_steps(ctx):
    """torch.profiler: host syncs (aten::_local_scalar_dense: .item(), .tolist(), bool() of a tensor; CUDA
    synchronize calls) and nonzero calls per training step, as the difference of a run of n + k steps and
    one of n steps (setup, the one log row and the final save count in both)."""
    n, k = 1, ctx.shape["profile_steps"]
    first, second = (profiled_counts(ctx, steps, f"profile_{steps}") for steps in (n, n + k))
    return {"steps": k, "per_step": {name: (second.get(name, 0) - first.get(name, 0)) / k for name in SYNC_EVENTS}}


def profiled_counts(ctx, steps, name):
    from torch.profiler import ProfilerActivity, profile

    from dsmoe.train import train

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            train(ctx.train_config(steps, checkpoint_every=10**6, log_every=10**6), ctx.work / "dsmoe_init", ctx.data_dir,
                  ctx.work / name)
    finally:
        drop_checkpoints(ctx.work / name)
    return {event.key: event.count for event in prof.key_averages() if event.key in SYNC_EVENTS}


def ffn_timing(ctx):
    out = ctx.work / "ffn"
    d, D = ctx.shape["ffn_shape"]
    command = [sys.executable, str(ROOT / "benchmarks" / "ffn_layer.py"), "--device", ctx.device, "--dtype", "bfloat16",
               "--tokens", *map(str, ctx.shape["ffn_tokens"]), "--fractions", "0.38", "--train-tokens", "0", "--quick",
               "--hidden", str(d), "--intermediate", str(D), "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=ctx.budget("ffn"))
    with open(out.with_suffix(".csv"), newline="") as handle:
        rows = [{"T": int(r["T"]), **{k: float(r[k]) for k in ("dense_ms", "sparse_ms", "active_dense_ms", "sparse/dense")}}
                for r in csv.DictReader(handle)]
    for row in rows:  # the goals: reported, never asserted
        row["sparse/active_dense"] = row["sparse_ms"] / row["active_dense_ms"]
        goals = {}
        if row["T"] >= 2048:
            goals["sparse <= 1.15x active-dense"] = row["sparse/active_dense"] <= 1.15
        if row["T"] >= 8192:
            goals["sparse <= 0.5x dense"] = row["sparse/dense"] <= 0.5
        row["goals_met"] = goals
    return rows


def dump(path, value):
    Path(path).write_text(json.dumps(value, indent=2, default=str))
