"""FFN layer at LLaMA-1B shape: dense vs "active-dense" (a dense FFN of width f·D, the ideal) vs DSMoE.

Inference table: for each token count T and activation fraction f, the dense FFN, the active-dense
FFN and the DSMoE eval path (gate GEMM + routing + sparse_expert_ffn with the per-expert V_iᵀ
cache; with --compare-cache also without it, on strided views of down_proj). The router's logits
are replaced by ones that open a chosen set of experts per token (k_t = f·n on average, experts
drawn at random).
Training table: forward + backward of the dense FFN vs the DSMoE training path (every expert, STE).

    .venv/bin/python benchmarks/ffn_layer.py --quick --threads 1   # CPU (+ CUDA if present), a few minutes
    .venv/bin/python benchmarks/ffn_layer.py --tokens 1 64 --fractions 0.38 --hidden 256 --intermediate 1024
"""

import argparse
import math

import pandas as pd
import torch
import torch.nn.functional as F
from common import RESULTS, clock_for, check_target, default_dtype, devices, time_side_by_side, write_results

from dsmoe.model.modeling_dsmoe import DSMoEMLP, route
from dsmoe.model.sparse_ffn import expert_down_weights, sparse_expert_ffn


def dense_ffn(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def activation_logits(tokens, n, fraction, generator):
    """Logits ±4 that open k_t experts per token, k_t in {floor, ceil}(f·n) with mean f·n."""
    mean_k = fraction * n
    k = torch.full((tokens,), math.floor(mean_k))
    k += (torch.rand(tokens, generator=generator) < mean_k - math.floor(mean_k)).long()
    ranks = torch.rand(tokens, n, generator=generator).argsort(1).argsort(1)
    return torch.where(ranks < k.unsqueeze(1), 4.0, -4.0)


def inference_rows(device, dtype, tokens_list, fractions, d, D, n, repeats, budget_s, compare_cache, clock):
    generator = torch.Generator().manual_seed(0)
    w_gate, w_up = (torch.randn(D, d, generator=generator) / d**0.5 for _ in range(2))
    w_down = torch.randn(d, D, generator=generator) / D**0.5
    w_gate, w_up, w_down = (w.to(device, dtype) for w in (w_gate, w_up, w_down))
    w_router = torch.randn(n, d, generator=generator).to(device, dtype) * 0.02
    down_t = expert_down_weights(w_down, n)
    rows = []
    for tokens in tokens_list:
        x = torch.randn(tokens, d, generator=generator).to(device, dtype)
        candidates, cases = {"dense": lambda: dense_ffn(x, w_gate, w_up, w_down)}, []
        for fraction in fractions:
            logits = activation_logits(tokens, n, fraction, generator).to(device)
            realized = logits.gt(0).float().mean().item()
            width = max(1, round(realized * D))
            narrow = [w_gate[:width].clone(), w_up[:width].clone(), w_down[:, :width].contiguous()]

            def sparse(logits=logits, cache=down_t):
                F.linear(x, w_router)  # the router GEMM, its logits replaced by the chosen pattern
                coef, active, _ = route(logits, "dsmoe", 0.5, 0, training=False)
                return sparse_expert_ffn(x, w_gate, w_up, w_down, coef, active, F.silu, down_t=cache)

            candidates[("active_dense", fraction)] = lambda narrow=narrow: dense_ffn(x, *narrow)
            candidates[("sparse", fraction)] = sparse
            if compare_cache:
                candidates[("sparse_no_cache", fraction)] = lambda sparse=sparse: sparse(cache=None)
            cases.append((fraction, realized))
        times = time_side_by_side(candidates, device, repeats, budget_s=budget_s, clock=clock)
        for fraction, realized in cases:
            row = {"device": device, "dtype": str(dtype).removeprefix("torch."), "T": tokens, "fraction": fraction,
                   "realized_fraction": round(realized, 4), "dense_ms": times["dense"] * 1e3,
                   "active_dense_ms": times[("active_dense", fraction)] * 1e3,
                   "sparse_ms": times[("sparse", fraction)] * 1e3}
            if compare_cache:
                row["sparse_no_cache_ms"] = times[("sparse_no_cache", fraction)] * 1e3
            row["sparse/dense"] = row["sparse_ms"] / row["dense_ms"]
            row["sparse/active_dense"] = row["sparse_ms"] / row["active_dense_ms"]
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def training_rows(device, dtype, tokens, d, D, n, repeats, budget_s, clock):
    """Forward + backward: dense SwiGLU vs DSMoEMLP in training mode (gate, route, STE, masked combine)."""
    torch.manual_seed(0)
    dense = torch.nn.Module()
    dense.gate_proj, dense.up_proj = torch.nn.Linear(d, D, bias=False), torch.nn.Linear(d, D, bias=False)
    dense.down_proj, dense.act_fn = torch.nn.Linear(D, d, bias=False), torch.nn.SiLU()
    dense.to(device, dtype)
    layer = DSMoEMLP.from_dense(dense, n_experts=n).train()
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)

    def step(forward):
        def run():
            forward(x).float().square().mean().backward()
        return run

    times = time_side_by_side({"dense": step(lambda h: dense_ffn(h, dense.gate_proj.weight, dense.up_proj.weight,
                                                                 dense.down_proj.weight)),
                               "dsmoe": step(layer)}, device, repeats, budget_s=budget_s, clock=clock)
    return [{"device": device, "dtype": str(dtype).removeprefix("torch."), "T": tokens, "dense_ms": times["dense"] * 1e3,
             "dsmoe_train_ms": times["dsmoe"] * 1e3, "dsmoe/dense": times["dsmoe"] / times["dense"]}]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CPU, and CUDA when present")
    parser.add_argument("--dtype", default=None, help="torch dtype name (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 64, 512, 2048], help="token counts T")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.38, 0.5, 0.75, 1.0],
                        help="fractions of (token, expert) pairs active")
    parser.add_argument("--hidden", type=int, default=2048, help="d (LLaMA-1B: 2048)")
    parser.add_argument("--intermediate", type=int, default=8192, help="D (LLaMA-1B: 8192)")
    parser.add_argument("--experts", type=int, default=8, help="n experts")
    parser.add_argument("--train-tokens", type=int, default=512, help="T for the training table (0 skips it)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="at most this many timed rounds per T (default 20; 10 with --quick), within a time budget")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and a smaller time budget")
    parser.add_argument("--compare-cache", action="store_true",
                        help="also time the sparse path without the per-expert V_iᵀ cache (strided views of down_proj)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall-clock time, or process CPU time (with --threads 1 on a busy shared CPU)")
    parser.add_argument("--out", default=str(RESULTS / "ffn_layer"), help="output path stem (.csv and .json written)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.intermediate % args.experts:
        raise ValueError(f"--intermediate {args.intermediate} is not divisible by --experts {args.experts}")
    repeats = args.repeats or (10 if args.quick else 20)
    budget_s = 15.0 if args.quick else 90.0  # per T; at least 2 rounds run whatever it is

    inference, training = [], []
    for device in devices(args.device):
        dtype, clock = default_dtype(device, args.dtype), clock_for(args.clock, device, torch.get_num_threads())
        inference += inference_rows(device, dtype, args.tokens, args.fractions, args.hidden, args.intermediate,
                                    args.experts, repeats, budget_s, args.compare_cache, clock)
        if args.train_tokens:
            training += training_rows(device, dtype, args.train_tokens, args.hidden, args.intermediate,
                                      args.experts, repeats, budget_s, clock)

    table = pd.DataFrame(inference)
    shape = f"d={args.hidden} D={args.intermediate} n={args.experts}"
    pd.set_option("display.width", 200)
    print(f"\nInference, FFN layer {shape} (ms of {args.clock} time, best of interleaved calls)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if training:
        print(f"\nTraining path, forward + backward, {shape}")
        print(pd.DataFrame(training).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nTargets")
    for device in table.device.unique():
        rows = table[table.device == device]
        big = rows[rows["T"] == rows["T"].max()]
        for summary in ("median", "max"):
            print(f"[{device}] " + check_target(f"sparse/active-dense at T={rows['T'].max()} ({summary} over fractions)",
                                                big["sparse/active_dense"].agg(summary), 1.15))
        decode = rows[(rows["T"] == 1) & ((rows.fraction - 0.38).abs() < 1e-6)]
        if len(decode):
            print(f"[{device}] " + check_target("decode T=1, 38% active, sparse/dense", decode["sparse/dense"].iloc[0], 0.6))
    for row in training:
        print(f"[{row['device']}] " + check_target(f"training fwd+bwd T={row['T']}, dsmoe/dense", row["dsmoe/dense"], 1.10))
    write_results(table, args.out, shape=shape, clock=args.clock, training=training)


if __name__ == "__main__":
    main()
