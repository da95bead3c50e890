"""What is read from a GGUF file (the embedded SmolLM2) is parsed once, then loaded from its saved copy
(dsmoe.hub): the same tokenizer and the same weights either way, a new copy when the file changes,
and no copy where none can be written."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsmoe.hub import gguf_cache_dir, load_model, load_tokenizer, resolve_model

TEXTS = ["def f(x):\n    return x ** 2\n", "<|im_start|>user\nhi<|im_end|>", "  tabs\tand € 😀 ünïcode", ""]
SMOLLM2 = resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def reference_tokenizer():
    return AutoTokenizer.from_pretrained(SMOLLM2[0], gguf_file=SMOLLM2[1])


def assert_same_tokenizer(tokenizer, reference):
    from pydoc_data.topics import topics

    assert tokenizer.get_vocab() == reference.get_vocab()
    for attr in ("bos_token", "eos_token", "bos_token_id", "eos_token_id", "padding_side", "chat_template"):
        assert getattr(tokenizer, attr) == getattr(reference, attr), attr
    for text in TEXTS + sorted(topics.values())[:20]:
        ids = tokenizer(text)["input_ids"]
        assert ids == reference(text)["input_ids"] and tokenizer.decode(ids) == reference.decode(ids)


def test_the_cached_tokenizer_is_the_gguf_tokenizer(reference_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path))
    cache = gguf_cache_dir(*SMOLLM2, "tokenizer")
    assert cache.is_relative_to(tmp_path) and not cache.exists()
    first = load_tokenizer("smollm2-135m")  # parses the GGUF, writes the copy
    assert (cache / "tokenizer.json").is_file()
    assert_same_tokenizer(first, reference_tokenizer)
    assert_same_tokenizer(load_tokenizer("smollm2-135m"), reference_tokenizer)


@pytest.mark.slow
def test_the_cached_model_is_the_dequantized_gguf_model(reference_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path))
    reference = AutoModelForCausalLM.from_pretrained(SMOLLM2[0], gguf_file=SMOLLM2[1], dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    for attempt in ("read and saved", "from the copy"):
        model, tokenizer = load_model("smollm2-135m")
        assert (gguf_cache_dir(*SMOLLM2, "model") / "model.safetensors").is_file(), attempt
        assert model.config.name_or_path == "smollm2-135m" and getattr(model.config, "quantization_config", None) is None
        weights = model.state_dict()
        for key, value in reference.state_dict().items():
            assert torch.equal(weights[key], value), (attempt, key)
        with torch.no_grad():
            assert torch.equal(model.eval()(input_ids=ids).logits, expected), attempt
        assert tokenizer.pad_token == tokenizer.eos_token
    bf16, _ = load_model("smollm2-135m", dtype=torch.bfloat16, tokenizer=False)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_a_changed_gguf_file_gets_a_new_copy(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"0" * 10)
    before = gguf_cache_dir(tmp_path, "m.gguf", "model")
    os.utime(tmp_path / "m.gguf", ns=(1, 10**18))
    assert gguf_cache_dir(tmp_path, "m.gguf", "model") != before


def test_an_unwritable_cache_only_costs_time(reference_tokenizer, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("DSMOE_CACHE", str(blocked))
    assert_same_tokenizer(load_tokenizer("smollm2-135m"), reference_tokenizer)
