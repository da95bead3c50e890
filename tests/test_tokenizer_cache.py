"""The tokenizer of a GGUF file is parsed once, then read from its saved copy (dsmoe.hub): the same
tokenizer either way, a fresh copy when the file changes, and no cache where none can be written."""

import os

import pytest
from transformers import AutoTokenizer

from dsmoe.hub import load_tokenizer, resolve_model, tokenizer_cache_dir

TEXTS = ["def f(x):\n    return x ** 2\n", "<|im_start|>user\nhi<|im_end|>", "  tabs\tand € 😀 ünïcode", ""]


@pytest.fixture(scope="module")
def reference():
    directory, gguf_file = resolve_model("smollm2-135m")
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


def test_the_cached_tokenizer_is_the_gguf_tokenizer(reference, tmp_path, monkeypatch):
    from pydoc_data.topics import topics

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path))
    cache = tokenizer_cache_dir(*resolve_model("smollm2-135m"))
    assert cache.is_relative_to(tmp_path) and not cache.exists()
    first = load_tokenizer("smollm2-135m")  # parses the GGUF, writes the copy
    assert (cache / "tokenizer.json").is_file()
    cached = load_tokenizer("smollm2-135m")
    for tokenizer in (first, cached):
        assert tokenizer.get_vocab() == reference.get_vocab()
        for attr in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id",
                     "padding_side", "chat_template"):
            assert getattr(tokenizer, attr) == getattr(reference, attr), attr
        for text in TEXTS + sorted(topics.values())[:20]:
            ids = tokenizer(text)["input_ids"]
            assert ids == reference(text)["input_ids"] and tokenizer.decode(ids) == reference.decode(ids)


def test_a_changed_gguf_file_gets_a_new_copy(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"0" * 10)
    before = tokenizer_cache_dir(tmp_path, "m.gguf")
    os.utime(tmp_path / "m.gguf", ns=(1, 10**18))
    assert tokenizer_cache_dir(tmp_path, "m.gguf") != before


def test_an_unwritable_cache_only_costs_time(reference, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("DSMOE_CACHE", str(blocked))
    assert load_tokenizer("smollm2-135m").get_vocab() == reference.get_vocab()
