"""Spool format 1 → 2, in place and crash-safe.

Format 1 rewrote a task file at every transition (`status`, `attempts`, `started_at`, `error`
in its frontmatter) and named running/ files `ID@OWNER.md`. Format 2 writes a task file once
and keeps what changes in names and write-once records. Every step below is idempotent and
`.spoold/format` is written last, so a migration killed at any point is finished by the next
open of the spool, and loses nothing.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spoold import owners, spool
from spoold.errors import BadInput, SpoolError
from spoold.spool import Spool
from spoold.task import FORMAT1_KEYS, parse_time, render, split_frontmatter
from spoold.task import parse_text as parse_frontmatter

log = logging.getLogger("spoold")
PROGRESS_EVERY = 10_000


def migrate(sp: Spool) -> int:
    """Bring the spool to format 2; returns how many files changed. One process at a time (an flock)."""
    import filelock

    with filelock.FileLock(spool.migrate_lock_path(sp), timeout=-1, thread_local=False, mode=0o600):
        if spool.read_format(sp) is not None:
            return 0  # another process finished it while we waited
        live = [o for o in spool.lock_owners(sp) if o != spool.owner_tag() and _alive_here(sp, o)]
        if live:
            raise SpoolError(f"{sp.root} is in spool format 1 and a spoold daemon of that version serves it "
                             f"({live[0]}); stop it, then run spoold again to migrate the spool")
        theirs = [(n, v[1]) for n in spool.running_names(sp) if (v := spool.parse_v1_running_name(n))
                  and v[2] == "md" and spool.owner_host(v[1]) not in (spool.host_id(), spool.legacy_host())]
        if theirs:  # its daemon, elsewhere, may still finish it under its format-1 name
            name, owner = theirs[0]
            raise SpoolError(f"{sp.root} is in spool format 1 and running/{name} is being run by another host "
                             f"({spool.owner_host(owner)}); stop spoold there once it is done, then run spoold "
                             "again (if that host is gone for good, move the file into inbox/ to run it anew)")
        log.info("migrating %s from spool format 1 to %d", sp.root, spool.FORMAT)
        changed = _running(sp)
        changed += _each(sp, [spool.queued_path(sp, e.name) for e in spool.list_queued(sp)], queued=True)
        for state in spool.TERMINAL:
            changed += _each(sp, list(spool.terminal_task_files(sp, state)), queued=False)
        spool.write_new(sp, spool.format_path(sp), f"{spool.FORMAT}\n".encode())
        log.info("migrated %s to spool format %d (%d files changed)", sp.root, spool.FORMAT, changed)
        return changed


def _alive_here(sp: Spool, owner: str) -> bool:
    """A daemon on this host that holds its lock; another host's cannot be seen (its files keep their owner)."""
    return spool.owner_host(owner) in (spool.host_id(), spool.legacy_host()) and owners.owner_alive(sp, owner)


def _running(sp: Spool) -> int:
    """`running/ID@OWNER.md` → `running/ID.N.STARTED@OWNER.md` (owner kept), then its frontmatter cleaned.
    The rename comes first: the name then carries the attempt and start the frontmatter said."""
    changed = 0
    for name in spool.running_names(sp):
        parsed = spool.parse_v1_running_name(name)
        if parsed is None:
            continue
        task_id, owner, suffix = parsed
        path = spool.running_file(sp, name)
        if suffix == "partial":
            path.unlink(missing_ok=True)  # an answer so far: the owner's scratch, rebuilt by a new run
            continue
        meta = _meta(path)
        attempts = meta.get("attempts")
        attempt = attempts if isinstance(attempts, int) and not isinstance(attempts, bool) and attempts > 0 else 1
        started = _time(meta.get("started_at")) or datetime.fromtimestamp(path.stat().st_mtime, UTC)
        dest = spool.running_path(sp, task_id, attempt, started, owner=owner)
        spool.move(path, dest)
        changed += 1
    changed += _each(sp, [spool.running_file(sp, e.name) for e in spool.list_running(sp)], queued=False)
    return changed


def _each(sp: Spool, paths: list[Path], *, queued: bool) -> int:
    """Clean each task file (a queued one's attempts recorded first); one directory fsync per directory."""
    changed, dirs = 0, set()
    for i, path in enumerate(paths, 1):
        if _clean(sp, path, queued=queued):
            changed += 1
            dirs.add(path.parent)
        if i % PROGRESS_EVERY == 0:
            log.info("migrating: %d of %d files in %s/", i, len(paths), path.parent.name)
    for d in dirs:
        spool.fsync_dir(d)
    return changed


def _clean(sp: Spool, path: Path, *, queued: bool) -> bool:
    """Drop format 1's runtime keys from one task file spoold wrote (a foreign or rejected file is left as it
    is). A queued task's earlier attempts become records, so they still count against max_attempts."""
    try:
        text = spool.read_bytes(path).decode("utf-8")
        fm, body, _ = split_frontmatter(text)
        meta, _ = parse_frontmatter(text)
    except (OSError, UnicodeDecodeError, BadInput):
        return False
    task_id = path.name.split(".")[-2] if queued else path.name.split(".")[0]
    if fm is None or meta.get("id") != task_id or not any(k in meta for k in FORMAT1_KEYS):
        return False
    attempts = meta.get("attempts")
    if queued and isinstance(attempts, int) and not isinstance(attempts, bool) and attempts > 0:
        _record_attempts(sp, task_id, attempts, meta)
    kept = {k: v for k, v in meta.items() if k not in FORMAT1_KEYS}
    spool.rewrite(sp, path, render(kept, body), sync_dir=False)
    return True


def _record_attempts(sp: Spool, task_id: str, attempts: int, meta: dict[str, Any]) -> None:
    """One `N.requeued@OWNER.json` per earlier attempt (those a crash already wrote are kept)."""
    have = {r.attempt for r in spool.attempt_records(sp, task_id) if r.kind == "requeued"}
    for n in range(1, attempts + 1):
        if n in have:
            continue
        reason = meta.get("error") if n == attempts else None
        record = {"attempt": n, "owner": spool.owner_tag(), "started_at": None, "ended_at": None,
                  "reason": reason if isinstance(reason, str) else "migrated from spool format 1"}
        try:
            spool.write_new(sp, spool.requeued_record_path(sp, task_id, n), (json.dumps(record) + "\n").encode())
        except FileExistsError:
            pass


def _meta(path: Path) -> dict[str, Any]:
    try:
        return parse_frontmatter(spool.read_bytes(path).decode("utf-8"))[0]
    except (OSError, UnicodeDecodeError, BadInput):
        return {}


def _time(value: Any) -> datetime | None:
    try:
        return parse_time(value, "started_at") if value else None
    except BadInput:
        return None

