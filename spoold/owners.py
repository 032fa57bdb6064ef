"""Owner liveness: a daemon holds an flock for its lifetime, and notes beside it that it serves the spool.

Another process on the same host can prove an owner dead (its lock is free); an owner on
another host always counts as alive from here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spoold import spool
from spoold.spool import Spool
from spoold.units import iso

if TYPE_CHECKING:
    import filelock


def hold_owner_lock(sp: Spool) -> filelock.BaseFileLock:
    """Mark this process alive as an owner of claims until it exits (the OS drops the lock on death);
    `let_go` ends it early."""
    import filelock  # lazy: `spoold submit` never takes a lock, and filelock costs it 15 ms of start-up

    path = spool.owner_lock_path(sp, spool.owner_tag())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = filelock.FileLock(path, timeout=0, thread_local=False, mode=0o600)
    lock.acquire()
    return lock


def announce_daemon(sp: Spool, overrides: dict[str, Any]) -> Path:
    """Say, beside our owner lock, that this process serves the spool: since when, and the settings its flags
    and environment set (so `spoold status` shows what the daemon uses, not what the caller's shell says)."""
    owner = spool.owner_tag()
    info = {"owner": owner, "host": spool.host_id(), "pid": os.getpid(), "since": iso(datetime.now(UTC)),
            "overrides": {k: v for k, v in overrides.items() if v is not None}}
    path = spool.daemon_info_path(sp, owner)
    path.unlink(missing_ok=True)  # a pid reused after a crash: the file was a dead daemon's, now ours
    return spool.write_new(sp, path, json.dumps(info).encode())


def serving_daemons(sp: Spool) -> list[dict[str, Any]]:
    """Daemons that said they serve the spool, each with `alive`: True or False on this host, None elsewhere
    (another host's liveness cannot be seen from here). A dead one's note is removed."""
    out = []
    for owner in spool.daemon_owners(sp):
        path = spool.daemon_info_path(sp, owner)
        try:
            info = json.loads(spool.read_bytes(path))
        except (OSError, ValueError):
            continue
        here = spool.owner_host(owner) in (spool.host_id(), spool.legacy_host())
        alive = owner_alive(sp, owner) if here else None
        if alive is False:
            path.unlink(missing_ok=True)
            continue
        out.append({**info, "alive": alive, "this_host": here})
    return out


def owner_alive(sp: Spool, owner: str) -> bool:
    """False only when we can prove it: same host and nobody holds its lock. Other hosts count as alive."""
    import filelock

    if spool.owner_host(owner) not in (spool.host_id(), spool.legacy_host()):  # format 1 named hosts by name
        return True
    if owner == spool.owner_tag():
        return True
    path = spool.owner_lock_path(sp, owner)
    if not path.exists():
        return False
    probe = filelock.FileLock(path, timeout=0, thread_local=False, mode=0o600)
    try:
        probe.acquire()
    except filelock.Timeout:
        return True
    probe.release()  # the file stays: only its owner removes it (a new process with a reused pid may hold it now)
    return False


def let_go(sp: Spool, lock: filelock.BaseFileLock) -> None:
    """Release our owner lock and remove its file: we own nothing in running/ any more."""
    spool.owner_lock_path(sp, spool.owner_tag()).unlink(missing_ok=True)
    lock.release()


@contextmanager
def owning(sp: Spool) -> Iterator[None]:
    """Hold an owner lock for a while (a CLI taking over a dead owner's task), so no recovery takes it meanwhile."""
    import filelock

    path = spool.owner_lock_path(sp, spool.owner_tag())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = filelock.FileLock(path, timeout=-1, thread_local=False, mode=0o600)
    with lock:
        yield
    path.unlink(missing_ok=True)
