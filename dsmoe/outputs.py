"""Checks of a command's output paths, made before any work so that a bad `--out` fails at once.

Outputs are written atomically (`dsmoe.atomic`) when the work is done; these checks catch what would
make that final write fail after hours of evaluation: the path exists as the other kind (a file where a
directory is written, or the reverse), one of its parents is a file, or the directory it will be written
in is on a read-only or full file system, or not writable.
"""

import errno
import os
from pathlib import Path


def _check_writable(directory, path, flag):
    if not os.access(directory, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(directory).f_flag & os.ST_RDONLY else errno.EACCES
        raise OSError(code, f"{os.strerror(code)} (cannot write {flag} {str(path)!r} there)", str(directory))
    if os.statvfs(directory).f_bavail == 0:
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
