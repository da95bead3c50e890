"""Training and validation data: document sources, `dsmoe data prepare`, and the prepared-data contract."""

from .build import data_fingerprint, pack, prepare, sample_row, tokenize_documents, tokenizer_fingerprint, train_caps
from .prepared import PAD, MixtureSampler, calibration_windows, load_train, load_validation, model_inputs, read_manifest
from .sources import BUILTIN_SOURCES, source_documents

__all__ = [
    "BUILTIN_SOURCES",
    "PAD",
    "MixtureSampler",
    "calibration_windows",
    "data_fingerprint",
    "load_train",
    "load_validation",
    "model_inputs",
    "pack",
    "prepare",
    "read_manifest",
    "sample_row",
    "source_documents",
    "tokenize_documents",
    "tokenizer_fingerprint",
    "train_caps",
]
