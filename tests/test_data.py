"""Data mixture: packing, splits, caching, the mixture sampler and bad input (dsmoe/data/)."""

import json
import logging
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dsmoe import data
from dsmoe.data.build import TUNE_MIN_DOCUMENTS, VAL_MIN_DOCUMENTS
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
    n_val_docs = manifest["sources"]["local"]["val_documents"]
    assert sum(train_docs.values()) + n_val_docs == len(texts)
    assert train_docs <= expected  # nothing duplicated or invented
    assert sum((expected - train_docs).values()) == n_val_docs  # every other document is in training
    # validation: the beginning (1/32 of the validation tokens, EOS kept) of each held-out document, joined
    cap = max(2, -(-3 * 16 // VAL_MIN_DOCUMENTS))
    held_out = [(*doc, eos) if len(doc) < cap else (*doc[:cap - 1], eos) for doc in expected - train_docs]
    stream, at, used = tuple(val.reshape(-1).tolist()), 0, 0
    while at < len(stream):
        at += len(next(d for d in held_out if stream[at:at + len(d)] == d[:len(stream) - at]))
        used += 1
    assert used <= n_val_docs


def test_tuning_split_comes_first_from_other_documents_and_stays_out_of_training(tmp_path, tokenizer):
    """data.tune_sequences: the tuning split takes the front documents, validation the next ones
    (as many as without a tuning split); the three splits share no document and nothing is lost."""
    rng = np.random.default_rng(2)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "+", "1", "\n"]
    texts = [f"doc {i:03d}: " + " ".join(rng.choice(words, size=rng.integers(1, 60))) for i in range(200)]
    write_jsonl(tmp_path / "corpus.jsonl", texts)
    source = [{"name": "local", "kind": "jsonl", "path": str(tmp_path / "corpus.jsonl")}]
    plain = make_config(source, seq_len=128, val_sequences=3, tokens=10**6)
    tuned = make_config(source, seq_len=128, val_sequences=3, tokens=10**6)
    tuned["data"]["tune_sequences"] = 3
    data.prepare(plain, tokenizer, tmp_path / "plain")
    manifest = data.prepare(tuned, tokenizer, tmp_path / "tuned")
    entry, eos = manifest["sources"]["local"], tokenizer.eos_token_id
    assert entry["tune_sequences"] == entry["val_sequences"] == 3
    assert entry["val_documents"] == json.loads((tmp_path / "plain" / "manifest.json").read_text())["sources"]["local"]["val_documents"]
    cap = -(-3 * 128 // VAL_MIN_DOCUMENTS) - 1  # tokens validation keeps of each document ("doc N: ..."); tuning more
    assert -(-3 * 128 // TUNE_MIN_DOCUMENTS) - 1 > cap

    def pieces(split):
        return {d[:cap] for d in split_documents(np.append(np.load(tmp_path / "tuned" / "local" / f"{split}.npy"), eos), eos)[:-1]}

    tune, val = pieces("tune"), pieces("val")
    train = Counter(split_documents(np.load(tmp_path / "tuned" / "local" / "train.npy"), eos))
    assert tune and val and not tune & val and not (tune | val) & {d[:cap] for d in train}  # whole documents on one side
    assert sum(train.values()) + entry["tune_documents"] + entry["val_documents"] == len(texts)
    with pytest.raises(ValueError, match="no tuning split"):
        data.load_validation(tmp_path / "plain", "tune")
    assert data.data_fingerprint(plain, tokenizer) != data.data_fingerprint(tuned, tokenizer)


@pytest.mark.parametrize("name", ["stdlib-prose", "stdlib-code"])
def test_builtin_train_and_validation_are_disjoint(tmp_path, tokenizer, name):
    config = make_config([{"name": name, "kind": "builtin"}], seq_len=64, val_sequences=200, tokens=20000)
    manifest = data.prepare(config, tokenizer, tmp_path)
    entry = manifest["sources"][name]
    assert entry["val_sequences"] == 200 and entry["train_tokens"] >= 20000
    assert entry["val_documents"] >= 32  # at most 1/32 of the tokens from each: not one long file
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


# ---------------------------------------------------------------- streamed (hf) sources: random, disjoint


def write_shards(root, name, n_shards, per_shard):
    """`n_shards` JSON-lines files of documents `"<name> <shard>-<i> ..."` (file order = shard, then i)."""
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(n_shards):
        write_jsonl(root / f"shard{shard:02d}.jsonl",
                    [f"{name} {shard}-{i} " + "word " * (5 + (shard * 7 + i) % 11) for i in range(per_shard)])
    return sorted(f"{name} {s}-{i}" for s in range(n_shards) for i in range(per_shard))


def doc_keys(stream, eos, tokenizer):
    """The `"<name> <shard>-<i>"` key of every whole document in a token stream."""
    return [" ".join(tokenizer.decode(d).split()[:2]) for d in split_documents(stream, eos)]


def local_stream_source(root, **extra):
    """An hf source over local JSON-lines files: `load_dataset("json", data_files=..., streaming=True)`."""
    return {"name": "web", "kind": "hf", "path": "json", "data_files": str(root / "*.jsonl"), "shuffle_buffer": 16, **extra}


def test_streamed_source_draws_validation_at_random_and_keeps_it_out_of_training(tmp_path, tokenizer):
    pytest.importorskip("datasets")
    keys = write_shards(tmp_path / "web", "web", n_shards=8, per_shard=25)
    config = make_config([local_stream_source(tmp_path / "web")], seq_len=16, val_sequences=12, tokens=10**6)
    manifest = data.prepare(config, tokenizer, tmp_path / "d")
    eos = tokenizer.eos_token_id
    train = doc_keys(np.load(tmp_path / "d" / "web" / "train.npy"), eos, tokenizer)
    n_val = manifest["sources"]["web"]["val_documents"]
    val_docs = data.source_documents(config["data"]["sources"][0], config["data"]["seed"])[0]
    val = [" ".join(text.split()[:2]) for text, _ in zip(val_docs, range(n_val))]
    assert sorted(val + train) == keys  # every document once: validation and training are disjoint
    assert not set(val) & set(train) and len(set(train)) == len(train)
    in_file_order = keys[:n_val]
    assert val != in_file_order and len({key.split()[1].split("-")[0] for key in val}) >= 3  # not the first shard
    # seeded: the same order again, another with another seed
    again = data.source_documents(config["data"]["sources"][0], config["data"]["seed"])[0]
    assert [" ".join(t.split()[:2]) for t, _ in zip(again, range(n_val))] == val
    other = data.source_documents(config["data"]["sources"][0], config["data"]["seed"] + 1)[0]
    assert [" ".join(t.split()[:2]) for t, _ in zip(other, range(n_val))] != val


def test_data_dir_list_is_interleaved_from_every_part(tmp_path, tokenizer):
    """StarCoder-style languages: each data_dir is streamed, shuffled and interleaved, not read in turn."""
    pytest.importorskip("datasets")
    for language in ("ada", "c", "python"):
        write_shards(tmp_path / "code" / language, language, n_shards=3, per_shard=20)
    source = {"name": "code", "kind": "hf", "path": "json", "data_dir": [str(tmp_path / "code" / lang) for lang in
                                                                       ("ada", "c", "python")],
              "data_dir_weights": [1, 1, 2], "shuffle_buffer": 8}
    config = make_config([source])
    first = [text.split()[0] for text, _ in zip(data.source_documents(config["data"]["sources"][0], 0)[0], range(40))]
    counts = Counter(first)
    assert set(counts) == {"ada", "c", "python"}  # alphabetical reading would give 40 times "ada"
    assert counts["python"] > max(counts["ada"], counts["c"])  # weight 2 against 1
    with pytest.raises(ValueError, match="2 data_dir_weights for 3 data_dir"):
        data.prepare(make_config([{**source, "data_dir_weights": [1, 1]}]), tokenizer, tmp_path / "d")


# ---------------------------------------------------------------- per-document truncation


def test_truncate_mode_gives_one_document_per_sample_with_padding(tmp_path, smollm2_tokenizer):
    texts = [f"document {i}: " + "alpha beta gamma " * (1 + 9 * (i % 3)) for i in range(60)]
    write_jsonl(tmp_path / "c.jsonl", texts)
    source = [{"name": "local", "kind": "jsonl", "path": str(tmp_path / "c.jsonl")}]
    config = make_config(source, seq_len=24, val_sequences=4, tokens=10**5)
    config["data"]["sample_mode"] = "truncate"
    tokenizer = smollm2_tokenizer
    manifest = data.prepare(config, tokenizer, tmp_path / "d")
    assert manifest["sample_mode"] == "truncate"
    train = data.load_train(tmp_path / "d")["local"]
    val = data.load_validation(tmp_path / "d")["local"]
    assert val.shape == (4, 24) and train.shape[1] == 24
    assert manifest["sources"]["local"]["train_documents"] == len(train)  # one row per document
    expected = {tuple(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts}
    for row in np.concatenate([val, train]):
        tokens = row[row != data.PAD]
        assert (row[len(tokens):] == data.PAD).all()  # padding only at the end
        body = tuple(tokens[:-1]) if tokens[-1] == tokenizer.eos_token_id else tuple(tokens)
        assert body in expected or any(doc[:24] == body for doc in expected)  # whole, or cut at seq_len
    assert manifest["sources"]["local"]["train_padding"] == int((train == data.PAD).sum()) > 0


class BosTokenizer:
    """A character tokenizer that, like LLaMA's, puts BOS (1) first when asked for special tokens."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        single = isinstance(texts, str)
        ids = [[1] * add_special_tokens + [10 + ord(c) % 50 for c in text] for text in ([texts] if single else texts)]
        return {"input_ids": ids[0] if single else ids}


def test_truncate_mode_adds_bos_as_the_tokenizer_does():
    tokenizer = BosTokenizer()
    truncated = [ids.tolist() for _, ids in data.tokenize_documents(["abc", ""], tokenizer, "truncate")]
    assert truncated == [[1, 10 + ord("a") % 50, 10 + ord("b") % 50, 10 + ord("c") % 50, 2]]  # BOS ... EOS; "" skipped
    packed = [ids.tolist() for _, ids in data.tokenize_documents(["abc"], tokenizer, "pack")]
    assert packed == [truncated[0][1:]]  # packing: no BOS, EOS between documents
    assert data.sample_row(np.arange(5, dtype=np.int32), 3).tolist() == [0, 1, 2]
    assert data.sample_row(np.arange(2, dtype=np.int32), 4).tolist() == [0, 1, data.PAD, data.PAD]


def test_model_inputs_mask_padding_and_leave_packed_batches_alone():
    import torch

    packed = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert set(data.model_inputs(packed)) == {"input_ids", "labels"}
    padded = torch.tensor([[5, 6, data.PAD], [8, 9, 10]])
    inputs = data.model_inputs(padded)
    assert inputs["input_ids"].tolist() == [[5, 6, 0], [8, 9, 10]]
    assert inputs["labels"].tolist() == [[5, 6, -100], [8, 9, 10]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_calibration_windows_of_a_padded_stream_hold_real_tokens_only(tmp_path):
    rows = np.full((6, 8), data.PAD, dtype=np.int32)
    for i in range(6):
        rows[i, : 3 + i % 4] = 100 * (i + 1) + np.arange(3 + i % 4)
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "s" / "train.npy", rows.reshape(-1))
    np.save(tmp_path / "s" / "val.npy", rows[:1])
    (tmp_path / "manifest.json").write_text(json.dumps({"seq_len": 8, "sample_mode": "truncate", "sources": {"s": {}}}))
    windows = data.calibration_windows(tmp_path, 3)
    assert windows.shape == (3, 8) and (windows != data.PAD).all()
    real = set(rows[rows != data.PAD].tolist())
    assert set(windows.reshape(-1).tolist()) <= real
    assert windows[0, :3].tolist() == [100, 101, 102]  # from the first row on, its padding skipped
