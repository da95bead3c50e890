"""`dsmoe baseline drop|prune`: the training-free drop sweep and the static pruning baselines.

The top-k (LLaMA-MoE) baseline is the `topk` variant of `dsmoe convert`, trained by `dsmoe train`.
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .io import atomic_dir, write_csv


def read_validation(data_dir):
    """{source: int array (n_val, seq_len)} from a `dsmoe data prepare` directory."""
    try:
        from .data import load_validation
    except ImportError:
        load_validation = None
    if load_validation is not None:
        return load_validation(data_dir)
    manifest_path = Path(data_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: --data must be a `dsmoe data prepare` directory")
    sources = json.loads(manifest_path.read_text())["sources"]
    return {name: np.load(Path(data_dir) / name / "val.npy", mmap_mode="r") for name in sources}


@torch.no_grad()
def local_perplexity(model, validation, batch_size=8, max_sequences=None):
    """Per-source and pooled ("all") perplexity of a causal LM on fixed-length validation sequences."""
    model.eval()
    rows, total_nll, total_tokens = [], 0.0, 0
    for source, sequences in validation.items():
        sequences = sequences[:max_sequences] if max_sequences else sequences
        nll, tokens = 0.0, 0
        for start in tqdm(range(0, len(sequences), batch_size), desc=f"ppl {source}", leave=False):
            ids = torch.from_numpy(np.array(sequences[start : start + batch_size], dtype=np.int64))
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
            tokens += ids[:, 1:].numel()
        rows.append({"source": source, "ppl": math.exp(nll / tokens), "tokens": tokens})
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
    rows.append({"source": "all", "ppl": math.exp(total_nll / total_tokens), "tokens": total_tokens})
    return pd.DataFrame(rows)


def perplexity(model, validation, batch_size=8, max_sequences=None):
    """`dsmoe.evaluate.evaluate_ppl` where the evaluation stage provides it, else `local_perplexity`."""
    from . import evaluate

    evaluate_ppl = getattr(evaluate, "evaluate_ppl", local_perplexity)
    return evaluate_ppl(model, validation, batch_size=batch_size, max_sequences=max_sequences)[["source", "ppl", "tokens"]]


def drop_sweep(model, validation, thresholds, label, batch_size=8, max_sequences=None):
    """One row per threshold: ppl per source and pooled, activated params, mean kept experts."""
    from .drop import DropRecorder, set_threshold

    rows = []
    for threshold in tqdm(thresholds, desc="drop thresholds"):
        set_threshold(model, threshold)
        with DropRecorder(model) as recorder:
            ppl = perplexity(model, validation, batch_size, max_sequences)
        report = recorder.report()
        row = {"model": label, "variant": "drop", "rule": recorder.layers[0].rule, "threshold": float(threshold)}
        row.update({f"ppl_{r.source}": r.ppl for r in ppl.itertuples()})
        row.update(tokens=int(ppl.loc[ppl.source == "all", "tokens"].iloc[0]), total_params=report["total_params"],
                   activated_params=report["activated_params"], activated_params_pct=report["activated_params_pct"],
                   mean_active_experts=float(np.mean(report["mean_active_experts"])))
        rows.append(row)
    return pd.DataFrame(rows)


def cmd_drop(args):
    from .convert import load_model
    from .drop import check_rule, check_threshold, partition_for_drop

    check_rule(args.rule)
    for threshold in args.thresholds:
        check_threshold(threshold)
    validation = read_validation(args.data)
    model, _ = load_model(args.model)
    partition_for_drop(model, args.n_experts, rule=args.rule)
    label = args.label or Path(args.model.rstrip("/")).name
    df = drop_sweep(model, validation, args.thresholds, label, args.batch_size, args.max_sequences)
    write_csv(df, args.out)
    print(df.to_string(index=False))


def cmd_prune(args):
    from .convert import load_model
    from .pruning import KINDS, check_fraction, fraction_for_activated_pct, load_calibration, prune

    if args.kind not in KINDS:
        raise ValueError(f"unknown pruning kind {args.kind!r}; choose one of {', '.join(KINDS)}")
    if args.fraction is not None:
        check_fraction(args.fraction)
    calibration = load_calibration(args.data, args.calibration_sequences, args.calibration_seq_len)
    model, tokenizer = load_model(args.model)
    if model.config.model_type == "dsmoe":
        raise ValueError(f"{args.model} is a DSMoE model; pruning takes a dense causal LM")
    fraction = args.fraction if args.fraction is not None else fraction_for_activated_pct(model, args.match_activated_pct)
    summary = {"source_model": str(args.model), **prune(model, args.kind, fraction, calibration, args.batch_size)}
    if args.match_activated_pct is not None:
        summary["target_activated_params_pct"] = args.match_activated_pct
    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pruning.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def register(subparsers):
    baseline = subparsers.add_parser("baseline", help="training-free drop sweep and static pruning baselines")
    commands = baseline.add_subparsers(dest="baseline_command", required=True, metavar="BASELINE")

    p = commands.add_parser("drop", help="partition each FFN into experts and drop low-importance experts per token")
    p.add_argument("--model", required=True, help="dense causal LM: short name or directory")
    p.add_argument("--data", required=True, help="`dsmoe data prepare` directory (validation sets)")
    p.add_argument("--thresholds", type=float, nargs="+", required=True,
                   help="drop thresholds >= 0 on ||o_i|| / ||sum_j o_j|| (0 = the dense model)")
    p.add_argument("--n-experts", type=int, default=8, help="experts per FFN; must divide the intermediate size (default 8)")
    p.add_argument("--rule", default="expert",
                   help="expert: drop each expert below the threshold (default); cumulative: drop the smallest experts "
                        "while their summed ratios stay below the threshold (bounds the FFN's relative error)")
    p.add_argument("--batch-size", type=int, default=8, help="validation sequences per forward (default 8)")
    p.add_argument("--max-sequences", type=int, default=None, help="cap on validation sequences per source")
    p.add_argument("--label", default=None, help="value of the model column (default: the model directory's name)")
    p.add_argument("--out", required=True, help="output CSV: one row per threshold (written atomically)")
    p.set_defaults(func=cmd_drop)

    p = commands.add_parser("prune", help="static FFN pruning (channel: LLM-Pruner style; wanda: unstructured)")
    p.add_argument("--model", required=True, help="dense causal LM: short name or directory")
    p.add_argument("--kind", required=True, help="channel (narrower dense model) or wanda (zeroed weights)")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--fraction", type=float, help="fraction of FFN parameters to remove, in [0, 1)")
    amount.add_argument("--match-activated-pct", type=float,
                        help="choose the fraction so that activated params are this %% of the dense model's (Table 1 count)")
    p.add_argument("--data", required=True, help="`dsmoe data prepare` directory; calibration comes from its train.npy")
    p.add_argument("--calibration-sequences", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--calibration-seq-len", type=int, default=None, help="calibration sequence length (default: the data's seq_len)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration sequences per forward (default 1)")
    p.add_argument("--out", required=True, help="output model directory, with pruning.json (written atomically)")
    p.set_defaults(func=cmd_prune)
