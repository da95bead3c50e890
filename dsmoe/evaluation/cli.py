"""`dsmoe eval ppl | sweep | lm-eval | milestones`: evaluate a checkpoint and write tidy CSVs.

Every command skips its work when a stamp says that its inputs have not changed since the last run.
The `model` column holds a label (the checkpoint's directory name by default), the `variant` column
the method (`dsmoe.names`): a DSMoE variant, or for a dense model its label when that names a method.
"""

import argparse
import json
import math
import os
from pathlib import Path

import torch

from ..atomic import atomic_file, check_output_dir, check_output_file, write_csv
from ..model import TOPK_VARIANTS, check_tau, dsmoe_layers
from ..names import ALL_ON, DENSE, DENSE_METHODS
from .stamps import fingerprint, up_to_date, write_stamp


def model_method(model, label=None):
    """`config.variant` of a DSMoE model; for a dense one its label if that names a method, else "dense"."""
    if dsmoe_layers(model):
        return model.config.variant
    return label if label in DENSE_METHODS else DENSE


def model_tau(model):
    """The threshold τ of a DSMoE model; NaN for a dense model and for topk (τ plays no part)."""
    layers = dsmoe_layers(model)
    return float(layers[0].tau) if layers and layers[0].variant not in TOPK_VARIANTS else math.nan


def model_label(model_path):
    """The checkpoint directory's name; RUN/model/ is labelled RUN."""
    path = Path(str(model_path).rstrip("/"))
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def resolve_device(name="auto"):
    """A torch device name that exists here: auto is cuda when a GPU is available, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"--device {name!r} is not a torch device ({err}); use auto, cpu or cuda[:N]") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: device type {device.type!r} is not supported; use auto, cpu or cuda[:N]")
    return str(device)


def load_for_eval(model_path, dtype="auto", device="auto", tau=None, no_gx_inference_rescale=None, tokenizer=True):
    from ..hub import load_model, resolve_dtype
    from ..model import set_no_gx_inference_rescale, set_tau

    model, tokenizer = load_model(str(model_path), dtype=resolve_dtype(dtype), tokenizer=tokenizer)
    model.to(resolve_device(device)).eval()
    if tau is not None:
        set_tau(model, tau)
    if no_gx_inference_rescale is not None and dsmoe_layers(model):
        set_no_gx_inference_rescale(model, no_gx_inference_rescale)
    return model, tokenizer


def inference_rescale(model):
    """Whether the model applies Eq. 8's n/k at inference: always, except a no_gx model with it off."""
    layers = dsmoe_layers(model)
    return not layers or layers[0].variant != "no_gx" or bool(layers[0].no_gx_inference_rescale)


def apply_pruning_record(summary, model_path):
    """A statically pruned model counts activated params against its unpruned parent (pruning.json)."""
    record = Path(model_path) / "pruning.json"
    if not record.is_file():
        return summary
    pruning = json.loads(record.read_text())
    return summary.assign(activated_params=pruning["activated_params"], activated_params_pct=pruning["activated_params_pct"])


# ---------------------------------------------------------------- arguments


def add_model_args(p, tau_help="set the DSMoE threshold τ in (0, 1) before evaluating (default: the checkpoint's)"):
    p.add_argument("--model", required=True, help="model directory (dense or DSMoE), short name or Hugging Face id")
    p.add_argument("--label", default=None, help="value of the `model` column (default: the model directory's name; RUN/model -> RUN)")
    p.add_argument("--variant", default=None,
                   help="value of the `variant` column (default: the DSMoE variant; for a dense model the label if it is "
                        f"one of {', '.join(DENSE_METHODS)}, else dense)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto is bfloat16 on CUDA, float32 on CPU (default auto)")
    p.add_argument("--device", default="auto", help="torch device, or auto: cuda if available else cpu (default auto)")
    if tau_help:
        p.add_argument("--tau", type=float, default=None, help=tau_help)
    from ..convert import parse_bool

    p.add_argument("--no-gx-inference-rescale", type=parse_bool, default=None, metavar="{true,false}",
                   help="no_gx models: apply Eq. 8's n/k at inference or not (default: the checkpoint's setting)")


def add_data_args(p):
    p.add_argument("--data", required=True, help="DATA directory written by `dsmoe data prepare` (manifest.json, <source>/val.npy)")
    p.add_argument("--max-sequences", type=int, default=None, help="evaluate at most this many validation windows per source (default all)")


def register(subparsers):
    from .harness import STORYCLOZE_ENV, SUITES
    from .perplexity import TABLE4_TAUS

    p = subparsers.add_parser("eval", help="evaluate a model: perplexity, τ-sweep, lm-eval benchmarks")
    commands = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")

    p = commands.add_parser("ppl", help="per-source validation perplexity, activated params, per-layer active experts")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--gate-margins", action=argparse.BooleanOptionalAction, default=True,
                   help="also write gate_margins.csv: per source and sigmoid-gated layer, the histogram of sigma(h.Y) - tau "
                        "(bins of 0.01) and the share within +-0.05 of tau (default on; a dense model writes its header)")
    p.add_argument("--all-experts-on", action="store_true",
                   help="evaluate with every expert of every DSMoE layer on at coefficient 1 (the dense FFN); "
                        "the model column reads LABEL@all_on")
    p.add_argument("--out", required=True, help="output directory: ppl.csv, layers.csv and windows.csv (per-window NLL; "
                                               "written atomically), gate_margins.csv")
    p.set_defaults(func=cmd_ppl)

    p = commands.add_parser("massive-activations", help="a dense model's largest FFN units at position 0 per layer, "
                                                       "their expert (Eq. 6) and the residual stream's max")
    p.add_argument("--model", required=True, help="dense causal LM: short name or directory")
    add_data_args(p)
    p.add_argument("--n-experts", type=int, required=True, help="experts per FFN of the contiguous partition")
    p.add_argument("--top-units", type=int, default=3, help="units per layer (default 3)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    p.add_argument("--out", required=True, help="output CSV (written atomically)")
    p.set_defaults(func=cmd_massive)

    p = commands.add_parser("sweep", help="perplexity and activated params of a DSMoE model at several τ (Table 4, Fig. 2)")
    add_model_args(p, tau_help=None)
    add_data_args(p)
    p.add_argument("--taus", type=float, nargs="+", default=list(TABLE4_TAUS),
                   help=f"thresholds to evaluate (default Table 4: {' '.join(map(str, TABLE4_TAUS))})")
    p.add_argument("--out", required=True, help="output CSV, one row per τ (written atomically)")
    p.add_argument("--layers-out", default=None, help="also write per-τ, per-layer mean active experts to this CSV")
    p.add_argument("--windows-out", default=None, help="also write per-τ, per-window summed NLL and tokens to this CSV")
    p.set_defaults(func=cmd_sweep)

    p = commands.add_parser("lm-eval", aliases=["bench"],
                            help="lm-eval downstream tasks (local offline tasks or the paper's 10) with activated params")
    add_model_args(p)
    p.add_argument("--suite", default="local", choices=sorted(SUITES),
                   help="local: offline stdlib tasks (default); paper: the paper's 10 lm-eval tasks")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="run these lm-eval tasks instead of the suite (suite tasks keep their shots, others use --num-fewshot)")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples of --tasks outside the suites (default 0)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N items per task (default all)")
    p.add_argument("--storycloze-dir", default=None,
                   help=f"Story Cloze 2016 data dir for storycloze_2016 (default: ${STORYCLOZE_ENV}; unset: the task is skipped)")
    p.add_argument("--out", required=True, help="output directory: results.json (lm-eval's), bench.csv and bench_layers.csv "
                                               "(per task and layer mean active experts; written atomically)")
    p.set_defaults(func=cmd_lm_eval)

    p = commands.add_parser("milestones", help="perplexity of a run's models kept at token milestones (Tables 5-6)")
    p.add_argument("--run", required=True, help="run directory of `dsmoe train --milestones` (milestones/, model/, train_log.csv)")
    p.add_argument("--label", default=None, help="value of the `model` column (default: the run directory's name)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto is bfloat16 on CUDA, float32 on CPU (default auto)")
    p.add_argument("--device", default="auto", help="torch device, or auto: cuda if available else cpu (default auto)")
    add_data_args(p)
    p.add_argument("--out", required=True, help="output CSV: one row per model and validation source (written atomically)")
    p.add_argument("--windows-out", default=None, help="also write each model's per-window summed NLL and tokens to this CSV")
    p.set_defaults(func=cmd_milestones)


def _check_args(args):
    """Every argument checked before any work: the device exists, numbers are in range."""
    args.device = resolve_device(args.device)
    if getattr(args, "tau", None) is not None:
        check_tau(args.tau)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if getattr(args, "max_sequences", None) is not None and args.max_sequences < 1:
        raise ValueError(f"--max-sequences must be positive, got {args.max_sequences}")


def _columns(df, model, args):
    label = args.label or model_label(args.model)
    return df.assign(model=label, variant=args.variant or model_method(model, label), tau=model_tau(model))


# ---------------------------------------------------------------- commands


def cmd_ppl(args):
    from ..data import load_validation
    from .perplexity import MARGIN_COLUMNS, WINDOW_COLUMNS, evaluate_ppl

    _check_args(args)
    names = ["ppl.csv", "layers.csv", "windows.csv"] + (["gate_margins.csv"] if args.gate_margins else [])
    out = check_output_dir(args.out, names)
    outputs = [out / name for name in names]
    validation = load_validation(args.data)
    extra = {"gate_margins": True} if args.gate_margins else {}
    extra.update({"all_on": True} if args.all_experts_on else {})
    key = fingerprint([args.model, args.data], command="ppl", tau=args.tau, label=args.label, variant=args.variant,
                      max_sequences=args.max_sequences, dtype=args.dtype, rescale=args.no_gx_inference_rescale, **extra)
    if up_to_date(out / ".ppl.stamp.json", key, outputs):
        print(f"{out}: up to date, nothing to do")
        return
    model, _ = load_for_eval(args.model, args.dtype, args.device, args.tau, args.no_gx_inference_rescale, tokenizer=False)
    if args.all_experts_on:
        if not dsmoe_layers(model):
            raise ValueError(f"--all-experts-on: {args.model} is a dense model (no DSMoE layer to switch on)")
        args.label = f"{args.label or model_label(args.model)}{ALL_ON}"
    df = evaluate_ppl(model, validation, args.batch_size, args.max_sequences, gate_margins=args.gate_margins,
                      all_on=args.all_experts_on)
    front = ["model", "variant", "tau"]
    summary = apply_pruning_record(_columns(df, model, args), args.model)
    write_csv(summary[front + list(df.columns)], outputs[0])
    layers = _columns(df.attrs["layers"], model, args)
    write_csv(layers[front + ["source", "layer", "mean_active_experts"]], outputs[1])
    windows = _columns(df.attrs["windows"], model, args)
    write_csv(windows[front + WINDOW_COLUMNS], outputs[2])
    if args.gate_margins:
        write_csv(_columns(df.attrs["gate_margins"], model, args)[front + MARGIN_COLUMNS], outputs[3])
    write_stamp(out / ".ppl.stamp.json", key)
    print(summary[["source", "ppl", "tokens", "activated_params_pct", "mean_active_experts"]].to_string(index=False))


def cmd_massive(args):
    from ..data import load_validation
    from ..model import check_n_experts
    from .massive import massive_activations

    check_n_experts(args.n_experts)
    if args.top_units < 1 or args.batch_size < 1:
        raise ValueError("--top-units and --batch-size must be positive")
    out = check_output_file(args.out)
    validation = load_validation(args.data)
    windows = [w for sequences in validation.values() for w in sequences[:args.max_sequences]]
    model, _ = load_for_eval(args.model, "float32", "auto", tokenizer=False)
    df = massive_activations(model, windows, args.n_experts, args.top_units, args.batch_size)
    write_csv(df, out)
    print(df.to_string(index=False))


def cmd_sweep(args):
    from ..data import load_validation
    from .perplexity import WINDOW_COLUMNS, sweep_tau

    _check_args(args)
    for tau in args.taus:
        check_tau(tau)
    out = check_output_file(args.out)
    extra = {"--layers-out": args.layers_out, "--windows-out": args.windows_out}
    outputs = [out] + [check_output_file(path, flag) for flag, path in extra.items() if path]
    stamp = out.with_name(f".{out.name}.stamp.json")
    validation = load_validation(args.data)
    key = fingerprint([args.model, args.data], command="sweep", taus=args.taus, label=args.label, variant=args.variant,
                      max_sequences=args.max_sequences, dtype=args.dtype, layers_out=args.layers_out,
                      windows_out=args.windows_out, rescale=args.no_gx_inference_rescale)
    if up_to_date(stamp, key, outputs):
        print(f"{out}: up to date, nothing to do")
        return
    model, _ = load_for_eval(args.model, args.dtype, args.device, no_gx_inference_rescale=args.no_gx_inference_rescale,
                             tokenizer=False)
    df = sweep_tau(model, validation, args.taus, args.batch_size, args.max_sequences)
    layers, windows = df.attrs["layers"], df.attrs["windows"]
    label = args.label or model_label(args.model)
    variant = args.variant or model_method(model, label)
    df = df.assign(model=label, variant=variant, inference_rescale=inference_rescale(model))
    write_csv(df[["model", "variant"] + [c for c in df.columns if c not in ("model", "variant")]], out)
    if args.layers_out:
        layers = layers.assign(model=label, variant=variant)
        write_csv(layers[["model", "variant", "tau", "source", "layer", "mean_active_experts"]], args.layers_out)
    if args.windows_out:
        windows = windows.assign(model=label, variant=variant)
        write_csv(windows[["model", "variant", "tau", *WINDOW_COLUMNS]], args.windows_out)
    write_stamp(stamp, key)
    print(df[["tau", "ppl", "activated_params_pct", "mean_active_experts"]].to_string(index=False))


def cmd_lm_eval(args):
    from .harness import CSV_COLUMNS, STORYCLOZE_ENV, TASKS_DIR, bench_layers, run_bench, select_tasks

    _check_args(args)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    tasks = select_tasks(args.suite, args.tasks, args.num_fewshot)
    out = check_output_dir(args.out, ["results.json", "bench.csv", "bench_layers.csv"])
    outputs, stamp = [out / "results.json", out / "bench.csv", out / "bench_layers.csv"], out / ".bench.stamp.json"
    storycloze_dir = args.storycloze_dir or os.environ.get(STORYCLOZE_ENV)
    task_key = fingerprint([args.model, TASKS_DIR], tau=args.tau, limit=args.limit, dtype=args.dtype, storycloze_dir=storycloze_dir,
                           rescale=args.no_gx_inference_rescale)
    key = fingerprint([args.model, TASKS_DIR], tasks=tasks, task_key=task_key, label=args.label, variant=args.variant)
    if up_to_date(stamp, key, outputs):
        print(f"{out}: up to date, nothing to do")
        return
    model, tokenizer = load_for_eval(args.model, args.dtype, args.device, args.tau, args.no_gx_inference_rescale)
    results, df = run_bench(model, tokenizer, tasks, args.limit, args.batch_size, storycloze_dir,
                            cache_dir=out / ".tasks", cache_key=task_key)
    label = args.label or model_label(args.model)
    variant, tau = args.variant or model_method(model, label), model_tau(model)
    results["dsmoe"] = {"model": label, "variant": variant, "tau": None if math.isnan(tau) else tau, "limit": args.limit}
    df = df.assign(model=label, variant=variant, tau=tau).reindex(columns=CSV_COLUMNS)
    with atomic_file(outputs[0]) as handle:
        json.dump(results, handle, indent=2)
    write_csv(df, outputs[1])
    write_csv(bench_layers(results["activation"]).assign(model=label, variant=variant, tau=tau)
              .reindex(columns=["model", "variant", "tau", "task", "layer", "mean_active_experts"]), outputs[2])
    write_stamp(stamp, key)
    print(df[["task", "metric", "value", "stderr", "activated_params_pct"]].to_string(index=False))


def cmd_milestones(args):
    from ..data import load_validation
    from .milestones import COLUMNS, WINDOW_COLUMNS, evaluate_milestones

    _check_args(args)
    run, out = Path(args.run), check_output_file(args.out)
    windows_out = check_output_file(args.windows_out, "--windows-out") if args.windows_out else None
    stamp = out.with_name(f".{out.name}.stamp.json")
    validation = load_validation(args.data)
    key = fingerprint([run / "milestones", run / "model", run / "train_log.csv", args.data], command="milestones",
                      label=args.label, max_sequences=args.max_sequences, dtype=args.dtype, windows_out=args.windows_out)
    if up_to_date(stamp, key, [out] + ([windows_out] if windows_out else [])):
        print(f"{out}: up to date, nothing to do")
        return
    models = []

    def load(path):
        model, _ = load_for_eval(path, args.dtype, args.device, tokenizer=False)
        models.append(model_method(model))
        return model

    df = evaluate_milestones(run, validation, load, args.batch_size, args.max_sequences)
    windows = df.attrs["windows"]
    df = df.assign(model=args.label or run.name, variant=models[-1])
    write_csv(df[COLUMNS + [c for c in df.columns if c not in COLUMNS]], out)
    if windows_out:
        windows = windows.assign(model=args.label or run.name, variant=models[-1])
        write_csv(windows[["model", "variant", *WINDOW_COLUMNS]], windows_out)
    write_stamp(stamp, key)
    print(df[df["source"] == "all"][["step", "train_tokens", "ppl", "activated_params_pct"]].to_string(index=False))
