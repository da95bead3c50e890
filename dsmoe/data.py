"""Training data: a weighted mixture of text sources, tokenised, packed and cached on disk.

Sources (config `data.sources`, one kind each):
  - builtin `stdlib-code` (the running Python's stdlib `.py` files) and `stdlib-prose`
    (`pydoc_data.topics`), offline;
  - local `txt` (one document per file), `jsonl` and `parquet` files (a glob; `text_field`);
  - `hf`: a Hugging Face dataset id, streamed (needs the optional `datasets` extra).

Each source is split into validation and training by document, never inside one: finite sources
(builtin, local) order their documents by a hash of a stable key (relative path, topic, file:row);
streamed ones keep stream order. Validation takes documents from the front of that order until it
holds `val_sequences * seq_len` tokens (at most half of a finite source); training takes the rest,
up to the source's share of the token budget. Documents are tokenised with the model's tokenizer,
joined with EOS and packed without gaps or overlap. Layout of the cache (DATA):

    DATA/manifest.json        {"seq_len", "tokenizer", "fingerprint", "sources": {name: {...}}}
    DATA/<source>/train.npy   1-D int32 token stream
    DATA/<source>/val.npy     2-D int32 array (n_val, seq_len)
"""

import glob
import hashlib
import importlib.util
import json
import logging
import math
import sys
import sysconfig
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .io import atomic_dir

logger = logging.getLogger(__name__)

BUILTIN_SOURCES = ("stdlib-code", "stdlib-prose")
TOKENIZE_BATCH = 64
TRAIN_SLACK = 1.05  # each source's training stream holds 5% more than its expected share of the budget


def _hash_key(key):
    return hashlib.sha1(key.encode()).hexdigest()


def _hash_ordered(documents):
    """`[(key, text)]` -> texts in the order of their keys' hashes (a stable pseudo-random order)."""
    return [text for _, text in sorted(documents, key=lambda kv: _hash_key(kv[0]))]


# ---------------------------------------------------------------- sources: each yields document texts


def stdlib_code_documents():
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] in ("site-packages", "dist-packages"):
            continue
        try:
            documents.append((relative.as_posix(), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):  # a few test files are deliberately not UTF-8
            continue
    return _hash_ordered(documents)


def stdlib_prose_documents():
    from pydoc_data.topics import topics

    return _hash_ordered(topics.items())


def _local_files(source):
    pattern = source.get("path")
    if not pattern:
        raise ValueError(f"source {source['name']!r} ({source['kind']}) needs `path`, a file or glob")
    files = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
    if not files:
        raise FileNotFoundError(f"source {source['name']!r}: no file matches {pattern!r}")
    return files


def _text_of(record, field, where):
    if field not in record:
        raise ValueError(f"{where} has no text field {field!r}; fields: {', '.join(map(str, record)) or 'none'}")
    text = record[field]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where}: text field {field!r} holds {type(text).__name__}, not a string")
    return text or ""


def local_documents(source):
    kind, field, documents = source["kind"], source.get("text_field", "text"), []
    for file in _local_files(source):
        if kind == "txt":
            documents.append((file, Path(file).read_text(encoding="utf-8", errors="replace")))
        elif kind == "jsonl":
            with open(file, encoding="utf-8") as handle:
                for i, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as err:
                            raise ValueError(f"{file}:{i} is not valid JSON: {err}") from err
                        documents.append((f"{file}:{i}", _text_of(record, field, f"{file}:{i}")))
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(file)
            if field not in table.column_names:
                raise ValueError(f"{file} has no text field {field!r}; columns: {', '.join(table.column_names)}")
            documents += [(f"{file}:{i}", text or "") for i, text in enumerate(table.column(field).to_pylist())]
    return _hash_ordered(documents)


def hf_documents(source):
    """Stream a Hugging Face dataset's texts in stream order (deterministic without shuffling)."""
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"source {source['name']!r} streams a Hugging Face dataset: pip install 'dsmoe[datasets]'")
    import datasets

    dataset_id, field = source.get("path"), source.get("text_field", "text")
    if not dataset_id:
        raise ValueError(f"source {source['name']!r} (hf) needs `path`, the dataset id")
    try:
        stream = datasets.load_dataset(dataset_id, source.get("subset"), split=source.get("split", "train"),
                                       data_dir=source.get("data_dir"), streaming=True)
        first = next(iter(stream))
    except StopIteration:
        raise ValueError(f"source {source['name']!r}: Hugging Face dataset {dataset_id!r} is empty") from None
    except Exception as err:  # datasets raises many types for a missing, gated or offline dataset
        raise ValueError(f"source {source['name']!r}: cannot open Hugging Face dataset {dataset_id!r}: {err}") from err
    _text_of(first, field, f"Hugging Face dataset {dataset_id!r}")
    return (_text_of(record, field, f"{dataset_id} record {i}") for i, record in enumerate(stream))


def source_documents(source):
    """`(documents, total_chars)`: document texts in split order, and their total size when finite."""
    kind = source["kind"]
    if kind == "builtin":
        builders = {"stdlib-code": stdlib_code_documents, "stdlib-prose": stdlib_prose_documents}
        if source["name"] not in builders:
            raise ValueError(f"unknown builtin source {source['name']!r}; choose one of {', '.join(BUILTIN_SOURCES)}")
        documents = builders[source["name"]]()
    elif kind == "hf":
        return hf_documents(source), None
    else:
        documents = local_documents(source)
    total_chars = sum(len(text) for text in documents)
    if total_chars == 0:
        raise ValueError(f"source {source['name']!r} is an empty corpus: no text in {len(documents)} documents")
    return documents, total_chars


# ---------------------------------------------------------------- tokenise, split, pack


def load_tokenizer(name):
    from transformers import AutoTokenizer

    from .convert import resolve_model

    path, gguf_file = resolve_model(name)
    if gguf_file is None and not Path(path).exists() and str(path).startswith((".", "/")):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a tokenizer from {name!r}: {err}") from err


def tokenizer_fingerprint(tokenizer):
    """A hash of the vocabulary and EOS id: two tokenizers with equal fingerprints tokenise alike."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())) + f"|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def tokenize_documents(texts, tokenizer):
    """Yield one int32 array per non-empty document: its tokens followed by EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            yield from _tokenize_batch(batch, tokenizer)
            batch = []
    yield from _tokenize_batch(batch, tokenizer)


def _tokenize_batch(texts, tokenizer):
    if not texts:
        return
    for text, ids in zip(texts, tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]):
        if ids:
            yield len(text), np.asarray([*ids, tokenizer.eos_token_id], dtype=np.int32)


def pack(stream, seq_len):
    """View a 1-D token stream as consecutive, non-overlapping sequences (the tail < seq_len is dropped)."""
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len]).reshape(n, seq_len)


def prepare_source(source, tokenizer, seq_len, val_sequences, train_cap, out_dir):
    """Tokenise one source into `out_dir/{val,train}.npy`; return its manifest entry."""
    name = source["name"]
    documents, total_chars = source_documents(source)
    val_chars_limit = total_chars // 2 if total_chars is not None else math.inf
    val_target = val_sequences * seq_len
    val, n_val_tokens, val_chars, n_train, counts = [], 0, 0, 0, {"val": 0, "train": 0}
    out_dir.mkdir(parents=True)
    raw_train = out_dir / "train.bin"
    with open(raw_train, "wb") as train_file, tqdm(total=val_target + train_cap, unit="tok", desc=name, leave=False) as bar:
        for chars, ids in tokenize_documents(documents, tokenizer):
            if counts["train"] == 0 and n_val_tokens < val_target and val_chars + chars <= val_chars_limit:
                val.append(ids)
                n_val_tokens += len(ids)
                val_chars += chars
                counts["val"] += 1
            else:
                train_file.write(ids.tobytes())
                n_train += len(ids)
                counts["train"] += 1
            bar.update(len(ids))
            if n_train >= train_cap:
                break
    if n_val_tokens + n_train == 0:
        raise ValueError(f"source {name!r} is an empty corpus: its documents hold no tokens")
    val_array = pack(np.concatenate(val) if val else np.zeros(0, np.int32), seq_len)[:val_sequences]
    if len(val_array) == 0:
        raise ValueError(f"source {name!r} is too small to hold out one validation sequence of {seq_len} tokens")
    if len(val_array) < val_sequences:
        logger.warning("source %r holds out %d validation sequences, fewer than the %d asked for (at most half "
                       "of a finite source goes to validation)", name, len(val_array), val_sequences)
    if n_train < seq_len:
        raise ValueError(f"source {name!r} has {n_train} training tokens left after validation, less than one sequence")
    np.save(out_dir / "val.npy", np.ascontiguousarray(val_array))
    train = np.lib.format.open_memmap(out_dir / "train.npy", mode="w+", dtype=np.int32, shape=(n_train,))
    train[:] = np.memmap(raw_train, dtype=np.int32, mode="r")
    train.flush()
    del train
    raw_train.unlink()
    return {"kind": source["kind"], "train_tokens": int(n_train), "val_sequences": int(len(val_array)),
            "weight": float(source["weight"]), "train_documents": counts["train"], "val_documents": counts["val"]}


def train_caps(config):
    """Tokens each source's training stream needs: its weighted share of the budget, plus slack."""
    sources, budget = config["data"]["sources"], float(config["train"]["tokens"])
    total_weight = sum(s["weight"] for s in sources)
    return {s["name"]: int(math.ceil(budget * s["weight"] / total_weight * TRAIN_SLACK)) + config["data"]["seq_len"]
            for s in sources}


def data_fingerprint(config, tokenizer):
    spec = {"data": config["data"], "caps": train_caps(config), "tokenizer": tokenizer_fingerprint(tokenizer),
            "python": sys.version if any(s["kind"] == "builtin" for s in config["data"]["sources"]) else None,
            "format": 1}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prepare(config, tokenizer, out):
    """Tokenise every source of `config["data"]` into the cache `out`; a no-op if it is up to date."""
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
    manifest = {"seq_len": data["seq_len"], "tokenizer": str(tokenizer.name_or_path), "fingerprint": fingerprint,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "sources": {}}
    with atomic_dir(out) as tmp:
        for source in data["sources"]:
            manifest["sources"][source["name"]] = prepare_source(
                source, tokenizer, data["seq_len"], data["val_sequences"], caps[source["name"]], tmp / source["name"])
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# ---------------------------------------------------------------- reading the cache


def read_manifest(data_dir):
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} holds no prepared data (no manifest.json); run `dsmoe data prepare`")
    return json.loads(path.read_text())


def load_validation(data_dir):
    """`{source: (n_val, seq_len) int32 array}` (memory-mapped) of a prepared data directory."""
    manifest = read_manifest(data_dir)
    return {name: np.load(Path(data_dir) / name / "val.npy", mmap_mode="r") for name in manifest["sources"]}


def load_train(data_dir):
    """`{source: (n_train, seq_len) int32 array}`: each training stream packed into sequences (memory-mapped)."""
    manifest = read_manifest(data_dir)
    return {name: pack(np.load(Path(data_dir) / name / "train.npy", mmap_mode="r"), manifest["seq_len"])
            for name in manifest["sources"]}


class MixtureSampler:
    """Which training sequences make up the global batch of each step: a pure function of the step.

    Each slot of a batch picks a source with probability proportional to its weight (one stream of
    uniforms, seeded); inside a source, sequences are read in a seeded permutation per epoch.
    `batch(step)` needs only the per-source counts before `step`, which `__init__` replays.
    """

    def __init__(self, sizes, weights, batch_size, seed=0, start_step=0):
        self.names = list(sizes)
        self.sizes = np.array([sizes[n] for n in self.names])
        if (self.sizes < 1).any():
            raise ValueError(f"every source needs at least one training sequence, got {dict(sizes)}")
        weights = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.cdf = np.cumsum(weights / weights.sum())
        self.batch_size, self.seed = batch_size, seed
        self.rng = np.random.default_rng(seed)
        self.counts = np.zeros(len(self.names), dtype=np.int64)
        self.step = 0
        self._perms = {}
        while self.step < start_step:  # replay the source choices, in chunks of many steps
            chunk = min(start_step - self.step, 4096)
            choices = self._choose(chunk * batch_size)
            self.counts += np.bincount(choices, minlength=len(self.names))
            self.step += chunk

    def _choose(self, n):
        return np.minimum(np.searchsorted(self.cdf, self.rng.random(n), side="right"), len(self.names) - 1)

    def _sequence(self, source, count):
        epoch, position = divmod(int(count), int(self.sizes[source]))
        key = (source, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != source}
            self._perms[key] = np.random.default_rng([self.seed, source, epoch]).permutation(self.sizes[source])
        return int(self._perms[key][position])

    def next_batch(self):
        """`[(source name, sequence index)]` for the current step; advances to the next step."""
        batch = []
        for source in self._choose(self.batch_size):
            batch.append((self.names[source], self._sequence(source, self.counts[source])))
            self.counts[source] += 1
        self.step += 1
        return batch

    def state(self):
        return {"step": self.step, "counts": dict(zip(self.names, map(int, self.counts)))}


# ---------------------------------------------------------------- CLI: dsmoe data prepare


def register(subparsers):
    p = subparsers.add_parser("data", help="training and validation data")
    commands = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = commands.add_parser("prepare", help="tokenise, split and pack a run's data sources into a cache directory")
    q.add_argument("--config", required=True, help="run config YAML (its data section; train.tokens sets how much)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. data.seq_len=256")
    q.add_argument("--model", required=True, help="model directory or short name whose tokenizer to use")
    q.add_argument("--out", required=True, help="data directory (written atomically; reused when up to date)")
    q.set_defaults(func=cmd_prepare)


def cmd_prepare(args):
    from .config import load_config, parse_overrides

    config = load_config(args.config, parse_overrides(args.set))
    manifest = prepare(config, load_tokenizer(args.model), args.out)
    for name, entry in manifest["sources"].items():
        print(f"{name}: {entry['train_tokens']:,} training tokens, {entry['val_sequences']} validation sequences")
    print(f"wrote {args.out} (fingerprint {manifest['fingerprint']})")
