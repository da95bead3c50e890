"""`dsmoe convert` and `dsmoe info`: the happy path and every bad input (clear error, nothing written)."""

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import dsmoe
from dsmoe.cli import build_parser, main


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_convert_then_info(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    code, stdout, err = run_cli(["convert", "--model", tiny_model_dir, "--n-experts", 4, "--tau", 0.4,
                                 "--variant", "no_gx", "--out", out], capsys)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, dsmoe.DSMoEForCausalLM)
    assert (model.config.n_experts, model.config.tau, model.config.variant) == (4, 0.4, "no_gx")
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    code, stdout, err = run_cli(["info", out], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert info["n_experts"] == 4 and info["variant"] == "no_gx" and info["base_architecture"] == "LlamaForCausalLM"
    assert info["total_params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n-experts", "7"], "does not divide the intermediate size 64"),
        (["--tau", "1.0"], "open interval"),
        (["--tau", "-0.1"], "open interval"),
        (["--variant", "bogus"], "unknown variant 'bogus'"),
    ],
)
def test_convert_bad_arguments(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", "--model", tiny_model_dir, "--out", out, *extra], capsys)
    assert code == 2
    assert message in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_convert_missing_and_corrupt_model_paths(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", "--model", tmp_path / "nope", "--out", out], capsys)
    assert code == 2 and "does not exist" in err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    code, _, err = run_cli(["convert", "--model", corrupt, "--out", out], capsys)
    assert code == 2 and "cannot load a causal LM" in err
    assert not out.exists()


def test_convert_non_swiglu_model(tmp_path, capsys, smollm2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(smollm2_tokenizer))).save_pretrained(gpt2)
    smollm2_tokenizer.save_pretrained(gpt2)
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", "--model", gpt2, "--out", out], capsys)
    assert code == 2 and "GPT2LMHeadModel has no `model.layers`" in err
    assert not out.exists()


def iter_commands(parser, prefix="dsmoe"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest.split(" (")[0]: choice.help for choice in action._choices_actions}  # "name (alias)"
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # an alias of a command already walked
                    continue
                seen.add(id(sub))
                assert helps.get(name), f"{prefix} {name} has no help"
                yield from iter_commands(sub, f"{prefix} {name}")
        elif action.dest != "help":
            yield prefix, action


def test_convert_seed_gives_the_same_gates(tiny_model_dir, tmp_path):
    """`dsmoe convert --seed`: the same seed gives bitwise the same gates, another seed other gates."""
    from safetensors.torch import load_file

    def gates(name, seed):
        out = tmp_path / name
        assert main(["convert", "--model", str(tiny_model_dir), "--n-experts", "4", "--seed", str(seed), "--out", str(out)]) == 0
        torch.manual_seed(seed + 1)  # the RNG state outside the command must not matter
        return {k: v for k, v in load_file(out / "model.safetensors").items() if ".mlp.gate." in k}

    first, again, other = gates("a", 7), gates("b", 7), gates("c", 8)
    assert first and all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)


def test_every_flag_has_help():
    for command, action in iter_commands(build_parser()):
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"


def test_short_name_resolves_to_the_embedded_gguf():
    from dsmoe.hub import resolve_model

    directory, gguf_file = resolve_model("smollm2-135m")
    assert gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (__import__("pathlib").Path(directory) / gguf_file).is_file()
    assert resolve_model("some/hub-id") == ("some/hub-id", None)


@pytest.mark.slow
def test_embedded_smollm2_loads_with_working_special_tokens():
    model, tokenizer = dsmoe.load_model("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.intermediate_size == 1536
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.config.eos_token_id
    assert tokenizer.pad_token is not None
    ids = tokenizer("def add(a, b):\n    return a + b", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "def add(a, b):\n    return a + b"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>" in chat
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and loss < 5
