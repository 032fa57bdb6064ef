"""An ext4 filesystem with its journal on a loop device, for what depends on the filesystem: group commit
is only on where a power cut cannot undo more than its last interval. Needs root and loop devices; a
test that asks for one where there is none is skipped with the reason."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a loop device"
    if not (shutil.which("losetup") and shutil.which("mkfs.ext4") and os.path.exists("/dev/loop-control")):
        return "needs losetup, mkfs.ext4 and /dev/loop-control"
    return None


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def mount(image: Path, at: Path) -> None:
    """`commit=60`: ext4 commits its journal only when asked (syncfs, fsync), not every 5 s on its own."""
    sh("mount", "-o", "loop,commit=60", str(image), str(at))


def unmount(at: Path) -> None:
    try:
        sh("umount", str(at))
    except subprocess.CalledProcessError:
        sh("umount", "-l", str(at))  # something still holds it: detach now, free the loop device once let go


@contextlib.contextmanager
def journaled_ext4(base: Path, size_mb: int = 96) -> Iterator[tuple[Path, Path]]:
    """(mount point, backing image) of a fresh ext4 with its journal, unmounted afterwards whatever happens."""
    why = unavailable()
    if why:
        pytest.skip(why)
    image, at = base / "disk.img", base / "mnt"
    at.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    sh("mkfs.ext4", "-q", "-F", str(image))
    try:
        mount(image, at)
    except subprocess.CalledProcessError as e:  # a container without loop mounts
        pytest.skip(f"cannot mount a loop device here: {e.stderr.decode(errors='replace').strip()}")
    try:
        yield at, image
    finally:
        unmount(at)
