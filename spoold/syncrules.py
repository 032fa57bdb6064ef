"""What must stay on one machine when a spool is synced, and each sync tool's way of saying so.

The format defines it, here, once: staging (tmp/), flocks (a sync tool replacing a lock file's
inode would let two local processes hold one lock), the working directory with its kept claim
links, and a running task's partial answer (its owner's scratch, rewritten as it streams).
Everything else is synced: each file is written once under a name no other host writes, or is
one host's own (its ledger and heartbeats), or is yours (config.yaml: change it on one machine at
a time), so a sync tool never needs to merge.
"""

from __future__ import annotations

import contextlib
import os

from spoold import spool
from spoold.spool import Spool

# (path relative to the spool, is a directory); one list for every tool
LOCAL: list[tuple[str, bool]] = [
    ("tmp", True),
    (".spoold/locks", True),
    (".spoold/work", True),
    (".spoold/kept", True),
    (".spoold/cache", True),
    (".spoold/ledger/.lock", False),
    (".spoold/migrate.lock", False),
]
LOCAL_GLOBS = ["running/*.partial"]
TOOLS = ("syncthing", "unison", "rsync", "nextcloud", "dropbox")
_HEADER = "spoold: keep each machine's in-flight state local (written by `spoold init --sync {tool}`)"


def syncthing() -> str:
    """`.stignore` at the spool's root (the Syncthing folder's root); `(?d)` lets a directory holding only
    ignored files be deleted."""
    lines = [f"// {_HEADER.format(tool='syncthing')}"]
    lines += [f"(?d)/{p}" for p, _ in LOCAL] + [f"(?d)/{g}" for g in LOCAL_GLOBS]
    return "\n".join(lines) + "\n"


def unison_patterns() -> list[str]:
    """Unison path patterns (`-ignore PATTERN`, or `ignore = PATTERN` in a profile), relative to the roots."""
    return [f"Path {p}" for p, _ in LOCAL] + [f"Path {g}" for g in LOCAL_GLOBS]


def unison() -> str:
    """Lines for a Unison profile (`include` it, or paste it)."""
    lines = [f"# {_HEADER.format(tool='unison')}"] + [f"ignore = {p}" for p in unison_patterns()]
    return "\n".join(lines) + "\n"


def rsync() -> str:
    """An rsync filter file (`rsync -a --filter='merge .spoold-rsync-filter'`), anchored at the spool's root."""
    lines = [f"# {_HEADER.format(tool='rsync')}"]
    lines += [f"- /{p}{'/' if d else ''}" for p, d in LOCAL] + [f"- /{g}" for g in LOCAL_GLOBS]
    return "\n".join(lines) + "\n"


def nextcloud() -> str:
    """`.sync-exclude.lst` in the spool's root: the Nextcloud desktop client reads one per folder."""
    lines = [f"# {_HEADER.format(tool='nextcloud')}"]
    lines += [f"{p}{'/' if d else ''}" for p, d in LOCAL] + LOCAL_GLOBS
    return "\n".join(lines) + "\n"


RULE_FILES = {"syncthing": (".stignore", syncthing), "unison": (".spoold-unison.prf", unison),
              "rsync": (".spoold-rsync-filter", rsync), "nextcloud": (".sync-exclude.lst", nextcloud)}


def write(sp: Spool, tool: str) -> list[str]:
    """Write the tool's rules into the spool; returns what was done, in words."""
    if tool == "dropbox":
        return _dropbox(sp)
    name, render = RULE_FILES[tool]
    path = spool.spool_path(sp, name)
    spool.rewrite(sp, path, render().encode())
    return [f"wrote {path}"]


def _dropbox(sp: Spool) -> list[str]:
    """Dropbox has no ignore file: it skips what carries the `com.dropbox.ignored` attribute (Linux: the user
    namespace). Partial answers cannot be marked before they exist; they are one writer's, so syncing them
    is harmless, only traffic."""
    done = []
    for rel, is_dir in LOCAL:
        path = spool.spool_path(sp, rel)
        if is_dir:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        else:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        attr = "user.com.dropbox.ignored" if hasattr(os, "setxattr") else "com.dropbox.ignored"
        try:
            os.setxattr(path, attr, b"1")
            done.append(f"marked {path} ignored by Dropbox")
        except (AttributeError, OSError) as e:
            done.append(f"could not mark {path} ({getattr(e, 'strerror', None) or e}): run "
                        f"`xattr -w com.dropbox.ignored 1 '{path}'` (macOS) or `attr -s com.dropbox.ignored -V 1 '{path}'`")
    return done


def is_local(rel: str) -> bool:
    """Whether a path relative to the spool stays on one machine (for tests and tools that copy by hand)."""
    from fnmatch import fnmatch

    return any(rel == p or rel.startswith(p + "/") for p, _ in LOCAL) or any(fnmatch(rel, g) for g in LOCAL_GLOBS)

