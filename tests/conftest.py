import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    fields = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    fields.update(overrides)
    return LlamaConfig(**fields)


@pytest.fixture(scope="session")
def llama_config():
    """`llama_config(**overrides)`: a tiny random LlamaConfig."""
    return tiny_llama_config


def tiny_bpe_tokenizer():
    """A byte-level BPE with 320 tokens trained on a few pydoc topics: tokenises any text, offline, fast."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sorted(topics.values())[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return tiny_bpe_tokenizer()


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from dsmoe.hub import resolve_model

    directory, gguf_file = resolve_model("smollm2-135m")
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random dense LLaMA with SmolLM2's tokenizer, saved as a transformers checkpoint."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = smollm2_tokenizer
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), tie_word_embeddings=True,
                                               bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id))
    path = tmp_path_factory.mktemp("tiny") / "dense"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
