"""The libc calls Python does not expose, called for real."""

from __future__ import annotations

import errno
import os
import sys

import pytest

from spoold import libc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's libc")


def test_renameat2_moves_a_file_and_leaves_its_errno_for_a_missing_one(tmp_path) -> None:
    fn = libc.function("renameat2")
    src, dest = tmp_path / "a", tmp_path / "b"
    src.write_text("x")
    assert fn(-100, os.fsencode(src), -100, os.fsencode(dest), 1) == 0 and dest.read_text() == "x"
    assert fn(-100, os.fsencode(src), -100, os.fsencode(dest), 1) == -1
    assert libc.last_errno() == errno.ENOENT
    e = libc.error(src)
    assert e.errno == errno.ENOENT and e.filename == str(src)


def test_syncfs_flushes_the_filesystem_of_a_directory(tmp_path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert libc.function("syncfs")(fd) == 0
    finally:
        os.close(fd)
    assert libc.function("no_such_function_in_libc") is None
