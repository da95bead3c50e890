"""`make gpu-check`: a first look at a new GPU node, as one short report.

1. the CUDA tests (`pytest -m gpu`);
2. 50 bf16 training steps (the real trainer, `train.mixed_precision: bf16`) of SmolLM2-135M
   converted to DSMoE (n 8) on the builtin data: tokens/s and MFU (model FLOPs utilisation:
   6·N + 12·L·d·T FLOPs per token, every expert counted as DSMoE training computes them all,
   over the GPU's dense bf16 peak);
3. the FFN layer at LLaMA-1B shape in bf16, sparse vs dense at T = 1, 64, 2048, 8192 (ffn_layer.py).
Writes benchmarks/results/gpu_check.{csv,json} (and ffn_layer's gpu_check_ffn.{csv,json}).

    .venv/bin/python benchmarks/gpu_check.py                    # on a GPU node
    .venv/bin/python benchmarks/gpu_check.py --device cpu --model DIR --seq-len 32 --batch 4 --steps 3 \
        --no-pytest --ffn-shape 64 256 --ffn-tokens 1 16          # the plumbing, on a CPU
"""

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
from common import RESULTS, write_results

import dsmoe
from dsmoe import data
from dsmoe.config import validate_config
from dsmoe.hub import save_model
from dsmoe.train import train

ROOT = Path(__file__).resolve().parents[1]
# dense bf16 tensor-core peak, TFLOPS (vendor data sheets); the first name found in the device's wins
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989), ("B200", 2250),
               ("A100", 312), ("L40S", 362), ("L4", 121), ("A10", 125)]


def peak_tflops(device_name):
    return next((peak for name, peak in PEAK_TFLOPS if name in device_name), None)


def flops_per_token(model, seq_len):
    """6 x the weights of every matmul (lm_head included, embeddings looked up) + 12·L·d·T for attention."""
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config.get_text_config()
    return 6 * matmul + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def cuda_tests():
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                            capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    return {"returncode": result.returncode, "summary": lines[-1] if lines else result.stderr[-500:]}


def training(args, work):
    """`args.steps` steps of the trainer in bf16; tokens/s after the first logged interval, and MFU."""
    model, tokenizer = dsmoe.load_model(args.model, dtype=torch.float32)
    converted = dsmoe.convert(model, n_experts=8, tau=0.5)
    save_model(converted, tokenizer, work / "init")
    every = max(1, args.steps // 5)
    config = validate_config({"data": {"seq_len": args.seq_len, "val_sequences": 2}, "train": {
        "tokens": args.steps * args.batch * args.seq_len, "batch_size": args.batch, "micro_batch_size": args.batch,
        "lr": 1e-4, "warmup_steps": 0, "mixed_precision": "bf16", "log_every": every, "checkpoint_every": 10**9}})
    data.prepare(config, tokenizer, work / "data")
    train(config, work / "init", work / "data", work / "run")
    with open(work / "run" / "train_log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    timed = rows[1:] or rows  # the first interval holds the warmup
    tokens_per_s = sum(float(r["tokens_per_s"]) for r in timed) / len(timed)
    row = {"model": Path(args.model).name, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
           "tokens_per_s": tokens_per_s, "final_lm_loss": float(rows[-1]["lm_loss"]),
           "flops_per_token": flops_per_token(converted, args.seq_len)}
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name()) if args.device == "cuda" else None)
    row["peak_tflops"], row["mfu"] = peak, tokens_per_s * row["flops_per_token"] / (peak * 1e12) if peak else None
    return row


def ffn_timing(args):
    out = args.out.with_name(args.out.name + "_ffn")
    command = [sys.executable, str(ROOT / "benchmarks" / "ffn_layer.py"), "--device", args.device, "--dtype", "bfloat16",
               "--tokens", *map(str, args.ffn_tokens), "--fractions", "0.38", "--train-tokens", "0", "--quick",
               "--hidden", str(args.ffn_shape[0]), "--intermediate", str(args.ffn_shape[1]), "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    with open(out.with_suffix(".csv"), newline="") as handle:
        return [{"T": int(row["T"]), **{k: float(row[k]) for k in ("dense_ms", "sparse_ms", "active_dense_ms", "sparse/dense")}}
                for row in csv.DictReader(handle)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="smollm2-135m", help="dense model to convert and train (default SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: from its name)")
    parser.add_argument("--no-pytest", action="store_true", help="skip the CUDA tests")
    parser.add_argument("--ffn-shape", type=int, nargs=2, default=[2048, 8192], metavar=("d", "D"))
    parser.add_argument("--ffn-tokens", type=int, nargs="+", default=[1, 64, 2048, 8192])
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check", help="output path stem (.csv, .json)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"gpu-check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                 "run it on a GPU node with a CUDA build of torch")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    report = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda}
    if not args.no_pytest:
        report["cuda_tests"] = cuda_tests()
    with tempfile.TemporaryDirectory(prefix="dsmoe-gpu-check-") as work:
        report["training"] = training(args, Path(work))
    report["ffn"] = ffn_timing(args)
    print_report(report)
    write_results(pd.DataFrame(report["ffn"]), args.out, **{k: v for k, v in report.items() if k != "ffn"})
    return 0 if report.get("cuda_tests", {}).get("returncode", 0) == 0 else 1


def print_report(report):
    t = report["training"]
    mfu = f"MFU {t['mfu']:.1%} of {t['peak_tflops']:g} TFLOPS" if t["mfu"] else "MFU n/a (pass --peak-tflops)"
    print(f"\ngpu-check on {report['device']} (torch {report['torch']}, CUDA {report['cuda']})")
    if "cuda_tests" in report:
        print(f"  CUDA tests (pytest -m gpu): {report['cuda_tests']['summary']}")
    print(f"  training {t['model']} as DSMoE (n 8), bf16, {t['steps']} steps of {t['batch']} x {t['seq_len']} tokens: "
          f"{t['tokens_per_s']:,.0f} tokens/s, {mfu}, final LM loss {t['final_lm_loss']:.3f}")
    print("  FFN layer, bf16, 38% of experts active (ms):")
    for row in report["ffn"]:
        print(f"    T={row['T']:>5}  dense {row['dense_ms']:8.3f}  sparse {row['sparse_ms']:8.3f}  "
              f"active-dense {row['active_dense_ms']:8.3f}  sparse/dense {row['sparse/dense']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
