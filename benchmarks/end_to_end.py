"""End to end: dense SmolLM2 vs DSMoE-converted SmolLM2, prefill and generation tokens/s per τ, training step.

An untrained conversion opens ~50-60% of the experts at any τ. By default (`--gates paper`) every
gate is set so that its expert opens for the FFN fraction a trained DSMoE reaches at that τ: the
paper's LLaMA-1B Table 4 activated-parameter shares converted to FFN shares (τ 0.3: 42%, 0.5: 38%,
0.7: 33%). Gate i becomes Y_i = s·r_i + t·μ/|μ|² (r_i random ⊥ μ, μ the mean FFN input of the layer on a
calibration text), t set by bisection so that σ(h·Y_i) > τ for the target share of calibration tokens
(the prompts timed are other text).
`--gates native` keeps the untrained gates. The measured share is printed next to each row.

    .venv/bin/python benchmarks/end_to_end.py --quick --threads 1 --clock cpu
The training step (forward, backward, AdamW; every expert computed, STE, sparsity loss) is
benchmarks/train_throughput.py's, timed here with the same clock as the rest.
"""

import argparse
import math
import time

import pandas as pd
import pydoc_data.topics
import torch
from common import RESULTS, check_target, clock_for, default_dtype, devices, time_side_by_side, write_results

import dsmoe

PAPER_FFN_FRACTION = {0.3: 0.42, 0.5: 0.38, 0.7: 0.33}  # LLaMA-1B, Table 4, attention/embeddings excluded
LOGIT_SPREAD = 4.0  # std of s·h·r_i over tokens: wide enough that the shift t stays small next to it
DEFAULT_MODEL = "/work/main/resources/smollm2-135m-dense"


def corpus_ids(tokenizer, tokens):
    text = "\n\n".join(pydoc_data.topics.topics.values())
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"the calibration text has only {ids.shape[1]} tokens, {tokens} requested")
    return ids


@torch.no_grad()
def set_gates_for_fraction(model, input_ids, fraction, tau, seed=0):
    """Set every gate so that σ(h·Y_i) > τ for `fraction` of the calibration tokens (see module doc).

    One forward pass: a pre-hook calibrates each layer on its own input, which already reflects the
    earlier layers' new gates."""
    generator = torch.Generator().manual_seed(seed)
    threshold = math.log(tau / (1 - tau))

    def calibrate(layer, args):
        h = args[0].reshape(-1, args[0].shape[-1]).double().cpu()
        mean = h.mean(0)
        along_mean = (h @ mean / mean.dot(mean)).unsqueeze(1)  # ≈ 1 for every token
        directions = torch.randn(h.shape[1], layer.n_experts, generator=generator, dtype=torch.float64)
        directions -= torch.outer(mean, mean @ directions) / mean.dot(mean)  # r_i ⊥ μ: h·r_i has mean 0
        spread = h @ directions
        directions *= LOGIT_SPREAD / spread.std(0)
        spread *= LOGIT_SPREAD / spread.std(0)
        low, high = torch.full((layer.n_experts,), -100.0, dtype=torch.float64), torch.full((layer.n_experts,), 100.0, dtype=torch.float64)
        for _ in range(60):  # bisection on each expert's shift t
            shift = (low + high) / 2
            too_few = (spread + shift * along_mean > threshold).double().mean(0) < fraction
            low, high = torch.where(too_few, shift, low), torch.where(too_few, high, shift)
        gate = directions + torch.outer(mean / mean.dot(mean), shift)  # d x n
        layer.gate.weight.copy_(gate.t().to(layer.gate.weight))

    hooks = [layer.register_forward_pre_hook(calibrate) for layer in dsmoe.dsmoe_layers(model)]
    try:
        model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()


def measured_fraction(model, fn):
    with dsmoe.RoutingRecorder(model) as recorder:
        fn()
    active = recorder.mean_active_experts()
    return sum(active) / len(active) / dsmoe.dsmoe_layers(model)[0].n_experts


def inference_rows(dense, converted, tokenizer, device, taus, gates, prefill_tokens, new_tokens, repeats, budget_s, clock):
    ids = corpus_ids(tokenizer, prefill_tokens + 512).to(device)
    prompt, calibration = ids[:, :prefill_tokens], ids[:, -512:]  # calibrated on other text than timed
    gate_states = {}
    for tau in taus:
        dsmoe.set_tau(converted, tau)
        if gates == "paper":
            set_gates_for_fraction(converted, calibration, PAPER_FFN_FRACTION[tau], tau)
        gate_states[tau] = [layer.gate.weight.detach().clone() for layer in dsmoe.dsmoe_layers(converted)]

    def with_tau(tau, fn):
        def run():
            dsmoe.set_tau(converted, tau)
            with torch.no_grad():
                for layer, weight in zip(dsmoe.dsmoe_layers(converted), gate_states[tau]):
                    layer.gate.weight.copy_(weight)
            return fn(converted)
        return run

    short = ids[:, :16]
    generate_args = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, attention_mask=torch.ones_like(short))
    work = {"prefill": lambda m: m(prompt, use_cache=True, logits_to_keep=1),
            "generate": lambda m: m.generate(short, **generate_args)}
    rows = []
    with torch.inference_mode():
        for phase, fn in work.items():
            candidates = {"dense": lambda fn=fn: fn(dense)}
            candidates.update({tau: with_tau(tau, fn) for tau in taus})
            times = time_side_by_side(candidates, device, repeats, budget_s=budget_s, clock=clock)
            tokens = prefill_tokens if phase == "prefill" else new_tokens
            for name, seconds in times.items():
                share = 1.0 if name == "dense" else measured_fraction(converted, with_tau(name, fn))
                rows.append({"device": device, "phase": phase, "model": "dense" if name == "dense" else "dsmoe",
                             "tau": None if name == "dense" else name, "gates": None if name == "dense" else gates,
                             "ffn_active_fraction": round(share, 4), "tokens": tokens, "seconds": seconds,
                             "tokens_per_s": tokens / seconds, "time/dense": seconds / times["dense"]})
                print(rows[-1], flush=True)
    return rows


def training_rows(dense, converted, device, batch, seq_len, repeats, budget_s, clock):
    """One optimizer step (benchmarks/train_throughput.py's) of each model on random tokens, side by side."""
    from train_throughput import training_step

    ids = torch.randint(0, dense.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    steps = {}
    for variant, model in (("dense", dense), ("dsmoe", converted)):
        optimizer = torch.optim.AdamW(model.train().parameters(), lr=1e-5)
        steps[variant] = training_step(model, variant, optimizer, ids.to(device), device)
    times = time_side_by_side(steps, device, repeats, budget_s=budget_s, clock=clock)
    dense.eval(), converted.eval()
    return [{"device": device, "phase": "train_step", "model": name, "tokens": batch * seq_len, "seconds": seconds,
             "tokens_per_s": batch * seq_len / seconds, "time/dense": seconds / times["dense"]}
            for name, seconds in times.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="dense SmolLM2 (a directory or a dsmoe short name)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CPU, and CUDA when present")
    parser.add_argument("--dtype", default=None, help="torch dtype name (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="thresholds τ")
    parser.add_argument("--gates", choices=["paper", "native"], default="paper",
                        help="paper: gates set to the paper's FFN share per τ; native: untrained conversion gates")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for prefill (batch 1)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated (greedy, batch 1, 16-token prompt)")
    parser.add_argument("--train-batch", type=int, default=4, help="training step: sequences (0 skips it)")
    parser.add_argument("--train-seq", type=int, default=256, help="training step: tokens per sequence")
    parser.add_argument("--repeats", type=int, default=None,
                        help="at most this many timed rounds per phase (default 10; 5 with --quick), within a time budget")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, a smaller time budget")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall-clock time, or process CPU time (with --threads 1 on a busy shared CPU)")
    parser.add_argument("--out", default=str(RESULTS / "end_to_end"), help="output path stem (.csv and .json written)")
    args = parser.parse_args()
    if args.gates == "paper" and (missing := [t for t in args.taus if t not in PAPER_FFN_FRACTION]):
        raise ValueError(f"--gates paper knows τ {sorted(PAPER_FFN_FRACTION)}, not {missing}; use --gates native")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 10)
    budget_s = 30.0 if args.quick else 120.0  # per phase; at least 2 rounds run whatever it is

    rows = []
    for device in devices(args.device):
        dtype = default_dtype(device, args.dtype)
        start = time.perf_counter()
        dense, tokenizer = dsmoe.load_model(args.model, dtype=dtype)
        converted = dsmoe.convert(dsmoe.load_model(args.model, dtype=dtype)[0], n_experts=8)
        dense, converted = dense.to(device).eval(), converted.to(device).eval()
        print(f"[{device}] loaded and converted in {time.perf_counter() - start:.0f}s", flush=True)
        clock = clock_for(args.clock, device, torch.get_num_threads())
        rows += inference_rows(dense, converted, tokenizer, device, args.taus, args.gates, args.prefill_tokens,
                               args.new_tokens, repeats, budget_s, clock)
        if args.train_batch:
            rows += training_rows(dense, converted, device, args.train_batch, args.train_seq, min(repeats, 3), budget_s, clock)
        del dense, converted

    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(f"\nSmolLM2-135M, dense vs DSMoE (n=8), gates: {args.gates}, {args.clock} time, best of interleaved calls")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for row in rows:
        if row["phase"] == "train_step" and row["model"] == "dsmoe":
            print(f"[{row['device']}] " + check_target("training step time, dsmoe/dense", row["time/dense"], 1.10))
    write_results(table, args.out, gates=args.gates, clock=args.clock, paper_ffn_fraction=PAPER_FFN_FRACTION)


if __name__ == "__main__":
    main()
