"""Reruns skip work already done: a stamp file holds the fingerprint of a result's inputs."""

import hashlib
import json
from pathlib import Path

from .._version import __version__
from ..atomic import atomic_file


def fingerprint(paths=(), **params):
    """Hash of `params` and of the name, size and mtime of every file under `paths` (the inputs)."""
    files = []
    for path in map(Path, paths):
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
        found = [p for p in found if not p.name.startswith(".") and "__pycache__" not in p.parts]
        files += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in found]
        files += [] if found else [(str(path), None, None)]
    blob = json.dumps({"dsmoe": __version__, "params": params, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def up_to_date(stamp, key, outputs):
    stamp = Path(stamp)
    return stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == key and all(Path(o).exists() for o in outputs)


def write_stamp(stamp, key):
    with atomic_file(stamp) as handle:
        json.dump({"fingerprint": key}, handle)
