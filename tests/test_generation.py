"""Batched, left-padded generation through lm-eval's `generate_until` (the paper's GSM8K, NQ, TriviaQA,
WebQs path): prompts of different lengths at batch 4 give the same text as one at a time, for a dense
model and the same model converted to DSMoE (its sparse inference path, padding in the batch)."""

import pytest
import torch
from transformers import LlamaForCausalLM

import dsmoe
from dsmoe.evaluation.harness import wrap_model
from conftest import tiny_llama_config

PROMPTS = ["def main():", "The quick brown fox", "import os\nimport sys\n\nclass Loader", "x = 1", "for i in range(10):",
           "Return the sum of", "a", "The lexical analysis of a Python program reads"]


def generate(model, tokenizer, batch_size):
    from lm_eval.api.instance import Instance

    lm = wrap_model(model, tokenizer, batch_size=batch_size)
    requests = [Instance(request_type="generate_until", doc={}, idx=i,
                         arguments=(prompt, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}))
                for i, prompt in enumerate(PROMPTS)]
    return lm.generate_until(requests, disable_tqdm=True), lm


@pytest.mark.parametrize("kind", ["dense", "dsmoe"])
def test_batched_left_padded_generation_matches_batch_1(kind, bpe_tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(bpe_tokenizer), eos_token_id=bpe_tokenizer.eos_token_id))
    if kind == "dsmoe":
        model = dsmoe.convert(model, n_experts=8, tau=0.5)
    one, _ = generate(model.eval(), bpe_tokenizer, batch_size=1)
    batched, _ = generate(model.eval(), bpe_tokenizer, batch_size=4)
    assert len({len(bpe_tokenizer(p)["input_ids"]) for p in PROMPTS}) > 3  # the batches hold padding
    assert any(text for text in one)
    assert batched == one
