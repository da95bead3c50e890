"""`dsmoe pilot`: a few hundred steps of a recipe on the run's base model, to check it in minutes.

Converts the base model as the config says (gate init included), trains `--steps` steps with the
config's train section (`dsmoe train`), prints the activation, λ and LM loss against steps, saves
them as a PNG, and evaluates held-out perplexity of the
dense model, of the converted model before training and after, on the tuning split (`data.tune_sequences`)
where the data has one, else on the validation windows (with a warning):

    OUT/init/          the converted model
    OUT/run/           the training run: train_log.csv and model/ (its checkpoints are removed)
    OUT/ppl.csv        held-out perplexity and activation: dense, init, trained
    OUT/curves.png     activation (and the controller's target), λ and LM loss against steps
    OUT/pilot.json     the settings and the numbers

`--compare OTHER_OUT` draws another pilot's curves in the same PNG (e.g. the paper's recipe beside
this one: `--set dsmoe.gate_init=normal --set train.adaptive_sparsity.enabled=false`).
"""

import json
import logging
import shutil
import time
from pathlib import Path

import pandas as pd

from .config import variant_train

logger = logging.getLogger(__name__)
LOG_COLUMNS = ["step", "mean_active_fraction", "lambda", "lm_loss", "sparsity_loss"]


def pilot_config(config, steps):
    """The config of an N-step pilot: DSMoE's train section (its train_overrides merged), the token budget of
    `steps` batches, one checkpoint at the end."""
    config["train"], config["train_overrides"] = variant_train(config, "dsmoe"), {}  # the pilot trains DSMoE
    train = config["train"]
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    train["tokens"] = steps * train["batch_size"] * config["data"]["seq_len"]
    train["checkpoint_every"], train["keep_checkpoints"] = steps, 1
    return config


def held_out_split(data_dir):
    """The split a pilot evaluates on: the tuning split where the data has one, else validation (with a warning)."""
    from .data.prepared import has_split

    if has_split(data_dir, "tune"):
        return "tune"
    logger.warning("%s has no tuning split (data.tune_sequences): the pilot evaluates on the validation windows, "
                   "so do not report results on them for settings chosen here", data_dir)
    return "val"


def held_out_ppl(model, validation, config, label):
    """The "all" row of `evaluate_ppl` on the validation windows, labelled."""
    from .evaluation.perplexity import evaluate_ppl

    ev = config["eval"]
    df = evaluate_ppl(model, validation, ev["batch_size"], ev["ppl_max_sequences"], progress=False)
    row = df.set_index("source").loc["all"].to_dict()
    return {"model": label, **row}


def convert_base(config, data_dir, out, validation):
    """Convert the run's base model as the config says, into OUT/init; held-out ppl of dense and init."""
    from .convert import ConversionOptions, calibration_inputs, convert
    from .hub import build_base_model, save_model

    model, tokenizer = build_base_model(config)
    model.eval()
    rows = [held_out_ppl(model, validation, config, "dense")] if validation else []
    settings = config["dsmoe"]
    ids = calibration_inputs(data_dir, settings["calibration_sequences"]) if settings["gate_init"] == "calibrated" else None
    model = convert(model, ConversionOptions.from_config(config), calibration_ids=ids).eval()
    if validation:
        rows.append(held_out_ppl(model, validation, config, "init"))
    save_model(model, tokenizer, out / "init")
    return rows


def read_log(run_dir):
    return pd.read_csv(Path(run_dir) / "train_log.csv")


def print_curve(log, every):
    """Activation, λ and LM loss against steps, one line per `every` steps (and the last)."""
    rows = log[(log["step"] % every == 0) | (log["step"] == log["step"].max()) | (log["step"] == log["step"].min())]
    print(f"{'step':>6} {'active':>7} {'lambda':>10} {'lm_loss':>8}")
    for _, row in rows.iterrows():
        print(f"{int(row['step']):6d} {row['mean_active_fraction']:7.3f} {row['lambda']:10.4g} {row['lm_loss']:8.3f}")


def run_pilot(config, steps, data_dir, out, compare=(), label=None, evaluate=True):
    """Convert, train `steps` steps, evaluate and plot; return the pilot.json summary."""
    from .data import load_validation, read_manifest
    from .hub import load_model
    from .report.plots import pilot_curves
    from .train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = pilot_config(config, steps)
    if read_manifest(data_dir)["seq_len"] != config["data"]["seq_len"]:
        raise ValueError(f"{data_dir} was prepared with another seq_len than data.seq_len={config['data']['seq_len']}")
    split = held_out_split(data_dir) if evaluate else None
    validation = load_validation(data_dir, split) if evaluate else None
    start = time.perf_counter()
    rows = convert_base(config, data_dir, out, validation)
    train(config, out / "init", data_dir, out / "run", overwrite=True, resume=False)
    shutil.rmtree(out / "run" / "checkpoints", ignore_errors=True)  # optimizer state: GBs a pilot does not need
    wall = time.perf_counter() - start
    if evaluate:
        trained, _ = load_model(str(out / "run" / "model"))
        rows.append(held_out_ppl(trained, validation, config, "trained"))
        pd.DataFrame(rows).to_csv(out / "ppl.csv", index=False)
    log = read_log(out / "run")
    label = label or out.name
    summary = summarize(config, steps, log, rows, label, wall, split)
    (out / "pilot.json").write_text(json.dumps(summary, indent=2))
    curves = {label: log, **{Path(other).name: read_log(Path(other) / "run") for other in compare}}
    pilot_curves(curves, out / "curves.png", config["train"]["adaptive_sparsity"])
    return summary


def summarize(config, steps, log, ppl_rows, label, wall, split=None):
    adaptive = config["train"]["adaptive_sparsity"]
    tail = log.tail(max(1, len(log) // 10))
    return {
        "label": label, "steps": steps, "wall_s": round(wall, 1),
        "gate_init": config["dsmoe"]["gate_init"], "adaptive_sparsity": adaptive,
        "sparsity_lambda": config["train"]["sparsity_lambda"], "lr": config["train"]["lr"],
        "gate_lr": config["train"]["gate_lr"], "mixed_precision": config["train"]["mixed_precision"],
        "batch": [config["train"]["batch_size"], config["data"]["seq_len"]],
        "activation_first": float(log["mean_active_fraction"].iloc[0]),
        "activation_last_10pct": float(tail["mean_active_fraction"].mean()),
        "lm_loss_first": float(log["lm_loss"].iloc[0]), "lm_loss_last_10pct": float(tail["lm_loss"].mean()),
        "lambda_range": [float(log["lambda"].min()), float(log["lambda"].max())], "held_out_split": split,
        "tokens_per_s": float(log["tokens_per_s"].median()),
        "held_out": {row["model"]: {"ppl": row["ppl"], "mean_active_experts": row["mean_active_experts"],
                                    "activated_params_pct": row["activated_params_pct"]} for row in ppl_rows},
    }


# ---------------------------------------------------------------- CLI: dsmoe pilot


def register(subparsers):
    p = subparsers.add_parser("pilot", help="a short training run of a recipe: activation, λ and LM loss against steps")
    p.add_argument("--config", required=True, help="run config YAML (base model, dsmoe, data and train sections)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default %(default)s)")
    p.add_argument("--out", required=True, help="pilot directory: init/, run/, ppl.csv, curves.png, pilot.json")
    p.add_argument("--data", help="prepared data directory (dsmoe data prepare) with the config's seq_len; "
                                  "default: prepared into OUT/data")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. dsmoe.gate_init=normal")
    p.add_argument("--compare", action="append", default=[], metavar="PILOT_DIR", help="draw another pilot's curves too")
    p.add_argument("--label", help="name of this pilot in the plot (default: the --out directory's name)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out perplexities (curves only)")
    p.set_defaults(func=cmd_pilot)


def cmd_pilot(args):
    from .config import load_config, parse_overrides

    config = load_config(args.config, parse_overrides(args.set))
    data_dir = args.data
    if data_dir is None:
        from .data import prepare
        from .hub import load_tokenizer

        data_dir = Path(args.out) / "data"
        prepare(pilot_config(config, args.steps), load_tokenizer(config["base_model"]), data_dir)
    summary = run_pilot(config, args.steps, data_dir, args.out, args.compare, args.label, not args.no_eval)
    print_curve(read_log(Path(args.out) / "run"), max(1, args.steps // 20))
    for name, row in summary["held_out"].items():
        print(f"held-out ppl {name:8s} {row['ppl']:10.3f}  ({row['activated_params_pct']:.1f}% of params active)")
    print(f"wrote {Path(args.out) / 'curves.png'} and {Path(args.out) / 'pilot.json'}")
