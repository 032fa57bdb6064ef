"""Group commit (`durability: batch`): the daemon's fsyncs skipped, and made up for by one syncfs(2) of
the spool's filesystem every `commit_interval_ms`.

A kill -9 loses nothing (the page cache outlives the process). A power cut may undo what the last
interval wrote, and only that, on a filesystem that makes names durable in the order they were
made and never a name before its file's bytes: ext4 with its journal in data=ordered mode (the
default). `problem` says why a spool's filesystem is not one; the daemon then keeps full
durability and says so. Each new file's bytes are sent to the disk (sync_file_range, not waited
for) before its name is linked, and ext4 commits no name before data already on its way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from spoold import libc

if TYPE_CHECKING:
    from spoold.spool import Spool


def commit(sp: Spool) -> bool:
    """Flush everything written since the last commit; False when nothing was waiting."""
    if not sp.local.dirty:
        return False
    fd = os.open(sp.root, os.O_RDONLY | os.O_DIRECTORY)
    sp.local.dirty = False  # before the flush: a write during it marks the next commit
    try:
        if libc.function("syncfs")(fd) != 0:
            raise libc.error(sp.root)
    except BaseException:
        sp.local.dirty = True
        raise
    finally:
        os.close(fd)
    return True


def start_writeback(fd: int) -> None:
    """Send a new file's bytes to the disk now, without waiting for them."""
    fn = libc.function("sync_file_range")
    if fn is None or fn(fd, 0, 0, 2) != 0:  # SYNC_FILE_RANGE_WRITE
        os.fsync(fd)


def problem(root: Path) -> str | None:
    """Why group commit could lose more than its last interval on this spool's filesystem; None if it cannot."""
    if not sys.platform.startswith("linux"):
        return "it needs Linux (syncfs, and ext4's ordered journal)"
    if libc.function("syncfs") is None or libc.function("sync_file_range") is None:
        return "this C library has no syncfs or sync_file_range"
    mount = _mount_of(root)
    if mount is None:
        return f"the filesystem of {root} is not in /proc/self/mountinfo"
    dev, fstype = mount
    if fstype != "ext4":
        return f"{root} is on {fstype}; it needs ext4 with its journal"
    name = _block_name(dev)
    if name is None or not Path(f"/proc/fs/jbd2/{name}-8").exists():
        return f"the ext4 filesystem of {root} has no journal"
    try:
        options = Path(f"/proc/fs/ext4/{name}/options").read_text().split()
    except OSError:
        return f"cannot read the mount options of {root}'s ext4 filesystem"
    if "data=ordered" not in options:
        return f"the ext4 filesystem of {root} is not mounted data=ordered"
    return None


def _mount_of(root: Path) -> tuple[str, str] | None:
    """(major:minor, fstype) of the mount that holds root: the longest mount point above it."""
    target = os.path.realpath(root)
    best: tuple[int, str, str] | None = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fields[2], right.split()[0])
    return (best[1], best[2]) if best else None


def _block_name(dev: str) -> str | None:
    """The kernel's name of a block device (`vda`, `loop0`), from its major:minor."""
    try:
        return os.path.basename(os.readlink(f"/sys/dev/block/{dev}"))
    except OSError:
        return None


