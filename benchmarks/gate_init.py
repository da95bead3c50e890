"""How the converted model starts, by gate init: held-out perplexity, open tokens, how experts differ.

    python benchmarks/gate_init.py --data DATA [--out benchmarks/pilots/gate_init.json]

DATA is a prepared data directory (`dsmoe data prepare`); the gates are fitted on its training
windows (`dsmoe.convert.calibration_inputs`) and everything is measured on its validation windows.
Inits: `normal` (the paper: N(0, 0.02²)), `mean` (the earlier calibrated init: Y_i = c·μ + 5% noise,
σ = 0.9 at the median token) and `calibrated` (dsmoe/gate_init.py). For each:
- held-out perplexity at τ = 0.5, beside the dense model's;
- the share of (layer, token) pairs with every expert open at τ = 0.5, and the lowest gate logit;
- how experts differ: every logit shifted by one constant per layer so that 3 of 8 experts are
  open on average (what the sparsity loss does first, lowering all gates), the std of k over
  tokens (all-or-nothing routing gives ~3.9, the largest possible) and the mean correlation between
  two experts' on/off (1: they always switch together).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import dsmoe
from dsmoe.convert import calibration_inputs
from dsmoe.data import load_validation
from dsmoe.evaluation.perplexity import evaluate_ppl
from dsmoe.gate_init import calibrated_gate_weights, capture_ffn_inputs


def mean_direction_init(h, n_experts, target_prob=0.9, noise=0.05, seed=0):
    """The earlier calibrated init (kept here for comparison): Y_i = c·μ + ε."""
    mean = h.mean(0)
    direction = mean * (math.log(target_prob / (1 - target_prob)) / (h @ mean).median())
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(n_experts, mean.numel(), generator=generator) * noise * direction.norm() / math.sqrt(mean.numel())
    return direction.expand(n_experts, -1) + eps


def shifted_routing(logits, k_mean=3.0):
    """Active mask (tokens x n) with one threshold on the logits such that k averages `k_mean`."""
    low, high = logits.min().item(), logits.max().item()
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if (logits > mid).float().sum(1).mean() > k_mean else (low, mid)
    return logits > mid


def differ_stats(logits):
    """(std of k, mean pairwise correlation of the experts' on/off) at a mean of 3 open experts."""
    active = shifted_routing(logits).float()
    corr = torch.corrcoef(active.T)
    off = corr[~torch.eye(len(corr), dtype=torch.bool)]
    return active.sum(1).std().item(), off[torch.isfinite(off)].mean().item()


def gate_logits(model, validation):
    """Every layer's gate logits h·Y on the validation windows (list of tokens x n)."""
    layers = dsmoe.dsmoe_layers(model)
    captured = [[] for _ in layers]
    hooks = [layer.gate.register_forward_hook(lambda m, i, o, k=k: captured[k].append(o.reshape(-1, o.shape[-1]).float()))
             for k, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for windows in validation.values():
                model(torch.from_numpy(np.asarray(windows, dtype=np.int64)))
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(c) for c in captured]


def measure(model, validation, label):
    ppl = evaluate_ppl(model, validation, progress=False).set_index("source").loc["all"]
    row = {"init": label, "ppl": float(ppl["ppl"]), "mean_active_experts": float(ppl["mean_active_experts"])}
    if dsmoe.dsmoe_layers(model):
        logits = gate_logits(model, validation)
        stats = [differ_stats(layer) for layer in logits]
        row.update(all_open=float(np.mean([(layer > 0).all(1).float().mean().item() for layer in logits])),
                   min_logit=min(layer.min().item() for layer in logits),
                   k_std_at_3=float(np.mean([s[0] for s in stats])), coactivation_at_3=float(np.mean([s[1] for s in stats])),
                   per_layer_coactivation=[round(s[1], 3) for s in stats])
    print(json.dumps({k: v for k, v in row.items() if k != "per_layer_coactivation"}), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--calibration-sequences", type=int, default=16)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--spread", type=float, default=0.5)
    parser.add_argument("--out", default="benchmarks/pilots/gate_init.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    validation = load_validation(args.data)
    model, _ = dsmoe.load_model("smollm2-135m", dtype=torch.float32)
    model.eval()
    rows = [measure(model, validation, "dense")]
    start = time.perf_counter()
    h = capture_ffn_inputs(model, calibration_inputs(args.data, args.calibration_sequences))
    mlps = [layer.mlp for layer in model.model.layers]
    fitted = [calibrated_gate_weights(h[i], 8, mlps[i], args.target, args.spread) for i in range(len(h))]
    fit_s = time.perf_counter() - start
    means = [mean_direction_init(h[i], 8, seed=i) for i in range(len(h))]
    del h
    model = dsmoe.convert(model, n_experts=8, tau=0.5).eval()
    rows.append(measure(model, validation, "normal"))
    for label, weights in (("mean", means), ("calibrated", fitted)):
        for layer, w in zip(dsmoe.dsmoe_layers(model), weights):
            layer.gate.weight.data.copy_(w)
        rows.append(measure(model, validation, label))
    result = {"data": args.data, "validation_tokens": int(sum(v.size for v in validation.values())),
              "calibration_sequences": args.calibration_sequences, "target": args.target, "spread": args.spread,
              "calibration_capture_and_fit_s": round(fit_s, 1), "rows": rows, "command": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
