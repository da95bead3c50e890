"""Training tokens/s: DSMoE (every expert computed, STE, sparsity loss) vs dense training of the same model.

One optimizer step each (forward with LM loss [+ λ·sparsity loss], backward, AdamW), measured
side by side in one process, interleaved, after a warmup step; random token batches. Prints a table
with the ratio and writes benchmarks/results/train_throughput.{csv,json}.

    .venv/bin/python benchmarks/train_throughput.py                              # SmolLM2-135M, CPU
    .venv/bin/python benchmarks/train_throughput.py --seq-len 1024 --batch 8 --device cuda
"""

import argparse
import copy
from pathlib import Path

import pandas as pd
import torch
from common import RESULTS, devices, time_side_by_side, write_results

import dsmoe
from dsmoe.train import auxiliary_losses

DENSE_COPY = Path(__file__).resolve().parents[1] / "resources" / "smollm2-135m-dense"


def training_step(model, variant, optimizer, input_ids, device):
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            sparse, _ = auxiliary_losses(model, variant)
            if sparse is not None:
                loss = loss + sparse
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DENSE_COPY) if DENSE_COPY.exists() else "smollm2-135m",
                        help="dense base model (default: the SmolLM2-135M dense copy)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per model (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per model first (default 1)")
    parser.add_argument("--n-experts", type=int, default=8, help="experts per FFN (default 8)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="device (default cpu)")
    parser.add_argument("--out", default=str(RESULTS / "train_throughput.csv"), help="result file (.csv and .json)")
    args = parser.parse_args()

    rows = []
    for device in devices(args.device):
        dense, _ = dsmoe.load_model(args.model, dtype=torch.float32)
        converted = dsmoe.convert(copy.deepcopy(dense), n_experts=args.n_experts, variant="dsmoe")
        input_ids = torch.randint(0, dense.config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
        steps = {}
        for variant, model in (("dense", dense), ("dsmoe", converted)):
            model.to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            steps[variant] = training_step(model, variant, optimizer, input_ids.to(device), device)
        seconds = time_side_by_side(steps, device, repeats=args.steps, warmup=args.warmup)
        tokens = args.batch * args.seq_len
        for variant, s in seconds.items():
            rows.append({"device": device, "model": Path(args.model).name, "variant": variant, "seq_len": args.seq_len,
                         "batch": args.batch, "s_per_step": s, "tokens_per_s": tokens / s,
                         "time_vs_dense": s / seconds["dense"]})
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    write_results(df, args.out)


if __name__ == "__main__":
    main()
