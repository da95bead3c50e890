"""The prepared-data contract: what `dsmoe data prepare` writes and every stage reads.

    DATA/manifest.json        {"seq_len", "sample_mode", "tokenizer", "fingerprint", "sources": {name: {...}}}
    DATA/<source>/train.npy   1-D int32 token stream (sample_mode truncate: rows of seq_len, PAD-filled)
    DATA/<source>/val.npy     2-D int32 array (n_val, seq_len): the validation split, results are reported on it
    DATA/<source>/tune.npy    2-D int32 array (n_tune, seq_len), when data.tune_sequences > 0: the tuning split (pilots)

Padding (`PAD`, -1) appears only with `sample_mode: truncate`; `model_inputs` turns a batch into
forward arguments that mask it. Readers: the manifest, the validation windows (perplexity, sweeps,
drop), the training sequences and their mixture sampler (training), and the calibration windows
(gate init, pruning).
"""

import json
from pathlib import Path

import numpy as np
import torch


PAD = -1  # padding of a truncated document's row: no token, masked from loss, perplexity and routing counts


def model_inputs(ids):
    """Forward arguments of a batch of prepared sequences (LongTensor B x T): `input_ids` and `labels`,
    and, when the batch holds PAD, an `attention_mask` that hides it (PAD becomes token 0, label -100).
    A batch without PAD gets no mask, so packed data runs exactly as before."""
    pad = ids == PAD
    if not bool(pad.any()):
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids.masked_fill(pad, 0), "labels": ids.masked_fill(pad, -100), "attention_mask": (~pad).long()}


def pack(stream, seq_len):
    """View a 1-D token stream as consecutive, non-overlapping sequences (the tail < seq_len is dropped)."""
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len]).reshape(n, seq_len)


def read_manifest(data_dir):
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} holds no prepared data (no manifest.json); run `dsmoe data prepare`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is damaged, not JSON ({err}); run `dsmoe data prepare` again") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sources"), dict) or "seq_len" not in manifest:
        raise ValueError(f"{path} is not a prepared-data manifest (no seq_len and sources); run `dsmoe data prepare`")
    return manifest


def load_array(path):
    """A token array written by `dsmoe data prepare`, memory-mapped; a clear error for a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the prepared data is incomplete; run `dsmoe data prepare` again")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is damaged or truncated ({err}); run `dsmoe data prepare` again") from err


HELD_OUT_SPLITS = ("val", "tune")


def has_split(data_dir, split):
    """Whether every source of a prepared data directory holds `split` (val always; tune when asked for)."""
    return all((Path(data_dir) / name / f"{split}.npy").is_file() for name in read_manifest(data_dir)["sources"])


def load_validation(data_dir, split="val"):
    """`{source: (n, seq_len) int32 array}` (memory-mapped) of a held-out split: val (validation) or tune."""
    if split not in HELD_OUT_SPLITS:
        raise ValueError(f"held-out split {split!r} is not one of {HELD_OUT_SPLITS}")
    manifest = read_manifest(data_dir)
    if split == "tune" and not has_split(data_dir, "tune"):
        raise ValueError(f"{data_dir} has no tuning split: prepare it with data.tune_sequences > 0")
    validation = {}
    for name in manifest["sources"]:
        path = Path(data_dir) / name / f"{split}.npy"
        sequences = load_array(path)
        if sequences.ndim != 2 or sequences.shape[1] != manifest["seq_len"]:
            raise ValueError(f"{path} has shape {sequences.shape}, expected (n, {manifest['seq_len']})")
        validation[name] = sequences
    return validation


def load_train(data_dir):
    """`{source: (n_train, seq_len) int32 array}`: each training stream packed into sequences (memory-mapped);
    a truncate-mode stream is its rows, so packing gives them back."""
    manifest = read_manifest(data_dir)
    return {name: pack(load_array(Path(data_dir) / name / "train.npy"), manifest["seq_len"])
            for name in manifest["sources"]}


def calibration_windows(data_dir, n_sequences, seq_len=None):
    """`n_sequences` token windows (LongTensor N x seq_len) from DATA/<source>/train.npy.

    Sources take turns; each source's windows are spaced evenly over its token stream. Padded
    (truncate-mode) streams give windows of real tokens only: the rows from the window's start on,
    without their padding, joined (`_unpadded_window`)."""
    manifest = read_manifest(data_dir)
    seq_len = int(seq_len or manifest["seq_len"])
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 1:
        raise ValueError(f"calibration sequences must be a positive integer, got {n_sequences!r}")
    sources = list(manifest["sources"])
    counts = {name: n_sequences // len(sources) + (i < n_sequences % len(sources)) for i, name in enumerate(sources)}
    windows = []
    for name, count in counts.items():
        if count == 0:
            continue
        path = Path(data_dir) / name / "train.npy"
        stream = load_array(path)
        if stream.ndim != 1 or len(stream) < seq_len:
            raise ValueError(f"{path} must be a 1-D token stream of at least seq_len={seq_len} tokens, got shape {stream.shape}")
        padded = manifest.get("sample_mode") == "truncate"
        for start in np.linspace(0, len(stream) - seq_len, count).astype(np.int64):
            window = _unpadded_window(stream, start, seq_len, manifest["seq_len"]) if padded else stream[start : start + seq_len]
            windows.append(np.asarray(window, dtype=np.int64))
    return torch.from_numpy(np.stack(windows))


def _unpadded_window(stream, start, seq_len, row_len):
    """`seq_len` real tokens of a padded stream of rows, read from the row holding `start` on (wrapping)."""
    rows, tokens, row = len(stream) // row_len, [], int(start) // row_len
    for i in range(rows):
        chunk = np.asarray(stream[((row + i) % rows) * row_len:][:row_len])
        tokens.append(chunk[chunk != PAD])
        if sum(map(len, tokens)) >= seq_len:
            return np.concatenate(tokens)[:seq_len]
    raise ValueError(f"a padded training stream holds fewer than seq_len={seq_len} real tokens")


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
