"""Each eval schedule of `dsmoe/model/sparse_ffn.py` forced, per dtype and token count, as a forward pass sees it.

A model's forward reads every layer's weights from memory once; a benchmark that repeats one small
layer reads them from cache. So here each schedule runs over `--layers` layers' weights in turn
(SmolLM2's 30 by default, 10.6 MB each in fp32) and the time is per layer, against the dense FFN
over the same layers. The router is left out (its cost is the same for every schedule); experts
are opened at random for f·n per token on average. These are the measurements behind
`schedule()`'s thresholds. Writes benchmarks/results/schedules.{csv,json}.

    .venv/bin/python benchmarks/schedules.py --dtype float32 bfloat16 --tokens 1 2 4 8 16 32 64 128 256 512
"""

import argparse
import statistics
import time

import pandas as pd
import torch
import torch.nn.functional as F
from common import RESULTS, write_results
from ffn_layer import activation_logits, dense_ffn

from dsmoe.model import sparse_ffn
from dsmoe.model.modeling_dsmoe import route


def random_layers(count, d, D, n, dtype, generator):
    layers = []
    for _ in range(count):
        w_gate, w_up = (torch.randn(D, d, generator=generator).to(dtype) / d**0.5 for _ in range(2))
        w_down = (torch.randn(d, D, generator=generator) / D**0.5).to(dtype)
        packed = sparse_ffn.pack_expert_weights(w_gate, w_up, w_down, n) if sparse_ffn.onednn_runs(dtype) else None
        layers.append((w_gate, w_up, w_down, sparse_ffn.expert_down_weights(w_down, n), packed))
    return layers


def run_schedule(name, x, layer, coef, active):
    w_gate, w_up, w_down, down_t, packed = layer
    if name == "dense":
        return dense_ffn(x, w_gate, w_up, w_down)
    if name == "union":
        return sparse_ffn._union_of_experts(x, w_gate, w_up, down_t, coef * active, active.any(0), F.silu)
    if name == "grouped":
        return sparse_ffn._grouped_by_expert(x, w_gate, w_up, down_t, coef, active, F.silu)
    if name == "masked":
        return sparse_ffn.masked_expert_ffn(x, w_gate, w_up, w_down, coef * active, F.silu)
    if name == "packed" and x.shape[0] == 1:
        return sparse_ffn._packed_one_token(x, packed, coef, active, F.silu)
    return sparse_ffn._packed_grouped_by_expert(x, packed, coef, active, F.silu)


def time_schedules(layers, tokens, fraction, dtype, rounds, generator):
    d, n = layers[0][0].shape[1], layers[0][3].shape[0]
    x = torch.randn(tokens, d, generator=generator).to(dtype)
    routes = [route(activation_logits(tokens, n, fraction, generator), "dsmoe", 0.5, 0, training=False)[:2]
              for _ in layers]
    names = ["dense", "union", "grouped", "masked"] + (["packed"] if layers[0][4] is not None else [])
    times = {name: [] for name in names}
    with torch.inference_mode():
        for round_ in range(rounds + 1):  # the first round warms up
            for name in names:
                start = time.perf_counter()
                for layer, (coef, active) in zip(layers, routes):
                    run_schedule(name, x, layer, coef.to(dtype), active)
                if round_:
                    times[name].append((time.perf_counter() - start) / len(layers))
    medians = {name: statistics.median(values) for name, values in times.items()}
    row = {"dtype": str(dtype).removeprefix("torch."), "T": tokens, "fraction": fraction}
    row.update({f"{name}_ms": seconds * 1e3 for name, seconds in medians.items()})
    row.update({f"{name}/dense": seconds / medians["dense"] for name, seconds in medians.items() if name != "dense"})
    fastest = min(medians, key=medians.get)
    chosen = sparse_ffn.schedule(tokens, layers[0][3].shape[1] * d, dtype, layers[0][4] is not None)
    return {**row, "fastest": fastest, "schedule()": chosen}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], help="torch dtype names")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--fraction", type=float, default=0.38, help="share of (token, expert) pairs active")
    parser.add_argument("--hidden", type=int, default=576, help="d (SmolLM2-135M: 576)")
    parser.add_argument("--intermediate", type=int, default=1536, help="D (SmolLM2-135M: 1536)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=30, help="layers' weights cycled through (SmolLM2: 30)")
    parser.add_argument("--rounds", type=int, default=15, help="timed passes over the layers per schedule")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=str(RESULTS / "schedules"), help="output path stem (.csv and .json written)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator, rows = torch.Generator().manual_seed(0), []
    for name in args.dtype:
        dtype = getattr(torch, name)
        layers = random_layers(args.layers, args.hidden, args.intermediate, args.experts, dtype, generator)
        for tokens in args.tokens:
            rounds = max(3, args.rounds * 32 // max(32, tokens))
            rows.append(time_schedules(layers, tokens, args.fraction, dtype, rounds, generator))
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    write_results(table, args.out, shape=f"d={args.hidden} D={args.intermediate} n={args.experts}", layers=args.layers)


if __name__ == "__main__":
    main()
