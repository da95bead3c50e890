"""FFN layer at LLaMA-1B shape: dense vs "active-dense" (a dense FFN of width f·D, the ideal) vs DSMoE.

Inference table: for each dtype, token count T and activation fraction f:
  - dense: the dense FFN (F.linear, as a transformers LLaMA runs it);
  - active_dense: a dense FFN of width f·D, the same kernels: the ideal the goals are set against;
  - active_dense_packed (CPU, where oneDNN runs the dtype): the active-dense FFN on oneDNN-packed
    weights, the kernels of the packed sparse path: how much of its lead is packing, not sparsity;
  - sparse: the DSMoE eval path as DSMoEMLP runs it (router GEMM + routing + sparse_expert_ffn on
    oneDNN-packed experts where oneDNN runs the dtype, else on the V_iᵀ cache);
  - sparse_unpacked: the same on the V_iᵀ cache (the path before packing); with --compare-cache
    also sparse_no_cache, on strided views of down_proj.
The router's logits are replaced by ones that open a chosen set of experts per token (k_t = f·n on
average, experts drawn at random).
Training table: forward + backward of the dense FFN vs the DSMoE training path (every expert, STE).

    .venv/bin/python benchmarks/ffn_layer.py --dtype float32 bfloat16 --fractions 0.38 --tokens 1 64 2048   # the goals
    .venv/bin/python benchmarks/ffn_layer.py --quick --threads 1 --clock cpu --stat min   # on a busy shared CPU
"""

import argparse
import math

import pandas as pd
import torch
import torch.nn.functional as F
from common import RESULTS, clock_for, check_target, default_dtype, devices, time_side_by_side, write_results

from dsmoe.model.modeling_dsmoe import DSMoEMLP, route
from dsmoe.model.sparse_ffn import (expert_down_weights, onednn_runs, pack_expert_weights, packed_expert_ffn,
                                    sparse_expert_ffn)


def dense_ffn(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def activation_logits(tokens, n, fraction, generator):
    """Logits ±4 that open k_t experts per token, k_t in {floor, ceil}(f·n) with mean f·n."""
    mean_k = fraction * n
    k = torch.full((tokens,), math.floor(mean_k))
    k += (torch.rand(tokens, generator=generator) < mean_k - math.floor(mean_k)).long()
    ranks = torch.rand(tokens, n, generator=generator).argsort(1).argsort(1)
    return torch.where(ranks < k.unsqueeze(1), 4.0, -4.0)


def inference_rows(device, dtype, tokens_list, fractions, d, D, n, repeats, budget_s, compare_cache, clock, stat):
    generator = torch.Generator().manual_seed(0)
    w_gate, w_up = (torch.randn(D, d, generator=generator) / d**0.5 for _ in range(2))
    w_down = torch.randn(d, D, generator=generator) / D**0.5
    w_gate, w_up, w_down = (w.to(device, dtype) for w in (w_gate, w_up, w_down))
    w_router = torch.randn(n, d, generator=generator).to(device, dtype) * 0.02
    down_t = expert_down_weights(w_down, n)
    onednn = onednn_runs(dtype, device)
    packed = pack_expert_weights(w_gate, w_up, w_down, n) if onednn else None
    rows = []
    for tokens in tokens_list:
        x = torch.randn(tokens, d, generator=generator).to(device, dtype)
        candidates, cases = {"dense": lambda: dense_ffn(x, w_gate, w_up, w_down)}, []
        for fraction in fractions:
            logits = activation_logits(tokens, n, fraction, generator).to(device)
            realized = logits.gt(0).float().mean().item()
            width = max(1, round(realized * D))
            narrow = [w_gate[:width].clone(), w_up[:width].clone(), w_down[:, :width].contiguous()]

            def sparse(logits=logits, cache=down_t, packed=packed):
                F.linear(x, w_router)  # the router GEMM, its logits replaced by the chosen pattern
                coef, active, _ = route(logits, "dsmoe", 0.5, 0, training=False)
                return sparse_expert_ffn(x, w_gate, w_up, w_down, coef, active, F.silu, down_t=cache, packed=packed)

            candidates[("active_dense", fraction)] = lambda narrow=narrow: dense_ffn(x, *narrow)
            candidates[("sparse", fraction)] = sparse
            if onednn:
                narrow_packed = pack_expert_weights(*narrow, 1)[0]
                candidates[("active_dense_packed", fraction)] = lambda e=narrow_packed: packed_expert_ffn(x, e, F.silu)
                candidates[("sparse_unpacked", fraction)] = lambda sparse=sparse: sparse(packed=None)
            if compare_cache:
                candidates[("sparse_no_cache", fraction)] = lambda sparse=sparse: sparse(cache=None, packed=None)
            cases.append((fraction, realized))
        with torch.inference_mode():
            times = time_side_by_side(candidates, device, repeats, budget_s=budget_s, clock=clock, stat=stat)
        for fraction, realized in cases:
            rows.append(inference_row(device, dtype, tokens, fraction, realized, times))
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    return rows


def inference_row(device, dtype, tokens, fraction, realized, times):
    row = {"device": device, "dtype": str(dtype).removeprefix("torch."), "T": tokens, "fraction": fraction,
           "realized_fraction": round(realized, 4), "dense_ms": times["dense"] * 1e3}
    for name in ("active_dense", "active_dense_packed", "sparse", "sparse_unpacked", "sparse_no_cache"):
        if (name, fraction) in times:
            row[f"{name}_ms"] = times[(name, fraction)] * 1e3
    row["sparse/dense"] = row["sparse_ms"] / row["dense_ms"]
    row["sparse/active_dense"] = row["sparse_ms"] / row["active_dense_ms"]
    if "active_dense_packed_ms" in row:
        row["sparse/active_dense_packed"] = row["sparse_ms"] / row["active_dense_packed_ms"]
    return row


def training_rows(device, dtype, tokens, d, D, n, repeats, budget_s, clock, stat):
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
                               "dsmoe": step(layer)}, device, repeats, budget_s=budget_s, clock=clock, stat=stat)
    return [{"device": device, "dtype": str(dtype).removeprefix("torch."), "T": tokens, "dense_ms": times["dense"] * 1e3,
             "dsmoe_train_ms": times["dsmoe"] * 1e3, "dsmoe/dense": times["dsmoe"] / times["dense"]}]


GOALS = {("float32", 2048): 1.10, ("bfloat16", 2048): 1.15, ("float32", 64): 1.3, ("bfloat16", 64): 1.3,
         ("float32", 1): 1.1, ("bfloat16", 1): 1.1}  # (dtype, T) -> sparse / active-dense at f = 0.38


def goal_lines(table):
    rows = table[(table.fraction - 0.38).abs() < 1e-6]
    for _, row in rows.iterrows():
        key = (row["dtype"], int(row["T"]))
        if key in GOALS:
            yield f"[{row['device']}] " + check_target(f"{key[0]} T={key[1]}", row["sparse/active_dense"], GOALS[key])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CPU, and CUDA when present")
    parser.add_argument("--dtype", nargs="+", default=None,
                        help="torch dtype names, each measured in turn (default float32 on CPU, bfloat16 on CUDA)")
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
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="median of the timed calls (an idle machine), or the fastest (a shared, busy one)")
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
        clock = clock_for(args.clock, device, torch.get_num_threads())
        for name in args.dtype or [None]:
            dtype = default_dtype(device, name)
            inference += inference_rows(device, dtype, args.tokens, args.fractions, args.hidden, args.intermediate,
                                        args.experts, repeats, budget_s, args.compare_cache, clock, args.stat)
            if args.train_tokens:
                training += training_rows(device, dtype, args.train_tokens, args.hidden, args.intermediate,
                                          args.experts, repeats, budget_s, clock, args.stat)

    table = pd.DataFrame(inference)
    shape = f"d={args.hidden} D={args.intermediate} n={args.experts}"
    pd.set_option("display.width", 200)
    print(f"\nInference, FFN layer {shape} (ms of {args.clock} time, {args.stat} of interleaved calls)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if training:
        print(f"\nTraining path, forward + backward, {shape}")
        print(pd.DataFrame(training).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nGoals (issue 16), f = 0.38, sparse / active-dense")
    for line in goal_lines(table):
        print(line)
    for row in training:
        print(f"[{row['device']}] " + check_target(f"training fwd+bwd T={row['T']}, dsmoe/dense", row["dsmoe/dense"], 1.10))
    write_results(table, args.out, shape=shape, clock=args.clock, stat=args.stat, training=training)


if __name__ == "__main__":
    main()
