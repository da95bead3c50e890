"""`dsmoe data prepare`: a weighted mixture of text sources, tokenised, split, packed and cached.

Each source (`dsmoe.data.sources`) is split into held-out splits and training by document, never
inside one. The held-out splits take documents from the front of the source's order (a seeded
random order: hash order for finite sources, `datasets`' shuffle for streamed ones): first the
tuning split (`tune_sequences`, 0 by default: none), for pilots that choose settings, then the
validation split (`val_sequences`) that results are reported on, so the two never share a
document; together at most half of a finite source. In pack mode validation takes at most 1/32 of
its tokens from each document (cut with its EOS kept; the rest of it is not used), so that it is
drawn from at least 32 documents where the source has them, not from one long file (the tuning
split at most 1/8, from at least 8, so that a small source still holds a whole validation split);
training takes the rest, up to the source's share of the token budget. `data.sample_mode` says how documents become sequences of `seq_len` tokens:

- `pack`: each document's tokens followed by EOS, joined and cut into consecutive windows without
  gaps or overlap (a document may span two sequences);
- `truncate`: one document per sequence, tokenised with the tokenizer's own special tokens (BOS
  for LLaMA), EOS appended, cut at `seq_len` and padded with `PAD` (-1), which every reader masks.

Both write the layout of `dsmoe.data.prepared`.
"""

import hashlib
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_dir, check_out
from .prepared import PAD, pack
from .sources import source_documents

logger = logging.getLogger(__name__)
VAL_MIN_DOCUMENTS = 32  # validation spreads over at least this many documents (where the source has them)
TUNE_MIN_DOCUMENTS = 8  # the tuning split over fewer (1/8 of its tokens from each): small sources keep validation whole

TOKENIZE_BATCH = 64
TRAIN_SLACK = 1.05  # each source's training stream holds 5% more than its expected share of the budget


def tokenizer_fingerprint(tokenizer):
    """A hash of the vocabulary and EOS id: two tokenizers with equal fingerprints tokenise alike."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())) + f"|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def tokenize_documents(texts, tokenizer, sample_mode="pack"):
    """Yield `(chars, ids)` per non-empty document: its tokens (with the tokenizer's special tokens,
    such as BOS, when `sample_mode` is truncate) followed by EOS, as int32."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    special = sample_mode == "truncate"
    n_special = len(tokenizer("", add_special_tokens=True)["input_ids"]) if special else 0
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            yield from _tokenize_batch(batch, tokenizer, special, n_special)
            batch = []
    yield from _tokenize_batch(batch, tokenizer, special, n_special)


def _tokenize_batch(texts, tokenizer, special, n_special):
    if not texts:
        return
    for text, ids in zip(texts, tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]):
        if len(ids) > n_special:
            yield len(text), np.asarray([*ids, tokenizer.eos_token_id], dtype=np.int32)


def sample_row(ids, seq_len):
    """One document as one sequence (sample_mode truncate): its first `seq_len` tokens, padded with PAD."""
    row = np.full(seq_len, PAD, dtype=np.int32)
    row[: min(len(ids), seq_len)] = ids[:seq_len]
    return row


def held_out_splits(data):
    """`[(split, sequences)]` in the order they take documents: the tuning split first (if any), then validation."""
    splits = [("tune", data.get("tune_sequences", 0)), ("val", data["val_sequences"])]
    return [(split, n) for split, n in splits if n > 0]


def prepare_source(source, tokenizer, data, train_cap, out_dir):
    """Tokenise one source into `out_dir/{tune,val,train}.npy`; return its manifest entry.

    Sizes count token slots: in truncate mode each document fills one row of `seq_len`, padding included."""
    name, seq_len, mode = source["name"], data["seq_len"], data["sample_mode"]
    documents, total_chars = source_documents(source, data["seed"])
    held_chars_limit = total_chars // 2 if total_chars is not None else math.inf
    splits = [HeldOut(split, n, seq_len, mode) for split, n in held_out_splits(data)]
    held_chars, n_train, padding, train_documents = 0, 0, 0, 0
    out_dir.mkdir(parents=True)
    raw_train = out_dir / "train.bin"
    total = sum(split.target for split in splits) + train_cap
    with open(raw_train, "wb") as train_file, tqdm(total=total, unit="tok", desc=name, leave=False) as bar:
        for chars, ids in tokenize_documents(documents, tokenizer, mode):
            ids = sample_row(ids, seq_len) if mode == "truncate" else ids
            filling = next((split for split in splits if not split.full), None)
            if train_documents == 0 and filling is not None and held_chars + chars <= held_chars_limit:
                filling.add(ids)
                held_chars += chars
            else:
                train_file.write(ids.tobytes())
                n_train += len(ids)
                padding += int(np.count_nonzero(ids == PAD))
                train_documents += 1
            bar.update(len(ids))
            if n_train >= train_cap:
                break
    if sum(split.tokens for split in splits) + n_train == 0:
        raise ValueError(f"source {name!r} is an empty corpus: its documents hold no tokens")
    entry = {"kind": source["kind"]}
    for split in splits:
        array = split.sequences(name)
        np.save(out_dir / f"{split.name}.npy", np.ascontiguousarray(array))
        entry[f"{split.name}_sequences"], entry[f"{split.name}_documents"] = int(len(array)), split.documents
    if n_train < seq_len:
        raise ValueError(f"source {name!r} has {n_train} training tokens left after validation, less than one sequence")
    train = np.lib.format.open_memmap(out_dir / "train.npy", mode="w+", dtype=np.int32, shape=(n_train,))
    train[:] = np.memmap(raw_train, dtype=np.int32, mode="r")
    train.flush()
    del train
    raw_train.unlink()
    return {**entry, "train_tokens": int(n_train), "train_padding": padding, "weight": float(source["weight"]),
            "train_documents": train_documents}


class HeldOut:
    """A held-out split (tune or val) filling up with whole documents, at most `doc_cap` tokens from each."""

    def __init__(self, name, n_sequences, seq_len, mode):
        self.name, self.n_sequences, self.seq_len = name, n_sequences, seq_len
        self.target = n_sequences * seq_len
        min_documents = TUNE_MIN_DOCUMENTS if name == "tune" else VAL_MIN_DOCUMENTS
        self.doc_cap = max(2, math.ceil(self.target / min_documents)) if mode == "pack" else seq_len
        self.parts, self.tokens, self.documents = [], 0, 0

    @property
    def full(self):
        return self.tokens >= self.target

    def add(self, ids):
        self.parts.append(ids if len(ids) <= self.doc_cap else np.append(ids[:self.doc_cap - 1], ids[-1]))  # cut, EOS kept
        self.tokens += len(self.parts[-1])
        self.documents += 1

    def sequences(self, source):
        array = pack(np.concatenate(self.parts) if self.parts else np.zeros(0, np.int32), self.seq_len)[:self.n_sequences]
        if len(array) == 0:
            raise ValueError(f"source {source!r} is too small to hold out one {self.name} sequence of {self.seq_len} tokens")
        if len(array) < self.n_sequences:
            logger.warning("source %r holds out %d %s sequences, fewer than the %d asked for (at most half "
                           "of a finite source is held out)", source, len(array), self.name, self.n_sequences)
        return array


def train_caps(config):
    """Tokens each source's training stream needs: its weighted share of the budget, plus slack."""
    sources, budget = config["data"]["sources"], float(config["train"]["tokens"])
    total_weight = sum(s["weight"] for s in sources)
    return {s["name"]: int(math.ceil(budget * s["weight"] / total_weight * TRAIN_SLACK)) + config["data"]["seq_len"]
            for s in sources}


def data_fingerprint(config, tokenizer):
    spec = {"data": config["data"], "caps": train_caps(config), "tokenizer": tokenizer_fingerprint(tokenizer),
            "python": sys.version if any(s["kind"] == "builtin" for s in config["data"]["sources"]) else None,
            "special_tokens": tokenizer("", add_special_tokens=True)["input_ids"], "format": 3}  # 3: validation spread over documents
    if not config["data"].get("tune_sequences"):
        spec["data"] = {k: v for k, v in config["data"].items() if k != "tune_sequences"}  # no tuning split: caches stay valid
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prepare(config, tokenizer, out, overwrite=False):
    """Tokenise every source of `config["data"]` into the cache `out`; a no-op if it is up to date.

    An existing `out` that is not a dsmoe data output is refused unless `overwrite`."""
    out = Path(out)
    data, caps = config["data"], train_caps(config)
    names = [s["name"] for s in data["sources"]]
    if len(set(names)) != len(names):
        raise ValueError(f"data source names must be unique, got {names}")
    fingerprint = data_fingerprint(config, tokenizer)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("fingerprint") == fingerprint:
        logger.info("%s is up to date (fingerprint %s)", out, fingerprint)
        return json.loads(manifest_path.read_text())
    check_out(out, "data", overwrite)
    manifest = {"seq_len": data["seq_len"], "sample_mode": data["sample_mode"], "tokenizer": str(tokenizer.name_or_path), "fingerprint": fingerprint,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "sources": {}}
    with atomic_dir(out, "data", overwrite) as tmp:
        for source in data["sources"]:
            manifest["sources"][source["name"]] = prepare_source(source, tokenizer, data, caps[source["name"]],
                                                                 tmp / source["name"])
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# ---------------------------------------------------------------- CLI: dsmoe data prepare


def register(subparsers):
    p = subparsers.add_parser("data", help="training and validation data")
    commands = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = commands.add_parser("prepare", help="tokenise, split and pack a run's data sources into a cache directory")
    q.add_argument("--config", required=True, help="run config YAML (its data section; train.tokens sets how much)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. data.seq_len=256")
    q.add_argument("--model", required=True, help="model directory or short name whose tokenizer to use")
    q.add_argument("--out", required=True, help="data directory (written atomically; reused when up to date)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not dsmoe data")
    q.set_defaults(func=cmd_prepare)


def cmd_prepare(args):
    from ..config import load_config, parse_overrides
    from ..hub import load_tokenizer

    config = load_config(args.config, parse_overrides(args.set))
    manifest = prepare(config, load_tokenizer(args.model), args.out, args.overwrite)
    for name, entry in manifest["sources"].items():
        tune = f", {entry['tune_sequences']} tuning sequences" if "tune_sequences" in entry else ""
        print(f"{name}: {entry['train_tokens']:,} training tokens, {entry['val_sequences']} validation sequences{tune}")
    print(f"wrote {args.out} (fingerprint {manifest['fingerprint']})")
