"""What limits generation at batch 1: torch.profiler over greedy generation, dense vs DSMoE SmolLM2-135M.

The gates are set as in end_to_end.py (`--gates paper`, τ = 0.5: 38% of the FFN per token). Per
model and dtype: the ops that take the most self CPU time, their call counts per generated token
and mean µs per call. Writes benchmarks/results/decode_profile.{csv,json}.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/decode_profile.py --dtype float32 bfloat16
"""

import argparse

import pandas as pd
import torch
from common import RESULTS, write_results
from end_to_end import DEFAULT_MODEL, PAPER_FFN_FRACTION, corpus_ids, set_gates_for_fraction
from torch.profiler import profile

import dsmoe

GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "mkldnn::_linear_pointwise"}


def profile_rows(model, name, dtype, short, new_tokens, pad_token_id, top):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=pad_token_id, attention_mask=torch.ones_like(short))
    with torch.inference_mode():
        model.generate(short, **kwargs)  # warm-up: caches, packed experts
        with profile() as prof:
            model.generate(short, **kwargs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    gemm = [e for e in events if e.key in GEMMS]
    rows = [{"model": name, "dtype": dtype, "op": "ALL GEMMs", "calls_per_token": sum(e.count for e in gemm) / new_tokens,
             "ms_per_token": sum(e.self_cpu_time_total for e in gemm) / 1e3 / new_tokens,
             "us_per_call": sum(e.self_cpu_time_total for e in gemm) / max(1, sum(e.count for e in gemm)),
             "share": sum(e.self_cpu_time_total for e in gemm) / total},
            {"model": name, "dtype": dtype, "op": "ALL", "calls_per_token": sum(e.count for e in events) / new_tokens,
             "ms_per_token": total / 1e3 / new_tokens, "us_per_call": total / max(1, sum(e.count for e in events)), "share": 1.0}]
    for event in events[:top]:
        rows.append({"model": name, "dtype": dtype, "op": event.key, "calls_per_token": event.count / new_tokens,
                     "ms_per_token": event.self_cpu_time_total / 1e3 / new_tokens,
                     "us_per_call": event.self_cpu_time_total / event.count, "share": event.self_cpu_time_total / total})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="dense SmolLM2 (a directory or a dsmoe short name)")
    parser.add_argument("--dtype", nargs="+", default=["float32"], help="torch dtype names, each in turn")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated (greedy, batch 1, 16-token prompt)")
    parser.add_argument("--top", type=int, default=8, help="ops listed per model")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=str(RESULTS / "decode_profile"), help="output path stem (.csv and .json written)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.dtype:
        dtype = getattr(torch, name)
        dense, tokenizer = dsmoe.load_model(args.model, dtype=dtype)
        converted = dsmoe.convert(dsmoe.load_model(args.model, dtype=dtype)[0], n_experts=8).eval()
        ids = corpus_ids(tokenizer, 16 + 512)
        dsmoe.set_tau(converted, 0.5)
        set_gates_for_fraction(converted, ids[:, -512:], PAPER_FFN_FRACTION[0.5], 0.5)
        for label, model in (("dense", dense.eval()), ("dsmoe τ=0.5", converted)):
            rows += profile_rows(model, label, name, ids[:, :16], args.new_tokens, tokenizer.pad_token_id, args.top)
        del dense, converted
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    write_results(table, args.out, new_tokens=args.new_tokens)


if __name__ == "__main__":
    main()
