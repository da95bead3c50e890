"""`dsmoe baseline drop | prune`: the training-free drop sweep and the static pruning baselines.

The top-k (LLaMA-MoE) baseline is the `topk` variant of `dsmoe convert`, trained by `dsmoe train`.
"""

import json
from pathlib import Path

from ..atomic import atomic_dir, check_out, check_output_file, write_csv
from ..config import schema_default
from ..names import PRUNE_KINDS


def cmd_drop(args):
    from ..data import load_validation
    from ..hub import load_model
    from ..model import check_n_experts
    from .drop import check_keep_experts, check_rule, check_threshold, drop_sweep, partition_for_drop

    check_rule(args.rule)
    check_n_experts(args.n_experts)
    settings = check_drop_settings(args, check_keep_experts, check_threshold)
    check_output_file(args.out)
    windows_out = check_output_file(windows_path(args.out), "--out's windows file")
    validation = load_validation(args.data)
    model, _ = load_model(args.model, tokenizer=False)
    partition_for_drop(model, args.n_experts, rule=args.rule)
    label = args.label or Path(args.model.rstrip("/")).name
    df = drop_sweep(model, validation, settings, label, args.batch_size, args.max_sequences)
    write_csv(df.attrs["windows"], windows_out)  # first: a drop.csv always has its windows beside it
    write_csv(df, args.out)
    print(df.to_string(index=False))


def windows_path(out):
    """The per-window NLL file written beside a drop CSV: drop.csv -> drop_windows.csv."""
    out = Path(out)
    return out.with_name(f"{out.stem}_windows.csv")


def check_drop_settings(args, check_keep_experts, check_threshold):
    """The sweep's settings, checked before any work: K values for rule topk, thresholds for the others."""
    if args.rule == "topk":
        if args.thresholds is not None or not args.keep_experts:
            raise ValueError("--rule topk takes --keep-experts K [K ...] and no --thresholds")
        for k in args.keep_experts:
            check_keep_experts(k, args.n_experts)
        return args.keep_experts
    if args.keep_experts is not None or not args.thresholds:
        raise ValueError(f"--rule {args.rule} takes --thresholds T [T ...] and no --keep-experts (that is --rule topk)")
    for threshold in args.thresholds:
        check_threshold(threshold, args.rule, args.n_experts)
    return args.thresholds


def cmd_prune(args):
    from ..data import calibration_windows
    from ..evaluation.perplexity import read_activated_pct
    from ..hub import load_model
    from .pruning import check_fraction, fraction_for_activated_pct, prune

    if args.kind not in PRUNE_KINDS:
        raise ValueError(f"unknown pruning kind {args.kind!r}; choose one of {', '.join(PRUNE_KINDS)}")
    check_out(args.out, "pruned", args.overwrite)
    if args.fraction is not None:
        check_fraction(args.fraction)
    target_pct = args.match_activated_pct
    if args.match_ppl_csv is not None:
        target_pct = read_activated_pct(args.match_ppl_csv)
    calibration = calibration_windows(args.data, args.calibration_sequences, args.calibration_seq_len)
    model, tokenizer = load_model(args.model)
    if model.config.model_type == "dsmoe":
        raise ValueError(f"{args.model} is a DSMoE model; pruning takes a dense causal LM")
    if args.block_layers is not None and args.kind != "llm_pruner_block":
        raise ValueError("--block-layers applies to --kind llm_pruner_block only")
    fraction = args.fraction
    if fraction is None:
        fraction = fraction_for_activated_pct(model, target_pct, args.kind, args.block_layers)
    model, summary = prune(model, args.kind, fraction, calibration, args.batch_size, args.block_layers)
    summary = {"source_model": str(args.model), **summary}
    if target_pct is not None:
        summary["target_activated_params_pct"] = target_pct
    with atomic_dir(args.out, "pruned", args.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pruning.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def register(subparsers):
    baseline = subparsers.add_parser("baseline", help="training-free drop sweep and static pruning baselines")
    commands = baseline.add_subparsers(dest="baseline_command", required=True, metavar="BASELINE")

    p = commands.add_parser("drop", help="partition each FFN into experts and keep each token's largest expert outputs "
                                         "(training-free reference)")
    p.add_argument("--model", required=True, help="dense causal LM: short name or directory")
    p.add_argument("--data", required=True, help="`dsmoe data prepare` directory (validation sets)")
    p.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="rules expert and cumulative: thresholds >= 0 on ||o_i|| / ||sum_j o_j|| (0 = the dense model); "
                        "rule expert refuses thresholds >= 1/n (they drop whole FFNs), cumulative thresholds > 1")
    p.add_argument("--keep-experts", type=int, nargs="+", default=None, metavar="K",
                   help="rule topk: each token keeps its K experts of largest ||o_i||; one row per K in [1, n]")
    p.add_argument("--n-experts", type=int, default=schema_default("dsmoe.n_experts"),
                   help="experts per FFN; must divide the intermediate size (default %(default)s)")
    p.add_argument("--rule", default="expert",
                   help="topk: keep each token's K largest experts (--keep-experts); expert: drop each expert below the "
                        "threshold (default); cumulative: drop the smallest experts while their summed ratios stay "
                        "below the threshold (bounds the FFN's relative error)")
    p.add_argument("--batch-size", type=int, default=8, help="validation sequences per forward (default 8)")
    p.add_argument("--max-sequences", type=int, default=None, help="cap on validation sequences per source")
    p.add_argument("--label", default=None, help="value of the model column (default: the model directory's name)")
    p.add_argument("--out", required=True, help="output CSV, one row per threshold or K; beside it OUT_windows.csv "
                                                "(drop_windows.csv), each row's per-window NLL (written atomically)")
    p.set_defaults(func=cmd_drop)

    p = commands.add_parser("prune", help="static pruning: sparsegpt, llm_pruner_channel, llm_pruner_block (the paper's rows), "
                                          "ffn_channel, wanda")
    p.add_argument("--model", required=True, help="dense causal LM: short name or directory")
    p.add_argument("--kind", required=True,
                   help="sparsegpt (every decoder linear, unstructured, OBS reconstruction), llm_pruner_channel "
                        "(the hidden size d, LLM-Pruner's channel mode: a narrower model), llm_pruner_block (KV groups "
                        "and FFN units per layer, LLM-Pruner's block mode: a LLaMA with per-layer sizes), ffn_channel (FFN units by "
                        "Taylor importance: a narrower dense model) or wanda (FFN weights, unstructured)")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--fraction", type=float,
                        help="fraction to remove, in [0, 1), of the decoder linear weights (sparsegpt), hidden channels "
                             "(llm_pruner_channel), the pruned layers' attention and FFN weights (llm_pruner_block) or FFN weights")
    amount.add_argument("--match-activated-pct", type=float,
                        help="choose the fraction so that activated params are this %% of the dense model's (Table 1 count)")
    amount.add_argument("--match-ppl-csv", metavar="PPL_CSV",
                        help="as --match-activated-pct, with the percentage of the model evaluated in this ppl.csv "
                             "(`dsmoe eval ppl`, its 'all' row)")
    p.add_argument("--block-layers", type=int, nargs=2, metavar=("START", "END"), default=None,
                   help="llm_pruner_block: prune layers START..END-1 only (default: all but the first 4 and last 2; "
                        "6 layers or fewer: all but the first and last)")
    p.add_argument("--data", required=True, help="`dsmoe data prepare` directory; calibration comes from its train.npy")
    p.add_argument("--calibration-sequences", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--calibration-seq-len", type=int, default=None, help="calibration sequence length (default: the data's seq_len)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration sequences per forward (default 1)")
    p.add_argument("--out", required=True, help="output model directory, with pruning.json (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a dsmoe pruned model")
    p.set_defaults(func=cmd_prune)
