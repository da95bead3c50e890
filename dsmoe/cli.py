"""`dsmoe` command line: one subcommand per stage of the workflow.

Each stage's module adds its own subcommands through `register(subparsers)`.
"""

import argparse
import importlib
import json
import logging
import sys

STAGE_MODULES = ["dsmoe.cli", "dsmoe.train", "dsmoe.evaluate", "dsmoe.baselines", "dsmoe.figures"]


def register(subparsers):
    p = subparsers.add_parser("base", help="write a run's dense base model (and tokenizer) to a directory")
    p.add_argument("--config", required=True, help="run config YAML (see config/config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. dsmoe.tau=0.6")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.set_defaults(func=cmd_base)

    p = subparsers.add_parser("convert", help="convert a dense SwiGLU causal LM to DSMoE and save it")
    p.add_argument("--model", required=True, help="short name (smollm2-135m), local directory or Hugging Face id")
    p.add_argument("--n-experts", type=int, default=8, help="experts per FFN; must divide the intermediate size (default 8)")
    p.add_argument("--tau", type=float, default=0.5, help="gate threshold τ in (0, 1) (default 0.5)")
    p.add_argument("--variant", default="dsmoe", help="dsmoe | no_ste | no_gx | topk: the training forward (default dsmoe)")
    p.add_argument("--top-k", type=int, default=3, help="experts per token of the topk variant (default 3)")
    p.add_argument("--gate-init-std", type=float, default=0.02, help="std of the normal init of the gate (default 0.02)")
    p.add_argument("--gate-init", choices=["normal", "calibrated"], default="normal",
                   help="normal: N(0, std²) as in the paper; calibrated (beyond the paper): every expert starts open, "
                        "fitted on --calibration-data (see dsmoe/gate_init.py)")
    p.add_argument("--calibration-data", help="prepared data directory (dsmoe data prepare) for --gate-init calibrated")
    p.add_argument("--calibration-sequences", type=int, default=16, help="training sequences used to calibrate (default 16)")
    p.add_argument("--calibration-target", type=float, default=0.9, help="gate value σ of a median token after calibration (default 0.9)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("info", help="print a checkpoint's architecture, DSMoE settings and parameter counts")
    p.add_argument("path", help="checkpoint directory or short model name")
    p.set_defaults(func=cmd_info)


def cmd_base(args):
    from .base import build_base_model, save_model
    from .config import load_config, parse_overrides

    config = load_config(args.config, parse_overrides(args.set))
    model, tokenizer = build_base_model(config)
    save_model(model, tokenizer, args.out)
    print(f"wrote {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} params) to {args.out}")


def cmd_convert(args):
    from .base import save_model
    from .convert import convert, load_model, validate_conversion
    from .gate_init import calibration_ids

    ids = None
    if args.gate_init == "calibrated":
        if not args.calibration_data:
            raise ValueError("--gate-init calibrated needs --calibration-data DATA")
        ids = calibration_ids(args.calibration_data, args.calibration_sequences)
    model, tokenizer = load_model(args.model)
    validate_conversion(model, args.n_experts, args.tau, args.variant, args.top_k)
    model = convert(model, args.n_experts, args.tau, args.variant, args.top_k, args.gate_init_std,
                    calibration_ids=ids, calibration_target=args.calibration_target)
    save_model(model, tokenizer, args.out)
    print(f"wrote {args.variant} model with {args.n_experts} experts per FFN, tau={args.tau}, to {args.out}")


def cmd_info(args):
    from .convert import load_model
    from .routing import activated_params

    model, _ = load_model(args.path)
    config = model.config
    info = {"class": type(model).__name__, "model_type": config.model_type}
    if config.model_type == "dsmoe":
        info.update(n_experts=config.n_experts, tau=config.tau, variant=config.variant,
                    base_architecture=config.base_architecture)
        config = config.text_config
    info.update(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_hidden_layers, total_params=activated_params(model)["total_params"])
    print(json.dumps(info, indent=2))


def build_parser():
    parser = argparse.ArgumentParser(prog="dsmoe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGE_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"dsmoe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
