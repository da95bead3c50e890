"""Training and validation data: document sources, `dsmoe data prepare`, and the prepared-data contract."""

from .build import data_fingerprint, pack, prepare, tokenize_documents, tokenizer_fingerprint, train_caps
from .prepared import MixtureSampler, calibration_windows, load_train, load_validation, read_manifest
from .sources import BUILTIN_SOURCES, source_documents

__all__ = [
    "BUILTIN_SOURCES",
    "MixtureSampler",
    "calibration_windows",
    "data_fingerprint",
    "load_train",
    "load_validation",
    "pack",
    "prepare",
    "read_manifest",
    "source_documents",
    "tokenize_documents",
    "tokenizer_fingerprint",
    "train_caps",
]
