import os
import stat

import pytest

from dsmoe.atomic import atomic_dir, atomic_file


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
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_an_existing_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
