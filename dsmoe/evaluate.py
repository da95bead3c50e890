"""Evaluation: validation perplexity with activated parameters, and τ-sweeps (paper Tables 1 and 4, Figs. 2 and 3).

Perplexity is token-weighted: every validation row is one window of `seq_len` tokens; the NLL of
each predicted token (positions 1..seq_len-1) is summed over a source and divided by their count,
and ppl = exp of that mean. The "all" row pools the tokens of every source. Activated parameters are
counted as in Table 1 (`dsmoe.activated_params`) from the routing recorded while evaluating.

`dsmoe eval ppl|sweep|bench` are registered here; the benchmarks live in `dsmoe.bench`.
"""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .io import atomic_file, write_csv
from .losses import dsmoe_layers
from .routing import RoutingRecorder, RoutingStats, activated_params

TABLE4_TAUS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DENSE_VARIANTS = ("dense", "dense_continued", "drop", "prune_channel", "prune_wanda")  # `variant` values of dense models


def load_validation(data_dir):
    """`{source: int array (n_val, seq_len)}` from a DATA directory written by `dsmoe data prepare`."""
    try:
        from .data import load_validation as load
    except ImportError:
        load = read_validation
    return load(data_dir)


def read_validation(data_dir):
    data_dir = Path(data_dir)
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} does not exist: is {str(data_dir)!r} a DATA directory (dsmoe data prepare)?")
    manifest = json.loads(manifest_path.read_text())
    validation = {}
    for source in manifest["sources"]:
        sequences = np.load(data_dir / source / "val.npy", mmap_mode="r")
        if sequences.ndim != 2 or sequences.shape[1] != manifest["seq_len"]:
            raise ValueError(f"{data_dir / source / 'val.npy'} has shape {sequences.shape}, expected (n, {manifest['seq_len']})")
        validation[source] = sequences
    return validation


def check_tau(tau):
    if tau is not None and not 0.0 < float(tau) < 1.0:
        raise ValueError(f"tau must lie in the open interval (0, 1), got {tau}")
    return tau


def model_variant(model, label=None):
    """`config.variant` of a DSMoE model; for a dense one its label if that names a variant, else "dense"."""
    if dsmoe_layers(model):
        return model.config.variant
    return label if label in DENSE_VARIANTS else "dense"


def model_tau(model):
    """The threshold τ of a DSMoE model; NaN for a dense model and for topk (τ plays no part)."""
    layers = dsmoe_layers(model)
    return float(layers[0].tau) if layers and layers[0].variant != "topk" else math.nan


def token_nll(model, input_ids):
    """Summed next-token NLL of a batch of windows (B x T) in float64, and the number of predicted tokens."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1), reduction="none")
    return nll.double().sum().item(), nll.numel()


def routing_summary(model, stats):
    """Activated params and per-layer mean active experts from per-layer RoutingStats (empty: dense)."""
    per_layer = [s.mean_active for s in stats]
    counts = activated_params(model, per_layer if stats else None)
    mean = float(np.mean(per_layer)) if per_layer else math.nan
    return {"activated_params": counts["activated_params"], "activated_params_pct": counts["activated_params_pct"],
            "mean_active_experts": mean}, per_layer


def merge_stats(per_source):
    """Pool per-layer RoutingStats of several sources (token-weighted)."""
    merged = []
    for layer_stats in zip(*per_source):
        stats = RoutingStats(layer_stats[0].n_experts)
        for s in layer_stats:
            stats.k_hist += s.k_hist
            stats.expert_counts += s.expert_counts
        merged.append(stats)
    return merged


@torch.no_grad()
def evaluate_ppl(model, validation, batch_size=8, max_sequences=None, progress=True):
    """Per-source perplexity and activated params: one row per source plus "all".

    Columns: source, ppl, tokens, activated_params, activated_params_pct, mean_active_experts (mean over
    layers; NaN for a dense model). `df.attrs["layers"]` holds the per-layer means (source, layer,
    mean_active_experts) for the Fig. 3 heatmaps.
    """
    if not validation:
        raise ValueError("no validation source to evaluate")
    model.eval()
    device = next(model.parameters()).device
    rows, layer_rows, all_stats = [], [], []
    total_nll, total_tokens = 0.0, 0
    for source, sequences in validation.items():
        sequences = sequences[:max_sequences]
        if len(sequences) == 0 or sequences.shape[-1] < 2:
            raise ValueError(f"validation source {source!r} has no window of 2 tokens or more")
        nll, tokens = 0.0, 0
        with RoutingRecorder(model) as recorder:
            for start in tqdm(range(0, len(sequences), batch_size), desc=f"ppl {source}", disable=not progress):
                batch = torch.from_numpy(np.array(sequences[start:start + batch_size], dtype=np.int64)).to(device)
                batch_nll, batch_tokens = token_nll(model, batch)
                nll, tokens = nll + batch_nll, tokens + batch_tokens
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
        all_stats.append(recorder.stats)
        rows.append((source, nll, tokens, recorder.stats))
    rows.append(("all", total_nll, total_tokens, merge_stats(all_stats)))
    summary = []
    for source, nll, tokens, stats in rows:
        routing, per_layer = routing_summary(model, stats)
        summary.append({"source": source, "ppl": math.exp(nll / tokens), "tokens": tokens, **routing})
        layer_rows += [{"source": source, "layer": i, "mean_active_experts": k} for i, k in enumerate(per_layer)]
    df = pd.DataFrame(summary)
    df.attrs["layers"] = pd.DataFrame(layer_rows, columns=["source", "layer", "mean_active_experts"])
    return df


def sweep_tau(model, validation, taus=TABLE4_TAUS, batch_size=8, max_sequences=None, progress=True):
    """Evaluate a DSMoE model at each τ (set in place, restored after): one row per τ.

    Columns: tau, ppl (the "all" ppl), activated_params, activated_params_pct, mean_active_experts,
    then ppl_<source> per source; `df.attrs["layers"]` has (tau, source, layer, mean_active_experts).
    """
    from .convert import set_tau

    if not dsmoe_layers(model):
        raise ValueError(f"{type(model).__name__} is a dense model: a τ-sweep needs a DSMoE model")
    if model_variant(model) == "topk":
        raise ValueError("τ has no effect on the topk variant (fixed top-k routing): nothing to sweep")
    for tau in taus:
        check_tau(tau)
    original = model_tau(model)
    rows, layers = [], []
    try:
        for tau in tqdm(taus, desc="tau sweep", disable=not progress):
            set_tau(model, tau)
            df = evaluate_ppl(model, validation, batch_size, max_sequences, progress=False)
            summary = df.set_index("source")
            row = {"tau": float(tau), **summary.loc["all", ["ppl", "activated_params", "activated_params_pct", "mean_active_experts"]].to_dict()}
            row.update({f"ppl_{source}": summary.loc[source, "ppl"] for source in validation})
            rows.append(row)
            layers.append(df.attrs["layers"].assign(tau=float(tau)))
    finally:
        set_tau(model, original)
    df = pd.DataFrame(rows)
    df.attrs["layers"] = pd.concat(layers, ignore_index=True)[["tau", "source", "layer", "mean_active_experts"]]
    return df


# ---------------------------------------------------------------- reruns: skip work already done

def fingerprint(paths=(), **params):
    """Hash of `params` and of the name, size and mtime of every file under `paths` (the inputs)."""
    files = []
    for path in map(Path, paths):
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
        found = [p for p in found if not p.name.startswith(".") and "__pycache__" not in p.parts]
        files += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in found]
        files += [] if found else [(str(path), None, None)]
    from . import __version__

    blob = json.dumps({"dsmoe": __version__, "params": params, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def up_to_date(stamp, key, outputs):
    stamp = Path(stamp)
    return stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == key and all(Path(o).exists() for o in outputs)


def write_stamp(stamp, key):
    with atomic_file(stamp) as handle:
        json.dump({"fingerprint": key}, handle)


def model_label(model_path):
    """The checkpoint directory's name; RUN/model/ is labelled RUN."""
    path = Path(str(model_path).rstrip("/"))
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def load_for_eval(model_path, dtype="auto", device="auto", tau=None):
    from .base import resolve_dtype
    from .convert import load_model, set_tau

    model, tokenizer = load_model(str(model_path), dtype=resolve_dtype(dtype))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    if tau is not None:
        set_tau(model, tau)
    return model, tokenizer


# ---------------------------------------------------------------- CLI

def add_model_args(p, tau_help="set the DSMoE threshold τ in (0, 1) before evaluating (default: the checkpoint's)"):
    p.add_argument("--model", required=True, help="model directory (dense or DSMoE), short name or Hugging Face id")
    p.add_argument("--label", default=None, help="value of the `model` column (default: the model directory's name; RUN/model -> RUN)")
    p.add_argument("--variant", default=None,
                   help="value of the `variant` column (default: the DSMoE variant; for a dense model the label if it is "
                        f"one of {', '.join(DENSE_VARIANTS)}, else dense)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto is bfloat16 on CUDA, float32 on CPU (default auto)")
    p.add_argument("--device", default="auto", help="torch device, or auto: cuda if available else cpu (default auto)")
    if tau_help:
        p.add_argument("--tau", type=float, default=None, help=tau_help)


def add_data_args(p):
    p.add_argument("--data", required=True, help="DATA directory written by `dsmoe data prepare` (manifest.json, <source>/val.npy)")
    p.add_argument("--max-sequences", type=int, default=None, help="evaluate at most this many validation windows per source (default all)")


def register(subparsers):
    from . import bench

    p = subparsers.add_parser("eval", help="evaluate a model: perplexity, τ-sweep, lm-eval benchmarks")
    eval_subparsers = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")

    p = eval_subparsers.add_parser("ppl", help="per-source validation perplexity, activated params, per-layer active experts")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--out", required=True, help="output directory: ppl.csv and layers.csv (written atomically)")
    p.set_defaults(func=cmd_ppl)

    p = eval_subparsers.add_parser("sweep", help="perplexity and activated params of a DSMoE model at several τ (Table 4, Fig. 2)")
    add_model_args(p, tau_help=None)
    add_data_args(p)
    p.add_argument("--taus", type=float, nargs="+", default=list(TABLE4_TAUS),
                   help=f"thresholds to evaluate (default Table 4: {' '.join(map(str, TABLE4_TAUS))})")
    p.add_argument("--out", required=True, help="output CSV, one row per τ (written atomically)")
    p.add_argument("--layers-out", default=None, help="also write per-τ, per-layer mean active experts to this CSV")
    p.set_defaults(func=cmd_sweep)

    bench.register(eval_subparsers)


def _check_args(args):
    check_tau(getattr(args, "tau", None))
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if getattr(args, "max_sequences", None) is not None and args.max_sequences < 1:
        raise ValueError(f"--max-sequences must be positive, got {args.max_sequences}")


def _columns(df, model, args):
    label = args.label or model_label(args.model)
    return df.assign(model=label, variant=args.variant or model_variant(model, label), tau=model_tau(model))


def apply_pruning_record(summary, model_path):
    """A statically pruned model counts activated params against its unpruned parent (pruning.json)."""
    record = Path(model_path) / "pruning.json"
    if not record.is_file():
        return summary
    pruning = json.loads(record.read_text())
    return summary.assign(activated_params=pruning["activated_params"], activated_params_pct=pruning["activated_params_pct"])


def cmd_ppl(args):
    _check_args(args)
    out = Path(args.out)
    outputs = [out / "ppl.csv", out / "layers.csv"]
    validation = load_validation(args.data)
    key = fingerprint([args.model, args.data], command="ppl", tau=args.tau, label=args.label, variant=args.variant,
                      max_sequences=args.max_sequences, dtype=args.dtype)
    if up_to_date(out / ".ppl.stamp.json", key, outputs):
        print(f"{out}: up to date, nothing to do")
        return
    model, _ = load_for_eval(args.model, args.dtype, args.device, args.tau)
    df = evaluate_ppl(model, validation, args.batch_size, args.max_sequences)
    front = ["model", "variant", "tau"]
    summary = apply_pruning_record(_columns(df, model, args), args.model)
    write_csv(summary[front + list(df.columns)], outputs[0])
    layers = _columns(df.attrs["layers"], model, args)
    write_csv(layers[front + ["source", "layer", "mean_active_experts"]], outputs[1])
    write_stamp(out / ".ppl.stamp.json", key)
    print(summary[["source", "ppl", "tokens", "activated_params_pct", "mean_active_experts"]].to_string(index=False))


def cmd_sweep(args):
    _check_args(args)
    for tau in args.taus:
        check_tau(tau)
    out = Path(args.out)
    outputs = [out] + ([Path(args.layers_out)] if args.layers_out else [])
    stamp = out.with_name(f".{out.name}.stamp.json")
    validation = load_validation(args.data)
    key = fingerprint([args.model, args.data], command="sweep", taus=args.taus, label=args.label, variant=args.variant,
                      max_sequences=args.max_sequences, dtype=args.dtype, layers_out=args.layers_out)
    if up_to_date(stamp, key, outputs):
        print(f"{out}: up to date, nothing to do")
        return
    model, _ = load_for_eval(args.model, args.dtype, args.device)
    df = sweep_tau(model, validation, args.taus, args.batch_size, args.max_sequences)
    layers = df.attrs["layers"]
    label = args.label or model_label(args.model)
    variant = args.variant or model_variant(model, label)
    df = df.assign(model=label, variant=variant)
    write_csv(df[["model", "variant"] + [c for c in df.columns if c not in ("model", "variant")]], out)
    if args.layers_out:
        layers = layers.assign(model=label, variant=variant)
        write_csv(layers[["model", "variant", "tau", "source", "layer", "mean_active_experts"]], args.layers_out)
    write_stamp(stamp, key)
    print(df[["tau", "ppl", "activated_params_pct", "mean_active_experts"]].to_string(index=False))
