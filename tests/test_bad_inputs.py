"""Issue 12, items 6-14: every bad input gets a clear error before work starts, never a silent wrong
result or a raw traceback (the Snakemake side of items 11 and 12 is in tests/test_workflow.py)."""

import argparse
import errno
import importlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import dsmoe
from dsmoe import cli
from dsmoe.config import ConfigError, load_config, parse_overrides, validate_config
from dsmoe.hub import save_model

CONVERT = importlib.import_module("dsmoe.convert")  # the module; dsmoe.convert is its function


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_data(root, seq_len=12, n_val=4, vocab=1000):
    """A tiny DATA directory in the `dsmoe data prepare` layout, one source."""
    rng = np.random.default_rng(0)
    (root / "src").mkdir(parents=True)
    np.save(root / "src" / "val.npy", rng.integers(0, vocab, (n_val, seq_len)).astype(np.int32))
    np.save(root / "src" / "train.npy", rng.integers(0, vocab, 100).astype(np.int32))
    (root / "manifest.json").write_text(json.dumps({"seq_len": seq_len, "tokenizer": "test", "sources": {"src": {}}}))
    return root


@pytest.fixture(scope="module")
def moe_dir(tiny_model_dir, tmp_path_factory):
    """A converted tiny model with its tokenizer."""
    model, tokenizer = dsmoe.load_model(str(tiny_model_dir))
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("bad_inputs") / "moe"
    save_model(dsmoe.convert(model, n_experts=4, tau=0.5, gate_init_std=1.0), tokenizer, path)
    return path


def copy_model(src, dst, drop=()):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    return dst


# ---------------------------------------------------------------- 6: a checkpoint missing weights


def test_item6_checkpoint_missing_gate_weights_is_refused(moe_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = copy_model(moe_dir, tmp_path / "no_gates")
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.endswith("mlp.gate.weight")}, broken / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"incomplete checkpoint: 2 weight tensor\(s\)") as caught:
        dsmoe.load_model(str(broken))
    assert "model.layers.0.mlp.gate.weight" in str(caught.value) and "model.layers.1.mlp.gate.weight" in str(caught.value)
    code, _, err = run_cli(["info", broken], capsys)
    assert code == 2 and "model.layers.1.mlp.gate.weight" in err
    # the complete checkpoint loads: its lm_head is tied to the embedding, which is not "missing"
    model, _ = dsmoe.load_model(str(moe_dir))
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


# ---------------------------------------------------------------- 7: heads that scale the logits


def tiny_granite(vocab_size=128, logits_scaling=8.0):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           logits_scaling=logits_scaling, tie_word_embeddings=True)
    return GraniteForCausalLM(config).eval()


def test_item7_granite_conversion_is_refused_by_name(tmp_path, capsys, smollm2_tokenizer):
    with pytest.raises(TypeError, match=r"model type 'granite' cannot be converted: .*logits_scaling=8.0"):
        dsmoe.convert(tiny_granite(), n_experts=4)
    path = tmp_path / "granite"
    tiny_granite(vocab_size=len(smollm2_tokenizer)).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    code, _, err = run_cli(["convert", "--model", path, "--n-experts", 4, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "'granite'" in err and "logits_scaling" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type, field", [("gemma2", "final_logit_softcapping"), ("cohere", "logit_scale")])
def test_item7_softcapping_and_logit_scale_are_refused_by_name(model_type, field):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(TypeError, match=rf"model type '{model_type}' cannot be converted: .*{field}="):
        dsmoe.convert(model, n_experts=4)
    assert not dsmoe.dsmoe_layers(model)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "ministral", "qwen2", "qwen3", "olmo", "olmo2", "gemma",
                                        "smollm3", "helium"])  # dsmoe.convert.PLAIN_HEAD_MODEL_TYPES
def test_item7_every_plain_head_type_converts_to_its_dense_logits(model_type):
    """The accepted list is right: each type converts (passing the dense-equivalence check), and the
    converted model with every expert on gives the dense logits on other tokens, batched."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
    converted = dsmoe.convert(model, n_experts=4).eval()
    assert converted.config.text_config.model_type == model_type
    with CONVERT.all_experts_on(converted), torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, dense, rtol=1e-4, atol=1e-5)


def test_item7_conversion_checks_dense_equivalence(monkeypatch, tiny_llama):
    """With every expert forced on, a converted model must reproduce its parent's logits: a head that the
    type check let through by mistake (here Granite's, 8x) is caught, and the dense MLPs are put back."""
    monkeypatch.setattr(CONVERT, "PLAIN_HEAD_MODEL_TYPES", (*CONVERT.PLAIN_HEAD_MODEL_TYPES, "granite"))
    granite = tiny_granite()
    mlp_types = [type(layer.mlp) for layer in granite.model.layers]
    with pytest.raises(ValueError, match="does not reproduce its dense parent"):
        dsmoe.convert(granite, n_experts=4)
    assert [type(layer.mlp) for layer in granite.model.layers] == mlp_types
    # a LLaMA passes, and all_experts_on leaves the gates as they were
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = tiny_llama(ids).logits
    model = dsmoe.convert(tiny_llama, n_experts=4).eval()
    gates = [layer.gate for layer in dsmoe.dsmoe_layers(model)]
    with CONVERT.all_experts_on(model), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-4, atol=1e-5)
    assert [layer.gate for layer in dsmoe.dsmoe_layers(model)] == gates


@pytest.mark.parametrize("partition", ["contiguous", "random"])
def test_item7_dense_equivalence_is_exact_in_bfloat16(llama_config, partition):
    """The check compares the same GEMMs on the same weights: bitwise equal logits in bf16 too, so its
    tolerance never refuses a good conversion (the sparse path, summed per expert, is 3% off in bf16)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(num_hidden_layers=4)).to(torch.bfloat16).eval()
    torch.manual_seed(1)
    converted = dsmoe.convert(model, n_experts=4, partition=partition, check=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with CONVERT.all_experts_on(converted), torch.no_grad():
        all_on = converted(input_ids=ids, use_cache=False).logits.float()
    dense = LlamaForCausalLM(model.config).to(torch.bfloat16).eval()
    dense.load_state_dict({k: v for k, v in converted.state_dict().items() if ".mlp.gate." not in k})
    with torch.no_grad():
        assert torch.equal(all_on, dense(input_ids=ids, use_cache=False).logits.float())


# ---------------------------------------------------------------- 8: random_init


def test_item8_random_init_unknown_key_and_small_vocabulary(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"random_init.num_hidden_layer.*did you mean 'num_hidden_layers'"):
        validate_config({"random_init": {"num_hidden_layer": 2, "hidden_size": 32, "intermediate_size": 64}})
    config = tmp_path / "small_vocab.yaml"
    config.write_text(f"base_model: {tiny_model_dir}\nrandom_init: {{vocab_size: 100, hidden_size: 32, intermediate_size: "
                      "64, num_hidden_layers: 1, num_attention_heads: 4}\ndsmoe: {n_experts: 4}\n")
    code, _, err = run_cli(["base", "--config", config, "--out", tmp_path / "base"], capsys)
    assert code == 2 and "random_init.vocab_size" in err and "100 is smaller than" in err
    assert not (tmp_path / "base").exists()


# ---------------------------------------------------------------- 9: --gate-init-std


@pytest.mark.parametrize("std", ["0", "-1", "nan"])
def test_item9_gate_init_std_must_be_positive(tiny_model_dir, tmp_path, capsys, std):
    code, _, err = run_cli(["convert", "--model", tiny_model_dir, "--gate-init-std", std, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "gate_init_std must be a positive number" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="gate_init_std must be a positive number"):
        dsmoe.convert(model, n_experts=4, gate_init_std=float(std))
    assert not dsmoe.dsmoe_layers(model)


# ---------------------------------------------------------------- 10: invalid UTF-8


def test_item10_invalid_utf8_is_counted_and_refused_above_a_threshold(tmp_path, caplog):
    from dsmoe.data import source_documents

    (tmp_path / "latin1.txt").write_bytes("Größe, Übermaß, café. ".encode("latin-1") * 50)
    (tmp_path / "nearly.txt").write_bytes(b"plain text " * 1000 + b"\xff")  # 1 bad byte in 11001
    source = {"name": "docs", "kind": "txt", "path": str(tmp_path / "latin1.txt")}
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text: 250 of its 1100 bytes cannot be decoded"):
        source_documents(source)
    with caplog.at_level(logging.WARNING):
        documents, _ = source_documents({**source, "path": str(tmp_path / "nearly.txt")})
    assert documents[0].endswith("\ufffd") and "nearly.txt: 1 undecodable bytes" in caplog.text
    (tmp_path / "rows.jsonl").write_bytes(b'{"text": "' + "café".encode("latin-1") * 20 + b'"}\n')
    with pytest.raises(ValueError, match="rows.jsonl is not UTF-8 text"):
        source_documents({"name": "rows", "kind": "jsonl", "path": str(tmp_path / "rows.jsonl")})


# ---------------------------------------------------------------- 11: rules across keys, in one place


@pytest.mark.parametrize("config, key, words", [
    ({"variants": ["topk"], "dsmoe": {"n_experts": 2, "top_k": 3}}, "dsmoe.top_k", "exceeds dsmoe.n_experts=2"),
    ({"variants": ["dsmoe", "topk_switch"], "dsmoe": {"n_experts": 2, "top_k": 3}}, "dsmoe.top_k", "topk_switch variant"),
    ({"random_init": {"intermediate_size": 60}}, "dsmoe.n_experts", "does not divide the FFN intermediate size 60"),
    ({"random_init": {"hidden_size": 32}, "dsmoe": {"n_experts": 7}}, "dsmoe.n_experts", "11008"),
    ({"train": {"batch_size": 6, "micro_batch_size": 4}}, "train.batch_size", "not a multiple of train.micro_batch_size"),
    ({"train": {"tokens": 1000, "batch_size": 4}, "data": {"seq_len": 512}}, "train.tokens", "smaller than one batch, one optimizer step"),
    ({"data": {"sources": [{"name": "a", "kind": "txt", "path": "x"}, {"name": "a", "kind": "txt", "path": "y"}]}},
     "data.sources[1].name", "names must be unique"),
    ({"variants": ["dsmoe"], "train_overrides": {"no_ste": {"lr": 1e-3}}}, "train_overrides.no_ste",
     "no_ste is not one of this run's variants (dsmoe)"),
    ({"variants": ["dsmoe", "no_gx"], "train_overrides": {"no_gx": {"adaptive_sparsity": {"target_fraction": 2}}}},
     "train_overrides.no_gx", "the merged train section is invalid: key 'train.adaptive_sparsity.target_fraction'"),
    ({"variants": ["dsmoe", "no_ste"], "train_overrides": {"no_ste": {"tokens": 4096}}}, "train_overrides.no_ste.tokens",
     "holds for the whole run"),
])
def test_item11_cross_field_rules_name_the_key(config, key, words):
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    assert f"key {key!r}" in str(caught.value) and words in str(caught.value)


def test_item11_n_experts_checked_against_a_local_base_model(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"'dsmoe.n_experts'.*intermediate size 64 \(intermediate_size of .*config.json"):
        validate_config({"base_model": str(tiny_model_dir), "dsmoe": {"n_experts": 5}})
    validate_config({"base_model": str(tiny_model_dir), "dsmoe": {"n_experts": 4}, "variants": ["dsmoe"]})


# ---------------------------------------------------------------- 12: 1e-4


def test_item12_exponent_floats_in_yaml_and_set(tmp_path):
    config = tmp_path / "lr.yaml"
    config.write_text("train: {lr: 1e-4, tokens: 5e6}\n")
    loaded = load_config(config)
    assert loaded["train"]["lr"] == 1e-4 and loaded["train"]["tokens"] == 5e6
    overridden = load_config(config, parse_overrides(["train.lr=3E-5", 'run_name="1e5"', "random_init.rms_norm_eps=1e-5"]))
    assert overridden["train"]["lr"] == 3e-5 and isinstance(overridden["train"]["lr"], float)
    assert overridden["run_name"] == "1e5" and overridden["random_init"]["rms_norm_eps"] == 1e-5
    # a config read by a YAML 1.1 reader (Snakemake's --configfile): strings become numbers where the schema
    # expects a number (and in the free-form random_init), nowhere else
    from dsmoe.config import coerce_numbers

    assert coerce_numbers({"run_name": "1e5", "train": {"lr": "1e-4", "betas": ["9e-1", 0.95]},
                           "random_init": {"rms_norm_eps": "1e-5", "hidden_act": "silu"}}) == {
        "run_name": "1e5", "train": {"lr": 1e-4, "betas": [0.9, 0.95]},
        "random_init": {"rms_norm_eps": 1e-5, "hidden_act": "silu"}}


# ---------------------------------------------------------------- 13: messages, not tracebacks


def test_item13_missing_or_non_model_paths(tmp_path, capsys):
    code, _, err = run_cli(["convert", "--model", "some/dir/model", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "'some/dir/model' does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["info", tmp_path / "empty"], capsys)
    assert code == 2 and "holds no model" in err and "sentencepiece" not in err
    (tmp_path / "file.txt").write_text("hi")
    code, _, err = run_cli(["info", tmp_path / "file.txt"], capsys)
    assert code == 2 and "is a file, not a model directory" in err
    code, _, err = run_cli(["info", "nobody-here/no-model"], capsys)  # offline (conftest): a Hub id that cannot load
    assert code == 2 and "'nobody-here/no-model'" in err and "Hugging Face id" in err


def test_item13_full_and_read_only_disk(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr("transformers.modeling_utils.safe_save_file", full)
        code, _, err = run_cli(["convert", "--model", tiny_model_dir, "--n-experts", 4, "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"{tmp_path / 'o'}: No space left on device" in err and "Traceback" not in err

    def read_only(prefix="", dir=None, **kwargs):  # as tempfile.mkdtemp fails on a read-only mount
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, f"{prefix}x1y2z3"))

    with monkeypatch.context() as patch:
        patch.setattr("tempfile.mkdtemp", read_only)
        code, _, err = run_cli(["convert", "--model", tiny_model_dir, "--n-experts", 4, "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"{tmp_path}/.o.tmp-" in err and "x1y2z3: Read-only file system" in err and "Traceback" not in err


def test_item13_unwritable_out_fails_before_evaluating(moe_dir, tmp_path, capsys, monkeypatch):
    """A read-only (here: not writable) directory for --out is found before the model is loaded."""
    data = write_data(tmp_path / "DATA")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr("os.access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    monkeypatch.setattr("dsmoe.evaluation.cli.load_for_eval", lambda *a, **k: pytest.fail("evaluated first"))
    code, _, err = run_cli(["eval", "ppl", "--model", moe_dir, "--data", data, "--out", locked / "ppl"], capsys)
    assert code == 2 and f"{locked}: Permission denied (cannot write --out" in err


def test_item13_full_or_read_only_disk_fails_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """convert, base, data prepare, baseline prune (check_out): a full or read-only folder for --out is found first."""
    from types import SimpleNamespace

    full, read_only = tmp_path / "full", tmp_path / "ro"
    full.mkdir(), read_only.mkdir()
    real_statvfs, real_access = os.statvfs, os.access

    def statvfs(path):
        stats = real_statvfs(path)
        if Path(path) == full:
            return SimpleNamespace(f_blocks=stats.f_blocks, f_bavail=0, f_flag=stats.f_flag)
        return SimpleNamespace(f_blocks=stats.f_blocks, f_bavail=stats.f_bavail,
                               f_flag=stats.f_flag | (os.ST_RDONLY if Path(path) == read_only else 0))

    monkeypatch.setattr("os.statvfs", statvfs)
    monkeypatch.setattr("os.access", lambda path, mode, **kw: Path(path) != read_only and real_access(path, mode, **kw))
    monkeypatch.setattr("dsmoe.hub.load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    code, _, err = run_cli(["convert", "--model", tiny_model_dir, "--out", full / "moe"], capsys)
    assert code == 2 and f"{full}: No space left on device (cannot write --out" in err
    code, _, err = run_cli(["convert", "--model", tiny_model_dir, "--out", read_only / "a" / "moe"], capsys)
    assert code == 2 and f"{read_only}: Read-only file system (cannot write --out" in err
    assert not (full / "moe").exists() and not (read_only / "a").exists()


def test_item13_truncated_safetensors(moe_dir, tmp_path, capsys):
    broken = copy_model(moe_dir, tmp_path / "truncated")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run_cli(["info", broken], capsys)
    assert code == 2 and f"{weights} is damaged or truncated" in err


def test_item13_truncated_val_npy(moe_dir, tmp_path, capsys):
    data = write_data(tmp_path / "DATA")
    val = data / "src" / "val.npy"
    val.write_bytes(val.read_bytes()[:-20])
    code, _, err = run_cli(["eval", "ppl", "--model", moe_dir, "--data", data, "--out", tmp_path / "ppl"], capsys)
    assert code == 2 and f"{val} is damaged or truncated" in err


def test_item13_text_source_that_is_a_directory(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text " * 100)
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{seq_len: 16, val_sequences: 2, sources: [{{name: docs, kind: txt, "
                      f"path: {tmp_path / 'corpus'}}}]}}\ntrain: {{tokens: 2000, batch_size: 2}}\n")
    code, _, err = run_cli(["data", "prepare", "--config", config, "--model", tiny_model_dir, "--out", tmp_path / "d"],
                           capsys)
    assert code == 2 and "is a directory, not a file" in err and f"{tmp_path / 'corpus'}/*.txt" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_item13_device_cuda_without_a_gpu(moe_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dsmoe.evaluation.cli.load_for_eval", lambda *a, **k: pytest.fail("loaded the model"))
    data = write_data(tmp_path / "DATA")
    for command, out in [("ppl", tmp_path / "ppl"), ("sweep", tmp_path / "sweep.csv")]:
        code, _, err = run_cli(["eval", command, "--model", moe_dir, "--data", data, "--out", out, "--device", "cuda"],
                               capsys)
        assert code == 2 and "--device cuda: no CUDA device is available" in err


def test_item13_existing_out_of_the_wrong_kind_fails_before_evaluating(moe_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dsmoe.evaluation.cli.load_for_eval", lambda *a, **k: pytest.fail("evaluated first"))
    data = write_data(tmp_path / "DATA")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("user data")
    code, _, err = run_cli(["eval", "sweep", "--model", moe_dir, "--data", data, "--out", tmp_path / "a_dir"], capsys)
    assert code == 2 and "is a directory" in err
    code, _, err = run_cli(["eval", "ppl", "--model", moe_dir, "--data", data, "--out", tmp_path / "a_file"], capsys)
    assert code == 2 and "is a file" in err and (tmp_path / "a_file").read_text() == "user data"


def test_item13_perplexity_needs_no_tokenizer_files(moe_dir, tmp_path, capsys):
    bare = copy_model(moe_dir, tmp_path / "bare", drop=["tokenizer*", "chat_template.jinja", "special_tokens_map.json"])
    data = write_data(tmp_path / "DATA")
    code, _, err = run_cli(["eval", "ppl", "--model", bare, "--data", data, "--out", tmp_path / "ppl"], capsys)
    assert code == 0, err
    assert (tmp_path / "ppl" / "ppl.csv").is_file()
    code, _, err = run_cli(["eval", "lm-eval", "--model", bare, "--limit", 1, "--out", tmp_path / "bench"], capsys)
    assert code == 2 and "holds no tokenizer" in err


PROBE_TASK = """task: dsmoe_hub_probe
dataset_path: nobody-here/no-such-dataset
output_type: multiple_choice
test_split: test
doc_to_text: "{{q}}"
doc_to_choice: ["a", "b"]
doc_to_target: 0
metric_list:
  - metric: acc
"""


def test_item13_hub_dataset_offline(moe_dir, tmp_path, capsys, monkeypatch):
    """A task whose Hugging Face dataset cannot be loaded offline (as the paper suite's, uncached): one message.

    The task is a local YAML beside dsmoe's own, so that lm-eval need not index its whole task list."""
    import shutil

    from dsmoe.evaluation import harness

    tasks = tmp_path / "tasks"
    shutil.copytree(harness.TASKS_DIR, tasks)
    (tasks / "hub_probe.yaml").write_text(PROBE_TASK)
    monkeypatch.setattr(harness, "TASKS_DIR", tasks)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["eval", "lm-eval", "--model", moe_dir, "--tasks", "dsmoe_hub_probe", "--limit", 1,
                            "--out", tmp_path / "bench"], capsys)
    assert code == 2 and "lm-eval task 'dsmoe_hub_probe': its dataset cannot be loaded, offline" in err
    assert "--suite local" in err and "Traceback" not in err


def test_item13_one_error_path_and_dsmoe_debug(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["info", tmp_path / "missing"], capsys)
    assert code == 2 and err.startswith("dsmoe info: error: ") and "Traceback" not in err
    monkeypatch.setattr(cli, "build_parser", _parser_with(lambda args: {}["boom"]))
    code, _, err = run_cli(["info", "x"], capsys)
    assert code == 2 and "KeyError" in err and "DSMOE_DEBUG=1" in err and "Traceback" not in err
    monkeypatch.setenv("DSMOE_DEBUG", "1")
    code, _, err = run_cli(["info", "x"], capsys)
    assert code == 2 and "Traceback (most recent call last)" in err


def _parser_with(func):
    real = cli.build_parser

    def build():
        parser = real()
        parser.set_defaults(func=func)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    sub.set_defaults(func=func)
        return parser

    return build


# ---------------------------------------------------------------- 14: every --help


def command_paths(parser, prefix=()):
    """Every command and subcommand, aliases included, as argv prefixes."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_paths(sub, (*prefix, name))


def test_item14_every_help_exits_0(capsys):
    paths = list(command_paths(cli.build_parser()))
    assert ("figures",) in paths and ("report", "activated-pct") in paths and ("eval", "bench") in paths
    for path in paths:
        with pytest.raises(SystemExit) as caught:
            cli.main([*path, "--help"])
        assert caught.value.code == 0, f"dsmoe {' '.join(path)} --help"
        assert "usage: dsmoe" in capsys.readouterr().out


@pytest.mark.slow
def test_item13_suite_paper_offline(moe_dir, tmp_path, capsys, monkeypatch):
    """The real paper suite offline with an empty dataset cache (lm-eval indexes all its tasks: minutes)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    from test_storycloze import write_official_csvs

    write_official_csvs(tmp_path / "storycloze")  # Story Cloze's CSVs are downloaded by hand, not from the Hub
    monkeypatch.setenv("DSMOE_STORYCLOZE_DIR", str(tmp_path / "storycloze"))
    code, _, err = run_cli(["eval", "lm-eval", "--model", moe_dir, "--suite", "paper", "--limit", 1,
                            "--out", tmp_path / "bench"], capsys)
    assert code == 2 and "lm-eval task 'hellaswag': its dataset cannot be loaded, offline" in err
