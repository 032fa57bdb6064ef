"""Task transitions, each one rename: enqueue, claim, finish, requeue, cancel, retry, and recovery.

Only the process that claimed a task (its owner, named in the running/ file
name) moves or rewrites it; others ask through a `.cancel` marker. Owner
liveness is an flock held for the owner's lifetime.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spoold import spool
from spoold.errors import BadInput, InvalidState, TaskNotFound
from spoold.spool import Spool
from spoold.task import Result, Task, parse_task, render_result, render_task
from spoold.task import read as read_task

if TYPE_CHECKING:
    import filelock

log = logging.getLogger("spoold")


def now() -> datetime:
    return datetime.now(UTC)


# ---- owners --------------------------------------------------------------------


def hold_owner_lock(sp: Spool) -> filelock.BaseFileLock:
    """Mark this process alive as an owner of claims until it exits (the OS drops the lock on death)."""
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
    info = {"owner": owner, "host": spool.host_id(), "pid": os.getpid(), "since": now().isoformat(timespec="seconds").replace("+00:00", "Z"),
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
    probe.release()
    path.unlink(missing_ok=True)
    return False


# ---- into the queue ------------------------------------------------------------


def enqueue(sp: Spool, task: Task, *, sync_dir: bool = True) -> Path:
    """Write a new task straight into queued/ (submit, the adapter, intake)."""
    task.status = "queued"
    dest = spool.queued_path_for(sp, task.id, task.priority, task.not_before)
    return spool.write_new(sp, dest, render_task(task), sync_dir=sync_dir)


def claim_intake(sp: Spool, path: Path, task_id: str) -> Path | None:
    """Move a dropped entry into tmp/ under our name before reading it: nobody else takes it, nothing is lost.

    Not synced here: intake fsyncs tmp/ and the source directory once for a whole scan.
    """
    dest = spool.intake_claim_path(sp, task_id, path.name)
    try:
        return spool.move(path, dest, sync="none")
    except FileNotFoundError:
        return None


def unclaim_intake(sp: Spool, claimed: Path, original: Path) -> None:
    """Undo claim_intake when the task could not be written; recovery does it if even this fails."""
    try:
        spool.move(claimed, original)
    except OSError as e:
        log.warning("left %s in tmp/ (%s); recovery returns it to %s", claimed.name, e.strerror or e, original.parent.name)


def accept_intake(sp: Spool, task: Task) -> Path:
    """Write a taken entry's task into queued/; the caller syncs queued/, then drops the intake copy."""
    path = enqueue(sp, task, sync_dir=False)
    log.info("queued %s (from %s)", task.id, task.source)
    return path


def drop_intake_copy(claimed: Path) -> None:
    try:
        claimed.unlink()  # no fsync: if a power cut brings the copy back, recovery sees the task and drops it
    except OSError as e:  # queued already: recovery drops the copy
        log.warning("left the intake copy %s in tmp/ (%s)", claimed.name, e.strerror or e)


def reject_intake(sp: Spool, claimed: Path, task_id: str, source: str, message: str) -> None:
    """Keep the bad entry in failed/ untouched, with a result that says what to fix."""
    t = now()
    result = Result(id=task_id, status="failed", submitted_at=t, finished_at=t, attempts=0, error=message)
    spool.write_new(sp, spool.result_path_for(sp.dir("failed"), task_id), render_result(result))
    try:
        _move_rejected(sp, claimed, task_id)
    except OSError as e:  # the result is written: recovery moves the entry beside it
        log.warning("left the rejected %s in tmp/ (%s)", claimed.name, e.strerror or e)
    log.warning("failed %s (%s): %s", task_id, source, message)


def _move_rejected(sp: Spool, claimed: Path, task_id: str) -> None:
    regular = claimed.is_file() and not claimed.is_symlink()
    spool.move(claimed, spool.rejected_path(sp, task_id, regular))


# ---- dispatch ------------------------------------------------------------------


@dataclass
class Claimed:
    path: Path
    task: Task


def claim(sp: Spool, entry: spool.QueuedEntry, default_model: str, started: float | None = None) -> Claimed | None:
    """queued/ → running/ under our owner name. None if another process won, or the file is bad (then failed).

    The running copy (status, started_at, attempts) is staged before the move and swapped in
    right after it, so a claim costs one file and two directory fsyncs.
    """
    src, dest = spool.queued_path(sp, entry.name), spool.running_path(sp, entry.task_id)
    try:
        raw, st = spool.read_file(src)
        task = parse_task(raw.decode("utf-8"), task_id=entry.task_id, default_model=default_model)
    except FileNotFoundError:
        return None  # another process took it
    except (BadInput, UnicodeDecodeError, OSError):
        return _claim_as_is(sp, entry, dest, default_model, started)  # take it, then fail it with the reason
    _mark_started(task, started)
    staged = spool.stage(sp, render_task(task))
    try:
        if not spool.move_with(src, dest, staged, inode=st.st_ino):  # replaced while we read it: read it again
            return _claim_in_place(sp, entry, dest, default_model, started)
    except (FileNotFoundError, FileExistsError):
        return None
    log.info("running %s (attempt %d, model %s)", task.id, task.attempts, task.model)
    return Claimed(dest, task)


def _mark_started(task: Task, started: float | None) -> None:
    task.status = "running"
    task.started_at = datetime.fromtimestamp(started, UTC) if started is not None else now()
    task.attempts += 1


def _claim_as_is(
    sp: Spool, entry: spool.QueuedEntry, dest: Path, default_model: str, started: float | None
) -> Claimed | None:
    try:
        spool.move(spool.queued_path(sp, entry.name), dest)
    except (FileNotFoundError, FileExistsError):
        return None
    return _claim_in_place(sp, entry, dest, default_model, started)


def _claim_in_place(
    sp: Spool, entry: spool.QueuedEntry, dest: Path, default_model: str, started: float | None
) -> Claimed | None:
    """The claim already moved the file to dest: read it there, and fail it if it cannot be read."""
    try:
        task = read_task(dest, entry.task_id, default_model)
    except (BadInput, OSError) as e:
        msg = f"the queued task file cannot be read: {e}"
        result = Result(id=entry.task_id, status="failed", finished_at=now(), error=msg)
        spool.write_new(sp, spool.result_path_for(sp.dir("failed"), entry.task_id), render_result(result))
        spool.move(dest, spool.task_path_for(sp.dir("failed"), entry.task_id))
        log.warning("failed %s: %s", entry.task_id, msg)
        return None
    _mark_started(task, started)
    try:
        spool.rewrite(sp, dest, render_task(task))
    except OSError:
        spool.move(dest, spool.queued_path(sp, entry.name))  # disk full: the task waits, as it was
        raise
    log.info("running %s (attempt %d, model %s)", task.id, task.attempts, task.model)
    return Claimed(dest, task)


def finish(sp: Spool, claimed: Claimed, result: Result) -> Path:
    """running/ → done/DATE/ or failed/, result file first so a finished answer is never lost."""
    task = claimed.task
    task.status = result.status
    task.finished_at = result.finished_at or now()
    task.error = result.error
    dest_dir = spool.date_dir(sp, "done", task.finished_at) if result.status == "done" else sp.dir("failed")
    # Four fsyncs: the final text, the result, the result's name (before the task can land beside it)
    # and the task's name. running/ is not synced: a copy a power cut brings back there is dropped by
    # recovery, because the finished copy exists.
    spool.rewrite(sp, claimed.path, render_task(task), sync_dir=False)
    _write_result(sp, dest_dir, result)
    spool.fault("finish:result-written")
    dest = spool.move(claimed.path, spool.task_path_for(dest_dir, task.id), sync="dest")
    _drop_partial(claimed.path)
    log.info("%s %s%s", result.status, task.id, f": {result.error}" if result.error else "")
    return dest


def _drop_partial(running: Path) -> None:
    """The answer so far is the owner's scratch: once the task has left running/, its result says it all."""
    spool.partial_path(running).unlink(missing_ok=True)


def _write_result(sp: Spool, dest_dir: Path, result: Result) -> None:
    path = spool.result_path_for(dest_dir, result.id)
    try:
        spool.write_new(sp, path, render_result(result))
    except FileExistsError:
        log.warning("kept the existing result %s (not overwritten)", path)


def requeue(sp: Spool, claimed: Claimed, reason: str, *, count_attempt: bool = True) -> Path:
    """running/ → queued/: the task waits again (a hold, a transient error, a stop)."""
    task = claimed.task
    if not count_attempt:
        task.attempts = max(0, task.attempts - 1)
    task.status, task.error, task.started_at = "queued", reason, None
    spool.rewrite(sp, claimed.path, render_task(task))
    dest = spool.move(claimed.path, spool.queued_path_for(sp, task.id, task.priority, task.not_before))
    _drop_partial(claimed.path)
    log.info("requeued %s: %s", task.id, reason)
    return dest


def cancel_running(sp: Spool, claimed: Claimed, reason: str, answer: str = "") -> Path:
    """Owner side of a cancel: running/ → cancelled/, keeping any partial answer."""
    task = claimed.task
    task.status, task.finished_at, task.error = "cancelled", now(), reason
    spool.rewrite(sp, claimed.path, render_task(task))
    result = Result(id=task.id, status="cancelled", answer=answer, finished_at=task.finished_at, error=reason,
                    model=task.model, submitted_at=task.submitted_at, started_at=task.started_at, attempts=task.attempts)
    _write_result(sp, sp.dir("cancelled"), result)
    dest = spool.move(claimed.path, spool.task_path_for(sp.dir("cancelled"), task.id))
    _drop_partial(claimed.path)
    spool.cancel_marker(sp, task.id).unlink(missing_ok=True)
    log.info("cancelled %s", task.id)
    return dest


def cancel(sp: Spool, task_id: str) -> str:
    """Cancel a queued task at once, or ask a running task's owner to stop it. Returns the new state."""
    loc = spool.locate(sp, task_id)
    if loc.state == "queued":
        dest = spool.task_path_for(sp.dir("cancelled"), task_id)
        try:
            spool.move(loc.path, dest)
        except FileNotFoundError:
            return cancel(sp, task_id)  # claimed meanwhile: cancel it as running
        _mark_cancelled_in_place(sp, dest)
        log.info("cancelled %s", task_id)
        return "cancelled"
    if loc.state == "running":
        entry = spool.parse_running_name(loc.path.name)
        if entry and not owner_alive(sp, entry.owner):
            recover_running(sp, entry, max_attempts=1_000_000, cancelled=True)
            return "cancelled"
        marker = spool.cancel_marker(sp, task_id)
        if not marker.exists():
            spool.write_new(sp, marker, f"cancel requested {now().isoformat()}\n".encode())
        return "cancelling"
    raise InvalidState(f"task {task_id} is already {loc.state}; nothing to cancel")


def _mark_cancelled_in_place(sp: Spool, path: Path) -> None:
    try:
        task = read_task(path, path.stem)
    except (BadInput, OSError):
        return  # the move is the truth; a foreign file keeps its text
    task.status, task.finished_at = "cancelled", now()
    spool.rewrite(sp, path, render_task(task))


def retry(sp: Spool, task_id: str, default_model: str = "sonnet") -> Path:
    """failed/ or cancelled/ → queued/ with a fresh attempt count."""
    loc = spool.locate(sp, task_id)
    if loc.state not in ("failed", "cancelled"):
        raise InvalidState(f"task {task_id} is {loc.state}; only failed or cancelled tasks can be retried")
    try:
        task = read_task(loc.path, task_id, default_model)
    except (BadInput, OSError) as e:
        raise InvalidState(f"task {task_id} cannot be retried as it is ({e}); fix {loc.path} and drop it into inbox/") from None
    task.attempts, task.started_at, task.finished_at = 0, None, None
    path = enqueue(sp, task)
    loc.result_path.unlink(missing_ok=True)
    loc.path.unlink()
    spool.fsync_dir(loc.path.parent)
    log.info("retry %s", task_id)
    return path


# ---- recovery ------------------------------------------------------------------


def recover(sp: Spool, *, max_attempts: int, running_here: set[str] | None = None) -> list[str]:
    """Put everything a dead process left in flight back in a true state. Returns what was done.

    `running_here` (the ids this process is running) also recovers our own claims a
    failed write left behind, as if their owner had died.
    """
    actions: list[str] = []
    mine = spool.owner_tag()
    for entry in spool.list_running(sp):
        stray = running_here is not None and entry.owner == mine and entry.task_id not in running_here
        if stray or not owner_alive(sp, entry.owner):
            actions.append(recover_running(sp, entry, max_attempts=max_attempts))
    for name in spool.tmp_names(sp):
        actions.extend(_recover_tmp(sp, name, ours_stray=running_here is not None))
    for name in spool.running_names(sp):
        path = spool.running_file(sp, name)
        if name.endswith(spool.PARTIAL_SUFFIX) and not path.with_suffix(".md").exists():
            path.unlink(missing_ok=True)  # its task left running/ (a crash between the two)
        tid = spool.parse_cancel_marker(name)
        if tid is not None and not any(e.task_id == tid for e in spool.list_running(sp)):
            path.unlink(missing_ok=True)  # its task already ended
    return [a for a in actions if a]


def recover_running(sp: Spool, entry: spool.RunningEntry, *, max_attempts: int, cancelled: bool = False) -> str:
    """A dead owner's task: finish it if its result exists, else requeue it (or fail it after max_attempts)."""
    path = spool.running_file(sp, entry.name)
    result_path = spool.find_result(sp, entry.task_id)
    if result_path is not None:
        done = spool.task_path_for(result_path.parent, entry.task_id)
        try:
            spool.move(path, done)
        except FileExistsError:  # it had finished; a power cut brought back its running/ copy
            path.unlink(missing_ok=True)
            spool.fsync_dir(path.parent)
            return f"dropped a stale running/ copy of {entry.task_id} (it had already finished)"
        return f"finished {entry.task_id} (its result was already written)"
    try:
        task = read_task(path, entry.task_id)
    except (BadInput, OSError) as e:
        task = None
        err = f"the task file was damaged: {e}"
    claimed = Claimed(path, task) if task else None
    if claimed is None:
        result = Result(id=entry.task_id, status="failed", finished_at=now(), error=err)
        _write_result(sp, sp.dir("failed"), result)
        spool.move(path, spool.task_path_for(sp.dir("failed"), entry.task_id))
        return f"failed {entry.task_id}: {err}"
    if cancelled or spool.cancel_marker(sp, entry.task_id).exists():
        cancel_running(sp, claimed, "cancelled")
        return f"cancelled {entry.task_id}"
    if claimed.task.attempts >= max_attempts:
        msg = f"interrupted {claimed.task.attempts} times (the daemon died while it ran); run `spoold retry {entry.task_id}`"
        finish(sp, claimed, _failure(claimed.task, msg))
        return f"failed {entry.task_id}: {msg}"
    # Re-own the file before moving it, so the rewrite/move rule (owner only) holds.
    mine = spool.running_path(sp, entry.task_id)
    if path != mine:
        spool.move(path, mine)
    requeue(sp, Claimed(mine, claimed.task), f"interrupted on {entry.host} (pid {entry.pid}); requeued")
    return f"requeued {entry.task_id}"


def _failure(task: Task, message: str) -> Result:
    return Result(id=task.id, status="failed", model=task.model, submitted_at=task.submitted_at,
                  started_at=task.started_at, finished_at=now(), attempts=task.attempts, error=message)


def _recover_tmp(sp: Spool, name: str, *, ours_stray: bool = False) -> list[str]:
    """A dead process's staged write or intake claim; with ours_stray, also our own (intake never spans a turn)."""
    path = spool.tmp_path(sp, name)
    pruner = spool.parse_prune_name(name)
    if pruner is not None:  # a prune's intent is deletion: finish it once its process is gone
        if not owner_alive(sp, pruner) or (ours_stray and pruner == spool.owner_tag()):
            path.unlink(missing_ok=True)
            return [f"finished pruning {name.partition('~')[2].partition('~')[2]}"]
        return []
    claim_parts = spool.parse_intake_claim(name)
    if claim_parts is None:
        # A staged write that never became visible: nothing was promised. Writers such as
        # `spoold submit` hold no owner lock, so their liveness is their pid.
        staged_by = spool.staging_owner(name)
        pid = spool.owner_pid(staged_by) if staged_by else None
        if staged_by and not owner_alive(sp, staged_by) and not (pid is not None and spool.pid_alive(pid)):
            path.unlink(missing_ok=True)
        return []
    owner = claim_parts[0]
    if owner_alive(sp, owner) and not (ours_stray and owner == spool.owner_tag()):
        return []
    _, task_id, source = claim_parts
    try:
        spool.locate(sp, task_id)
        path.unlink(missing_ok=True) if not path.is_dir() or path.is_symlink() else None
        return [f"dropped the intake copy of {task_id} (already queued)"]
    except TaskNotFound:
        pass
    if spool.result_path_for(sp.dir("failed"), task_id).exists():
        _move_rejected(sp, path, task_id)
        return [f"moved {source} to failed (its result was already written)"]
    spool.move(path, spool.returned_path(sp, source, task_id))
    return [f"returned {source} to inbox (intake was interrupted)"]
