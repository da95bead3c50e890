"""Document sources of the training mixture: each yields document texts in split order.

  - builtin `stdlib-code` (the running Python's stdlib `.py` files) and `stdlib-prose`
    (`pydoc_data.topics`), offline;
  - local `txt` (one document per file), `jsonl` and `parquet` files (a glob; `text_field`);
  - `hf`: a Hugging Face dataset id (or `json`/`parquet` with `data_files`), streamed through
    `datasets` (the optional `datasets` extra), shuffled and, for a `data_dir` list, interleaved.

Finite sources (builtin, local) order their documents by a hash of a stable key (relative path,
topic, file:row); streamed ones in the seeded order of `datasets`' shuffle (`hf_stream`).

Local `txt` and `jsonl` files are read as UTF-8: a file with a few undecodable bytes is read with
U+FFFD in their place and a warning; one with more than `MAX_INVALID_UTF8` of its bytes undecodable
is refused, naming the file (a wrong encoding, or a binary file the glob caught). The builtin stdlib
source skips its few deliberately non-UTF-8 test files instead.
"""

import glob
import hashlib
import importlib.util
import json
import logging
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

BUILTIN_SOURCES = ("stdlib-code", "stdlib-prose")
MAX_INVALID_UTF8 = 0.001  # fraction of a file's bytes that may be undecodable


def _hash_key(key):
    return hashlib.sha1(key.encode()).hexdigest()


def _hash_ordered(documents):
    """`[(key, text)]` -> texts in the order of their keys' hashes (a stable pseudo-random order)."""
    return [text for _, text in sorted(documents, key=lambda kv: _hash_key(kv[0]))]



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
    """The files a local source's `path` (a file or glob) names; directories the glob matches are left out."""
    pattern = source.get("path")
    if not pattern:
        raise ValueError(f"source {source['name']!r} ({source['kind']}) needs `path`, a file or glob")
    matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
    if not matches:
        raise FileNotFoundError(f"source {source['name']!r}: no file matches {pattern!r}")
    files = [match for match in matches if not Path(match).is_dir()]
    if not files:
        example = f"{pattern.rstrip('/')}/*.{source['kind']}"
        raise ValueError(f"source {source['name']!r}: {pattern!r} is a directory, not a file; "
                         f"give a file or a glob such as {example!r}")
    return files


def read_utf8(file, max_invalid=MAX_INVALID_UTF8):
    """A file's text; undecodable bytes become U+FFFD, and more than `max_invalid` of them raise, naming the file."""
    raw = Path(file).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    escaped = raw.decode("utf-8", errors="surrogateescape")  # one lone surrogate per undecodable byte
    invalid = sum(1 for char in escaped if "\udc80" <= char <= "\udcff")
    first = next(i for i, char in enumerate(escaped) if "\udc80" <= char <= "\udcff")
    offset = len(escaped[:first].encode("utf-8", errors="surrogateescape"))
    if invalid > max_invalid * len(raw):
        raise ValueError(f"{file} is not UTF-8 text: {invalid} of its {len(raw)} bytes cannot be decoded (the first "
                         f"at byte {offset}); the limit is {max_invalid:.1%}. Convert it to UTF-8 (iconv) or leave it "
                         "out of the source's glob")
    logger.warning("%s: %d undecodable bytes (the first at byte %d) read as U+FFFD", file, invalid, offset)
    return raw.decode("utf-8", errors="replace")


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
            documents.append((file, read_utf8(file)))
        elif kind == "jsonl":
            lines = read_utf8(file).replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as open() reads lines
            for i, line in enumerate(lines, 1):
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


def hf_stream(source, seed):
    """A Hugging Face dataset as a shuffled `IterableDataset` (datasets' own streaming tools).

    `shuffle(seed, buffer_size)` shuffles the order of the shards and then the examples through a
    buffer; a `data_dir` list (StarCoder languages) streams each part, shuffled, and
    `interleave_datasets` draws from them with `data_dir_weights` (equal when null). Both stopping
    strategies read every document at most once, so the validation documents (the front of this
    stream) never reappear in training."""
    import datasets

    from ..fetch import dataset_path  # offline: the snapshot `dsmoe fetch` left in the cache

    data_dirs, weights = _hf_parts(source)
    buffer = source.get("shuffle_buffer", 10000)
    parts = [datasets.load_dataset(dataset_path(source), source.get("subset"), split=source.get("split", "train"), data_dir=data_dir,
                                   data_files=source.get("data_files"), streaming=True).shuffle(seed=seed + i, buffer_size=buffer)
             for i, data_dir in enumerate(data_dirs)]
    if len(parts) == 1:
        return parts[0]
    return datasets.interleave_datasets(parts, probabilities=[w / sum(weights) for w in weights], seed=seed,
                                        stopping_strategy=source.get("stopping_strategy", "first_exhausted"))


def _hf_parts(source):
    """The `data_dir` entries of an hf source (one None when unset) and their interleaving weights."""
    name = source["name"]
    if not source.get("path"):
        raise ValueError(f"source {name!r} (hf) needs `path`, the dataset id (or json/parquet with data_files)")
    data_dirs = source.get("data_dir")
    data_dirs = data_dirs if isinstance(data_dirs, list) else [data_dirs]
    weights = source.get("data_dir_weights")
    if weights is not None and len(weights) != len(data_dirs):
        raise ValueError(f"source {name!r}: {len(weights)} data_dir_weights for {len(data_dirs)} data_dir entries")
    return data_dirs, [1.0] * len(data_dirs) if weights is None else [float(w) for w in weights]


def hf_documents(source, seed=0):
    """Stream a Hugging Face dataset's texts in a seeded random order (`hf_stream`)."""
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"source {source['name']!r} streams a Hugging Face dataset: pip install 'dsmoe[datasets]'")
    dataset_id, field = source.get("path"), source.get("text_field", "text")
    _hf_parts(source)
    try:
        stream = hf_stream(source, seed)
        first = next(iter(stream))
    except StopIteration:
        raise ValueError(f"source {source['name']!r}: Hugging Face dataset {dataset_id!r} is empty") from None
    except Exception as err:  # datasets raises many types for a missing, gated or offline dataset
        raise ValueError(f"source {source['name']!r}: cannot open Hugging Face dataset {dataset_id!r}: {err}") from err
    _text_of(first, field, f"Hugging Face dataset {dataset_id!r}")
    return (_text_of(record, field, f"{dataset_id} record {i}") for i, record in enumerate(stream))


def source_documents(source, seed=0):
    """`(documents, total_chars)`: document texts in split order, and their total size when finite.

    `seed` orders the streamed (hf) sources; finite ones keep their hash order."""
    kind = source["kind"]
    if kind == "builtin":
        builders = {"stdlib-code": stdlib_code_documents, "stdlib-prose": stdlib_prose_documents}
        if source["name"] not in builders:
            raise ValueError(f"unknown builtin source {source['name']!r}; choose one of {', '.join(BUILTIN_SOURCES)}")
        documents = builders[source["name"]]()
    elif kind == "hf":
        return hf_documents(source, seed), None
    else:
        documents = local_documents(source)
    total_chars = sum(len(text) for text in documents)
    if total_chars == 0:
        raise ValueError(f"source {source['name']!r} is an empty corpus: no text in {len(documents)} documents")
    return documents, total_chars
