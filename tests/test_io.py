"""Atomic writes (dsmoe/atomic.py): whole or nothing, never over a folder dsmoe did not write, and no
temporary left behind by an interrupted write."""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from dsmoe import atomic
from dsmoe.atomic import atomic_dir, atomic_file

HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname().split(".")[0])


def test_atomic_file_appears_whole_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "result.csv"
    with atomic_file(target) as handle:
        handle.write("a,b\n")
        assert not target.exists()
    assert target.read_text() == "a,b\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_failed_writes_leave_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "x.txt") as handle:
            handle.write("partial")
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "model", "model") as tmp:
            (tmp / "weights").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_its_own_output_and_marks_it(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target, "model") as tmp:
        (tmp / "old").write_text("old")
    assert json.loads((target / "dsmoe_output.json").read_text())["kind"] == "model"
    with atomic_dir(target, "model") as tmp:  # a rerun of the same command
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["dsmoe_output.json", "new"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", "data") as tmp:  # an empty folder holds nothing to lose
        (tmp / "manifest.json").write_text("{}")
    assert (tmp_path / "empty" / "manifest.json").exists()


def test_atomic_dir_refuses_a_folder_it_did_not_write(tmp_path):
    """Issue 12.1: `--out` pointing at a user's folder (or another kind of dsmoe output) is refused,
    saying what is there, and left untouched; `overwrite` replaces it."""
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "chapter1.tex").write_text("years of work")
    (user / "figures").mkdir()
    with pytest.raises(FileExistsError, match=r"thesis exists and is not a dsmoe output: it holds chapter1.tex, "
                                              r"figures.*--overwrite"):
        with atomic_dir(user, "model") as tmp:
            (tmp / "config.json").write_text("{}")
    assert (user / "chapter1.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no temporary left either

    with atomic_dir(tmp_path / "data", "data") as tmp:
        (tmp / "manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match="is a dsmoe data output"):
        atomic.check_out(tmp_path / "data", "model")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        atomic.check_out(tmp_path / "notes.txt", "model")

    with atomic_dir(user, "model", overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in user.iterdir()) == ["config.json", "dsmoe_output.json"]


WRITER = """
import sys, time
from pathlib import Path
from dsmoe.atomic import atomic_dir
with atomic_dir(sys.argv[1], "model") as tmp:
    (Path(tmp) / "weights").write_bytes(b"x" * 1000)
    print("ready", flush=True)
    time.sleep(120)
"""


def signals_as_from_a_shell():
    """In the child before exec: no signal blocked and SIGINT at its default, whatever this test worker
    inherited or set (a fresh clone's `make test` once saw the writer ignore SIGINT for 60 s)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_removes_the_temporary_folder(tmp_path, signum):
    """Issue 12.4: a write stopped by SIGTERM (scancel, snakemake) or SIGINT (Ctrl-C) leaves no `.NAME.*`."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "model")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, preexec_fn=signals_as_from_a_shell)
    assert proc.stdout.readline().strip() == "ready"
    assert len(list(tmp_path.iterdir())) == 1  # the temporary folder, model-sized
    proc.send_signal(signum)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_removed_at_the_next_write(tmp_path):
    """Issue 12.4: temporaries whose process is gone (kill -9, a node crash) go at the next write of
    the same target; a live writer's, another host's and another target's stay."""
    pid = dead_pid()
    stale = [tmp_path / f".model.tmp-{HOST}-{pid}-abc123", tmp_path / f".model.tmp-{HOST}-{pid}-q_9"]
    live = tmp_path / f".model.tmp-{HOST}-{os.getpid()}-zzz"
    other_host = tmp_path / f".model.tmp-elsewhere-{pid}-abc"
    other_target = tmp_path / f".data.tmp-{HOST}-{pid}-abc"
    for folder in [*stale, live, other_host, other_target]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / f".result.csv.tmp-{HOST}-{pid}-k2").write_text("partial")
    with atomic_dir(tmp_path / "model", "model") as tmp:
        (tmp / "config.json").write_text("{}")
    with atomic_file(tmp_path / "result.csv") as handle:
        handle.write("a\n")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["model", "result.csv", live.name, other_host.name, other_target.name])


def test_a_replace_killed_between_its_renames_is_undone(tmp_path):
    """The previous output moved aside (`.NAME.old-…`) by a write killed before the new one was put
    in place is put back at the next write."""
    aside = tmp_path / f".model.old-{HOST}-{dead_pid()}-1f2e"
    aside.mkdir()
    (aside / "dsmoe_output.json").write_text(json.dumps({"kind": "model"}))
    (aside / "weights").write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "model", "model"):
            raise RuntimeError("boom")
    assert (tmp_path / "model" / "weights").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
