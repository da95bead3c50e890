"""Convert SmolLM2-135M to DSMoE on the CPU: routing report, perplexity, a generated sentence.

    python examples/quickstart.py [--n-experts 8] [--tau 0.5]
"""

import argparse
import inspect
import json
import math

import torch

import dsmoe


def stdlib_text_ids(tokenizer, n_tokens):
    """A fixed text: the source of Python's `json` package, tokenized."""
    text = "".join(inspect.getsource(m) for m in (json.decoder, json.encoder))
    return tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]


@torch.no_grad()
def perplexity(model, ids, window=256):
    nll, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, window):
        chunk = ids[:, start : start + window]
        if chunk.shape[1] < 2:
            break
        loss = model(chunk, labels=chunk).loss
        nll += loss.item() * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-experts", type=int, default=8)
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = dsmoe.load_model("smollm2-135m")
    model.eval()
    ids = stdlib_text_ids(tokenizer, args.tokens)
    dense_ppl = perplexity(model, ids)
    model = dsmoe.convert(model, n_experts=args.n_experts, tau=args.tau).eval()
    with dsmoe.RoutingRecorder(model) as recorder:
        sparse_ppl = perplexity(model, ids)
    report = recorder.report()
    print("layer  mean active experts")
    for i, k in enumerate(report["mean_active_experts"]):
        print(f"{i:5d}  {k:.2f}")
    print(f"activated params: {report['activated_params']:,.0f} of {report['total_params']:,} "
          f"({report['activated_params_pct']:.1f}%)")
    print(f"perplexity on {ids.shape[1]} tokens of stdlib json: dense {dense_ppl:.2f}, converted (untrained) {sparse_ppl:.2f}")
    prompt = tokenizer("def fibonacci(n):", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    print("generated:", repr(tokenizer.decode(out[0], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
