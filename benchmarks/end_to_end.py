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
import copy
import math
import time

import pandas as pd
import pydoc_data.topics
import torch
from common import RESULTS, check_target, clock_for, default_dtype, devices, time_side_by_side, write_results

import dsmoe
from dsmoe.model.modeling_dsmoe import decoder_layers
from dsmoe.model.sparse_ffn import onednn_runs, pack_expert_weights, packed_expert_ffn

PAPER_FFN_FRACTION = {0.3: 0.42, 0.5: 0.38, 0.7: 0.33}  # LLaMA-1B, Table 4, attention/embeddings excluded
LOGIT_SPREAD = 4.0  # std of s·h·r_i over tokens: wide enough that the shift t stays small next to it
DEFAULT_MODEL = "smollm2-135m"


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


def routing_shares(model, fn):
    """(mean share of (token, expert) pairs active, mean share of experts in the union of a call's tokens)."""
    active, union = [], []

    def record(layer, args, output):
        active.append(layer.last_active.float().mean().item())
        union.append(layer.last_active.any(0).float().mean().item())

    hooks = [layer.register_forward_hook(record) for layer in dsmoe.dsmoe_layers(model)]
    try:
        fn()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(active) / len(active), sum(union) / len(union)


def weight_counts(model):
    """Matmul weights per token: FFN, attention projections, lm_head; and d x layers for attention scores."""
    layers = decoder_layers(model)
    ffn = sum(p.numel() for layer in layers for p in layer.mlp.parameters() if p.dim() == 2)
    attention = sum(p.numel() for layer in layers for p in layer.self_attn.parameters() if p.dim() == 2)
    return {"ffn": ffn, "attention": attention, "lm_head": model.get_output_embeddings().weight.numel(),
            "scores": model.config.hidden_size * len(layers)}


def floor(counts, phase, share, tokens):
    """Time/dense if only the FFN's share shrank and nothing else cost: FLOPs for prefill (attention
    scores included, lm_head on the last token only), weights read for generation."""
    if phase == "prefill":
        other = counts["attention"] + counts["scores"] * tokens  # causal attention: 2·T·d per token and layer
    else:
        other = counts["attention"] + counts["lm_head"]
    return (other + share * counts["ffn"]) / (other + counts["ffn"])


def packed_dense_copy(dense):
    """The dense model with each FFN on oneDNN-packed weights (the kernels of the packed sparse path)."""
    model = copy.deepcopy(dense)
    for layer in decoder_layers(model):
        mlp = layer.mlp
        expert = pack_expert_weights(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, 1)[0]
        mlp.forward = lambda h, e=expert, act=mlp.act_fn: packed_expert_ffn(h.reshape(-1, h.shape[-1]), e, act).view(h.shape)
    return model


def inference_rows(models, converted, tokenizer, device, taus, gates, args, clock):
    ids = corpus_ids(tokenizer, args.prefill_tokens + 512 + 16 * max(args.batch)).to(device)
    prompt, calibration = ids[:, :args.prefill_tokens], ids[:, -512:]  # calibrated on other text than timed
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

    work = {"prefill": (lambda m: m(prompt, use_cache=True, logits_to_keep=1), args.prefill_tokens)}
    for batch in args.batch:
        short = ids[0, args.prefill_tokens:args.prefill_tokens + 16 * batch].view(batch, 16)  # other text per row
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=tokenizer.pad_token_id, attention_mask=torch.ones_like(short))
        work[f"generate_b{batch}"] = (lambda m, short=short, kwargs=kwargs: m.generate(short, **kwargs), args.new_tokens * batch)
    counts, rows = weight_counts(models["dense"]), []
    with torch.inference_mode():
        for phase, (fn, tokens) in work.items():
            candidates = {name: lambda fn=fn, m=model: fn(m) for name, model in models.items()}
            candidates.update({tau: with_tau(tau, fn) for tau in taus})
            times = time_side_by_side(candidates, device, args.repeats, budget_s=args.budget_s, clock=clock, stat=args.stat)
            for name, seconds in times.items():
                row = {"device": device, "dtype": str(models["dense"].dtype).removeprefix("torch."), "phase": phase,
                       "model": name if isinstance(name, str) else "dsmoe", "tau": None if isinstance(name, str) else name,
                       "ffn_active_fraction": 1.0, "ffn_union_fraction": 1.0, "tokens": tokens, "seconds": seconds,
                       "tokens_per_s": tokens / seconds, "time/dense": seconds / times["dense"]}
                if not isinstance(name, str):
                    row["ffn_active_fraction"], row["ffn_union_fraction"] = routing_shares(converted, with_tau(name, fn))
                    share = row["ffn_active_fraction"] if phase == "prefill" or phase == "generate_b1" else row["ffn_union_fraction"]
                    row["floor"] = floor(counts, phase, share, args.prefill_tokens)
                    row["time/floor"] = row["time/dense"] / row["floor"]
                rows.append(row)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
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
    return [{"device": device, "dtype": str(dense.dtype).removeprefix("torch."), "phase": "train_step", "model": name, "tokens": batch * seq_len, "seconds": seconds,
             "tokens_per_s": batch * seq_len / seconds, "time/dense": seconds / times["dense"]}
            for name, seconds in times.items()]


def device_rows(args, device, dtype):
    start = time.perf_counter()
    dense, tokenizer = dsmoe.load_model(args.model, dtype=dtype)
    converted = dsmoe.convert(dsmoe.load_model(args.model, dtype=dtype)[0], n_experts=8)
    dense, converted = dense.to(device).eval(), converted.to(device).eval()
    models = {"dense": dense}
    if onednn_runs(dtype, device):
        models["dense_packed"] = packed_dense_copy(dense)
    print(f"[{device} {dtype}] loaded and converted in {time.perf_counter() - start:.0f}s", flush=True)
    clock = clock_for(args.clock, device, torch.get_num_threads())
    rows = inference_rows(models, converted, tokenizer, device, args.taus, args.gates, args, clock)
    if args.train_batch and dtype == default_dtype(device):
        rows += training_rows(dense, converted, device, args.train_batch, args.train_seq, min(args.repeats, 3),
                              args.budget_s, clock)
    return rows


GOALS = {"prefill": ("time/dense", 0.65), "generate_b1": ("time/dense", 0.72), "generate_b8": ("time/floor", 1.15)}


def goal_lines(rows, tau=0.5):
    for row in rows:
        if row.get("tau") == tau and row["phase"] in GOALS:
            column, target = GOALS[row["phase"]]
            yield f"[{row['device']} {row['dtype']}] " + check_target(f"{row['phase']} τ={tau}, {column}", row[column], target)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="dense SmolLM2 (a directory or a dsmoe short name)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CPU, and CUDA when present")
    parser.add_argument("--dtype", nargs="+", default=None,
                        help="torch dtype names, each in turn (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="thresholds τ")
    parser.add_argument("--gates", choices=["paper", "native"], default="paper",
                        help="paper: gates set to the paper's FFN share per τ; native: untrained conversion gates")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for prefill (batch 1)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence (greedy, 16-token prompts)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="generation batch sizes")
    parser.add_argument("--train-batch", type=int, default=4, help="training step: sequences (0 skips it)")
    parser.add_argument("--train-seq", type=int, default=256, help="training step: tokens per sequence")
    parser.add_argument("--repeats", type=int, default=None,
                        help="at most this many timed rounds per phase (default 10; 5 with --quick), within a time budget")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, a smaller time budget")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall-clock time, or process CPU time (with --threads 1 on a busy shared CPU)")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="median of the timed calls (an idle machine), or the fastest (a shared, busy one)")
    parser.add_argument("--out", default=str(RESULTS / "end_to_end"), help="output path stem (.csv and .json written)")
    args = parser.parse_args()
    if args.gates == "paper" and (missing := [t for t in args.taus if t not in PAPER_FFN_FRACTION]):
        raise ValueError(f"--gates paper knows τ {sorted(PAPER_FFN_FRACTION)}, not {missing}; use --gates native")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (5 if args.quick else 10)
    args.budget_s = 30.0 if args.quick else 120.0  # per phase; at least 2 rounds run whatever it is

    rows = []
    for device in devices(args.device):
        for name in args.dtype or [None]:
            rows += device_rows(args, device, default_dtype(device, name))

    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(f"\nSmolLM2-135M, dense vs DSMoE (n=8), gates: {args.gates}, {args.clock} time, {args.stat} of interleaved calls")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for line in goal_lines(rows):
        print(line)
    for row in rows:
        if row["phase"] == "train_step" and row["model"] == "dsmoe":
            print(f"[{row['device']}] " + check_target("training step time, dsmoe/dense", row["time/dense"], 1.10))
    write_results(table, args.out, gates=args.gates, clock=args.clock, stat=args.stat,
                  paper_ffn_fraction=PAPER_FFN_FRACTION, goals=GOALS)


if __name__ == "__main__":
    main()
