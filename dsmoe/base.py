"""The dense base model of a run: loaded by name, or a tiny random LLaMA for smoke runs."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .convert import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name="auto"):
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def build_base_model(config):
    """Return `(model, tokenizer)` for a validated run config (see `dsmoe.config`)."""
    dtype = resolve_dtype(config["dtype"])
    if config.get("random_init") is None:
        return load_model(config["base_model"], dtype=dtype)
    _, tokenizer = load_model(config["base_model"])
    fields = {"vocab_size": len(tokenizer), "tie_word_embeddings": True, **config["random_init"]}
    fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    torch.manual_seed(config["train"]["seed"])
    model = LlamaForCausalLM(LlamaConfig(**fields)).to(dtype)
    return model, tokenizer


def save_model(model, tokenizer, out, extra_files=(), **save_kwargs):
    """Write `model` and `tokenizer` (and copies of `extra_files`) to `out` atomically."""
    import shutil

    from .io import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        tokenizer.save_pretrained(tmp)
        for extra in extra_files:
            shutil.copy(extra, tmp)
