"""Data mixture: packing, splits, caching, the mixture sampler and bad input (dsmoe/data/)."""

import json
import logging
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dsmoe import data
from dsmoe.config import validate_config


def make_config(sources, seq_len=16, val_sequences=2, tokens=2000):
    return validate_config({"data": {"seq_len": seq_len, "val_sequences": val_sequences, "sources": sources},
                            "train": {"tokens": tokens, "batch_size": 2}})


def split_documents(tokens, eos):
    """Token runs between EOS tokens, as tuples (the run after the last EOS is dropped)."""
    ends = np.flatnonzero(np.asarray(tokens) == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tuple(tokens[s:e]) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer):
    return bpe_tokenizer


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))


def test_pack_keeps_every_token_once():
    stream = np.random.default_rng(0).integers(0, 1000, size=1003).astype(np.int32)
    packed = data.pack(stream, 10)
    assert packed.shape == (100, 10)
    np.testing.assert_array_equal(packed.reshape(-1), stream[:1000])  # consecutive, no gap, no overlap


def test_prepare_loses_or_duplicates_no_document(tmp_path, tokenizer):
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "+", "1", "\n"]
    texts = [f"doc {i}: " + " ".join(rng.choice(words, size=rng.integers(1, 60))) for i in range(120)]
    write_jsonl(tmp_path / "corpus.jsonl", texts)
    config = make_config([{"name": "local", "kind": "jsonl", "path": str(tmp_path / "corpus.jsonl")}],
                         seq_len=16, val_sequences=3, tokens=10**6)
    manifest = data.prepare(config, tokenizer, tmp_path / "data")
    eos = tokenizer.eos_token_id
    expected = Counter(tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    train = np.load(tmp_path / "data" / "local" / "train.npy")
    val = np.load(tmp_path / "data" / "local" / "val.npy")
    assert train.dtype == np.int32 and val.dtype == np.int32 and val.shape == (3, 16)
    assert train[-1] == eos and len(train) == manifest["sources"]["local"]["train_tokens"]
    train_docs = Counter(split_documents(train, eos))
    val_docs = Counter(split_documents(val.reshape(-1), eos))  # complete validation documents
    n_val_docs = manifest["sources"]["local"]["val_documents"]
    assert sum(train_docs.values()) + n_val_docs == len(texts)
    assert sum(val_docs.values()) <= n_val_docs
    assert not set(train_docs) & set(val_docs)
    assert train_docs + val_docs <= expected  # nothing duplicated or invented
    # all training documents are there; only the validation documents cut by the last row are missing
    assert sum((expected - train_docs - val_docs).values()) <= n_val_docs - sum(val_docs.values())


@pytest.mark.parametrize("name", ["stdlib-prose", "stdlib-code"])
def test_builtin_train_and_validation_are_disjoint(tmp_path, tokenizer, name):
    config = make_config([{"name": name, "kind": "builtin"}], seq_len=64, val_sequences=200, tokens=20000)
    manifest = data.prepare(config, tokenizer, tmp_path)
    entry = manifest["sources"][name]
    assert entry["val_sequences"] == 200 and entry["train_tokens"] >= 20000
    eos = tokenizer.eos_token_id
    train_texts = {tokenizer.decode(d) for d in split_documents(np.load(tmp_path / name / "train.npy"), eos)}
    val_tokens = np.load(tmp_path / name / "val.npy").reshape(-1)
    val_pieces = [tokenizer.decode(d) for d in split_documents(np.append(val_tokens, eos), eos)]  # last may be cut
    if name == "stdlib-prose":
        from pydoc_data.topics import topics

        corpus = Counter(topics.values())
    else:
        root = Path(sysconfig.get_paths()["stdlib"])
        corpus = Counter(p.read_text(encoding="utf-8", errors="replace") for p in root.rglob("*.py")
                         if "site-packages" not in p.parts)
    assert train_texts and train_texts <= set(corpus)
    for piece in val_pieces:
        piece = piece[:-4]  # a cut document may end inside a character
        sources = [text for text in corpus if text.startswith(piece)]
        assert sources, "a validation piece that is no document's beginning"
        if len(sources) == 1 and corpus[sources[0]] == 1:  # identical files may sit on both sides
            assert sources[0] not in train_texts


def test_second_prepare_with_same_config_does_not_tokenise(tmp_path, tokenizer, monkeypatch):
    config = make_config([{"name": "stdlib-prose", "kind": "builtin"}])
    first = data.prepare(config, tokenizer, tmp_path)
    stamp = (tmp_path / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr(data, "tokenize_documents", lambda *a: pytest.fail("tokenised again"))
    assert data.prepare(config, tokenizer, tmp_path) == first
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    config["data"]["seq_len"] = 24
    assert data.prepare(config, tokenizer, tmp_path)["fingerprint"] != first["fingerprint"]
    assert data.load_validation(tmp_path)["stdlib-prose"].shape == (2, 24)


def test_validation_capped_with_a_warning(tmp_path, tokenizer, caplog):
    texts = [f"document number {i} " * 5 for i in range(20)]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    config = make_config([{"name": "small", "kind": "txt", "path": str(tmp_path / "*.txt")}], val_sequences=1000)
    with caplog.at_level(logging.WARNING, logger="dsmoe.data"):
        manifest = data.prepare(config, tokenizer, tmp_path / "data")
    assert "fewer than the 1000" in caplog.text
    entry = manifest["sources"]["small"]
    assert 1 <= entry["val_sequences"] < 1000 and entry["val_documents"] <= 10  # at most half the source


def test_sampler_follows_weights_and_resumes():
    sizes, weights = {"a": 50, "b": 7}, {"a": 3.0, "b": 1.0}
    sampler = data.MixtureSampler(sizes, weights, batch_size=8, seed=3)
    batches = [sampler.next_batch() for _ in range(500)]
    picks = Counter(name for batch in batches for name, _ in batch)
    assert abs(picks["a"] / 4000 - 0.75) < 0.03
    # each source is read in a permutation per epoch: every sequence once before any repeats
    b_seq = [i for batch in batches for name, i in batch if name == "b"]
    assert sorted(b_seq[:7]) == list(range(7)) and sorted(b_seq[7:14]) == list(range(7))
    resumed = data.MixtureSampler(sizes, weights, batch_size=8, seed=3, start_step=321)
    assert [resumed.next_batch() for _ in range(5)] == batches[321:326]
    assert data.MixtureSampler(sizes, weights, 8, seed=4).next_batch() != batches[0]


def test_bad_sources_are_refused(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        data.prepare(make_config([{"name": "e", "kind": "txt", "path": str(tmp_path / "empty.txt")}]), tokenizer, tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        data.prepare(make_config([{"name": "m", "kind": "txt", "path": str(tmp_path / "none*.txt")}]), tokenizer, tmp_path / "d")
    write_jsonl(tmp_path / "c.jsonl", ["some text"] * 5, field="content")
    with pytest.raises(ValueError, match="no text field 'text'.*content"):
        data.prepare(make_config([{"name": "j", "kind": "jsonl", "path": str(tmp_path / "c.jsonl")}]), tokenizer, tmp_path / "d")
    with pytest.raises(ValueError, match="unknown builtin source"):
        data.prepare(make_config([{"name": "stdlib-poetry", "kind": "builtin"}]), tokenizer, tmp_path / "d")
    assert not (tmp_path / "d").exists()  # nothing half-written


def test_unknown_hf_dataset_is_refused(monkeypatch, tokenizer, tmp_path):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = {"name": "web", "kind": "hf", "path": "no-such-org/no-such-dataset-dsmoe"}
    with pytest.raises(ValueError, match="cannot open Hugging Face dataset 'no-such-org/no-such-dataset-dsmoe'"):
        data.prepare(make_config([source]), tokenizer, tmp_path / "d")


def test_cli_prepare_and_its_errors(tmp_path, tokenizer, capsys):
    from dsmoe.cli import main

    tokenizer.save_pretrained(tmp_path / "tok")
    config = tmp_path / "run.yaml"
    config.write_text("data: {seq_len: 16, val_sequences: 2, sources: [{name: stdlib-prose, kind: builtin}]}\n"
                      "train: {tokens: 1000}\n")
    args = ["data", "prepare", "--config", str(config), "--model", str(tmp_path / "tok"), "--out", str(tmp_path / "d")]
    assert main(args) == 0
    assert data.load_validation(tmp_path / "d")["stdlib-prose"].shape == (2, 16)
    assert main(args[:-1] + [str(tmp_path / "e"), "--set", "data.sources=[{name: x, kind: txt, path: /nonexistent/*.txt}]"]) == 2
    assert "no file matches '/nonexistent/*.txt'" in capsys.readouterr().err
