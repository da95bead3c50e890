"""Atomic writes: a result appears whole or not at all, and never replaces what dsmoe did not write.

Every output directory gets a marker, `dsmoe_output.json`, naming its kind (model, data, pruned).
An existing `--out` is replaced only when it is a dsmoe output of the same kind (a rerun of the same
command), is empty, or `overwrite` is given; anything else is refused, saying what is there.
`check_output_file` and `check_output_dir` catch, before any work, what would make the final write
fail after hours: the path exists as the other kind (a file where a directory is written, or the
reverse), a parent is a file, or the directory is on a read-only or full file system.

Temporary files and folders are written beside the target as `.NAME.tmp-HOST-PID-XXXX`: SIGINT and
SIGTERM remove them, and the next write of the same target removes those whose process is gone.
"""

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = "dsmoe_output.json"
KINDS = ("model", "data", "pruned", "tokenizer")
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname().split(".")[0]) or "host"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_kind(path):
    """The kind in `path`'s dsmoe_output.json, or None when `path` is not a dsmoe output directory."""
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _describe(path):
    if not path.is_dir():
        return "is a file, not a directory"
    kind = output_kind(path)
    if kind is not None:
        return f"is a dsmoe {kind} output"
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
    return f"is not a dsmoe output: it holds {shown}"


def check_out(path, kind, overwrite=False):
    """Refuse an existing `path` that is not an empty folder or a dsmoe output of `kind`, unless `overwrite`,
    and a `path` that cannot be written (its folder is read-only or full, or one of its parents is a file)."""
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; choose one of {', '.join(KINDS)}")
    _check_parents(path, "--out")  # a read-only or full disk fails now, not after the work
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and (output_kind(path) == kind or not any(path.iterdir())):
        return
    raise FileExistsError(f"--out {path} exists and {_describe(path)}; refusing to replace it with a {kind} "
                          "output: pass --overwrite to replace it, or choose another --out")


def _check_writable(directory, path, flag):
    """`directory` can take new files: writable, on a file system that is not read-only nor full."""
    if not os.access(directory, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(directory).f_flag & os.ST_RDONLY else errno.EACCES
        raise OSError(code, f"{os.strerror(code)} (cannot write {flag} {str(path)!r} there)", str(directory))
    stats = os.statvfs(directory)
    if stats.f_blocks > 0 and stats.f_bavail == 0:  # some network file systems report no sizes at all
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (cannot write {flag} {str(path)!r} there)",
                      str(directory))


def _check_parents(path, flag):
    """The nearest existing ancestor of `path` must be a writable directory."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a directory")
            _check_writable(parent, path, flag)
            return


def check_output_file(path, flag="--out"):
    """`path` will be written as a file: it must not be a directory, nor lie under a file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {str(path)!r} is a directory; this command writes a file there "
                                "(give a file path such as DIR/result.csv)")
    _check_parents(path, flag)
    return path


def check_output_dir(path, files=(), flag="--out"):
    """`path` will be a directory holding `files`: it must not be a file, nor hold a directory by those names."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {str(path)!r} is a file; this command writes a directory there "
                                 f"({', '.join(files) or 'its outputs'})")
    for name in files:
        if (path / name).is_dir():
            raise IsADirectoryError(f"{flag} {str(path)!r}: {str(path / name)!r} is a directory, where this command "
                                    "writes a file")
    if path.is_dir():
        _check_writable(path, path, flag)
    else:
        _check_parents(path, flag)
    return path


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_prefix(path, tag="tmp"):
    return f".{path.name}.{tag}-{_HOST}-{os.getpid()}-"


def remove_stale_temps(path):
    """Remove the temporaries of earlier writes of `path` whose process on this host is gone.

    A leftover `.NAME.old-…` (killed between the two renames of a replace) is the previous output:
    it is put back when `path` is missing, else removed."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-(.+)-(\d+)-[a-z0-9_]*$")
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if not match or match[2] != _HOST or _pid_alive(int(match[3])):
            continue
        if match[1] == "old" and not (path.exists() or path.is_symlink()):
            os.replace(entry, path)
            logger.warning("restored %s from %s, left by a write that was killed", path, entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            logger.info("removed %s, left by an interrupted write (process %s is gone)", entry, match[3])
        else:
            entry.unlink(missing_ok=True)


def _raise_on_signal(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_raise():
    """SIGTERM (like SIGINT) raises inside the block, so that its cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _raise_on_signal)
    try:
        yield
    finally:
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM wait until the block is done (the renames that put a result in place)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def _put_in_place(tmp, path):
    if not (path.exists() or path.is_symlink()):
        os.replace(tmp, path)
        return
    old = path.parent / f"{_temp_prefix(path, 'old')}{os.urandom(4).hex()}"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


@contextlib.contextmanager
def atomic_dir(path, kind, overwrite=False):
    """Yield a temporary directory beside `path`; move it to `path` only if the block succeeds.

    The result holds dsmoe_output.json with `kind`. An existing `path` is replaced only as
    `check_out` allows; temporaries of killed earlier writes are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    check_out(path, kind, overwrite)
    with _signals_raise():
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
            yield tmp
            from ._version import __version__

            (tmp / MARKER).write_text(json.dumps({"kind": kind, "dsmoe_version": __version__}) + "\n")
            with _signals_deferred():
                _put_in_place(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """Yield an open temporary file beside `path`, renamed onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    with _signals_raise():
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
            with os.fdopen(fd, mode) as handle:
                yield handle
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def write_csv(df, path):
    """Write a pandas DataFrame to CSV atomically."""
    with atomic_file(path) as handle:
        df.to_csv(handle, index=False)
