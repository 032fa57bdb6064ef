"""Task transitions, each one rename: enqueue, claim, finish, requeue, cancel, retry.

A task file is written once, into queued/, and never changed again: its directory is its
state, and what changes over its life lives in names (the running/ name carries the attempt,
the start and the owner) and in write-once files (the result; `.spoold/attempts/ID/` records).
Only the process that claimed a task (its owner, named in the running/ name) moves it; others
ask through a `.cancel` marker, or take it over once its owner is proven dead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from spoold import spool
from spoold.errors import BadInput, InvalidState
from spoold.spool import Spool
from spoold.task import Result, Task, parse_result, parse_text, render_result, render_task
from spoold.task import read as read_task
from spoold.units import iso

log = logging.getLogger("spoold")


def iso_ms(dt: datetime) -> str | None:
    return iso(dt, ms=True)


def now() -> datetime:
    return datetime.now(UTC)


# ---- into the queue ------------------------------------------------------------


def enqueue(sp: Spool, task: Task, *, sync_dir: bool = True, staged: Path | None = None) -> Path:
    """Write a new task straight into queued/ (submit, the adapter, intake): the one write of its file
    (`staged`: its bytes, written already by spool.stage)."""
    dest = spool.queued_path_for(sp, task.id, task.priority, task.not_before)
    if staged is not None:
        return spool.write_new(sp, dest, staged=staged, sync_dir=sync_dir)
    return spool.write_new(sp, dest, render_task(task), sync_dir=sync_dir)


def claim_intake(sp: Spool, path: Path, task_id: str) -> Path | None:
    """Move a dropped entry into tmp/ under our name before reading it: nobody else takes it, nothing is lost.

    Not synced here: intake fsyncs tmp/ and the source directory once for a whole scan.
    """
    dest = spool.intake_claim_path(sp, task_id, path.name)
    try:
        return spool.move(path, dest, sync="none", sp=sp)
    except FileNotFoundError:
        return None


Signature = tuple[int, int]  # a linked file's size and mtime: an in-place save changes them, not its inode


def link_intake(sp: Spool, path: Path, task_id: str) -> tuple[Path, int | None, Signature | None] | None:
    """On a synced spool, take a dropped file by a hard link in tmp/, its inbox name kept until it is queued.

    tmp/ is never synced: a claim by rename would carry the inbox name's removal to every host at once, and a
    host killed before the task is queued would keep the only copy where no other host can take it over. The
    claim is an exclusive flock on the file, held (the returned descriptor) until the inbox name is removed,
    so this host's other daemons pass it by; a kill drops the lock, and the next taker finds the name again.
    Returns the claim, the lock's descriptor and the file's signature; where no link can be made (a file of
    another user under fs.protected_hardlinks, a full link count), the claim is a rename, as elsewhere.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # gone, or no longer a regular file (ELOOP): the next scan sees what is there now
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = os.fstat(fd)
        if not spool.same_file(held, os.lstat(path)):
            raise FileNotFoundError(path)  # taken and replaced while we waited for nothing: not this file
        dest = spool.intake_claim_path(sp, task_id, path.name)
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()  # our own earlier link of it, left by an error this process survived
        try:
            os.link(path, dest, follow_symlinks=False)
        except (FileNotFoundError, FileExistsError):
            raise FileNotFoundError(path) from None
        except OSError as e:  # this file cannot be linked here: claimed by a rename instead
            log.info("took %s in by a rename, not a link (%s)", path.name, e.strerror or e)
            os.close(fd)
            moved = claim_intake(sp, path, task_id)
            return (moved, None, None) if moved is not None else None
        if not spool.same_file(held, os.lstat(dest)):  # replaced between the check and the link: look again later
            dest.unlink()
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):  # another daemon of this host is taking it, or it went
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    now = os.fstat(fd)
    return dest, fd, (now.st_size, now.st_mtime_ns)


def unclaim_intake(sp: Spool, claimed: Path, original: Path, held: int | None = None) -> None:
    """Undo a claim when the task could not be written (a link's inbox name is still there: the link just
    goes); recovery does it if even this fails."""
    try:
        if held is None:
            spool.move(claimed, original, sp=sp)
        else:
            claimed.unlink()
    except OSError as e:
        log.warning("left %s in tmp/ (%s); recovery returns it to %s", claimed.name, e.strerror or e, original.parent.name)


def release_original(original: Path, held: int, signature: Signature | None) -> None:
    """A linked claim's task is queued (or rejected) and durable: its inbox name goes, if it is still the file
    we took as we took it (an editor may have saved a new one over it, or written it in place: that is a new
    drop, left for the next intake), and the lock with it."""
    try:
        st, now_there = os.fstat(held), os.lstat(original)
        if spool.same_file(st, now_there) and (st.st_size, st.st_mtime_ns) == signature:
            original.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:  # a synced spool's stable id makes a later take of it the same task
        log.warning("left %s in inbox/ (%s); it is queued already", original.name, e.strerror or e)
    finally:
        os.close(held)


def accept_intake(sp: Spool, task: Task, *, staged: Path | None = None) -> Path:
    """Write a taken entry's task into queued/; the caller syncs queued/, then drops the intake copy."""
    path = enqueue(sp, task, sync_dir=False, staged=staged)
    log.info("queued %s (from %s)", task.id, task.source)
    if task.warnings:  # said where the person running the daemon sees it, not only in `spoold show`
        log.warning("%s (%s): %s", task.id, task.source, "; ".join(task.warnings))
    return path


def same_queued(sp: Spool, task: Task) -> bool:
    """Whether queued/ already holds this very task, byte for byte (another host took the same file in)."""
    try:
        return spool.read_bytes(spool.queued_path_for(sp, task.id, task.priority, task.not_before)) == render_task(task)
    except OSError:
        return False


def drop_intake_copy(claimed: Path) -> None:
    try:
        claimed.unlink()  # no fsync: if a power cut brings the copy back, recovery sees the task and drops it
    except OSError as e:  # queued already: recovery drops the copy
        log.warning("left the intake copy %s in tmp/ (%s)", claimed.name, e.strerror or e)


def reject_intake(sp: Spool, claimed: Path, task_id: str, source: str, message: str) -> None:
    """Keep the bad entry in failed/ untouched, with a result that says what to fix."""
    # On a synced spool, the id's time: two hosts rejecting one dropped file write the same bytes
    t = spool.id_time(task_id) if sp.local.peers else now()
    result = Result(id=task_id, status="failed", submitted_at=t, finished_at=t, attempts=0, error=message)
    try:
        spool.write_new(sp, spool.result_path_for(sp.dir("failed"), task_id), render_result(result))
    except FileExistsError:
        if not sp.local.peers:
            raise
        log.info("%s was already rejected on another host", task_id)  # the same file: the same result
    try:
        move_rejected(sp, claimed, task_id)
    except OSError as e:  # the result is written: recovery moves the entry beside it
        log.warning("left the rejected %s in tmp/ (%s)", claimed.name, e.strerror or e)
    log.warning("failed %s (%s): %s", task_id, source, message)


def move_rejected(sp: Spool, claimed: Path, task_id: str) -> None:
    regular = claimed.is_file() and not claimed.is_symlink()
    spool.move(claimed, spool.rejected_path(sp, task_id, regular), sp=sp)


# ---- what a task's records say -------------------------------------------------


@dataclass(frozen=True)
class History:
    """A task's attempts, from its records alone: how many so far (since the last retry), the next
    attempt's number over its whole life, why it last went back to the queue, and (with `log`) each
    record: an attempt requeued or sent back uncounted, and each retry."""

    attempts: int
    next_number: int
    base: int  # attempts before the latest retry
    last_reason: str | None
    log: list[dict[str, Any]]


def history(sp: Spool, task_id: str, *, log: bool = False) -> History:
    records = spool.attempt_records(sp, task_id)
    last, base = spool.last_attempt(records), spool.retry_base(records)
    since = [r for r in records if r.kind != "retried" and r.attempt > base]
    entries = [_record(r) for r in (records if log else since[-1:])]
    reason = entries[-1].get("reason") if since and entries else None
    return History(last - base, last + 1, base, reason, entries if log else [])


def _record(r: spool.AttemptRecord) -> dict[str, Any]:
    """One record as plain data: what its JSON line says (a retried result: only that a retry set it aside)."""
    out: dict[str, Any] = {"attempt": r.attempt, "kind": r.kind, "owner": r.owner}
    if r.kind == "retried":
        return out
    try:
        line = json.loads(spool.read_bytes(r.path, 64 * 1024))
    except (OSError, ValueError):
        return out
    if isinstance(line, dict):
        out.update({k: line.get(k) for k in ("started_at", "ended_at", "reason")})
    return out


# ---- dispatch ------------------------------------------------------------------


@dataclass
class Claimed:
    """A task we run: its file in running/ under our name, and what the name says."""

    path: Path
    task: Task
    attempt: int  # since the last retry: what max_attempts counts (1 on a first run)
    number: int  # over the task's life, as in the running/ name
    started: datetime
    kept: Path | None = None  # on a synced spool, our local link to the claimed file (see _keep)


def claim(sp: Spool, entry: spool.QueuedEntry, default_model: str, started: float | None = None, *,
          sync: bool = True) -> Claimed | None:
    """queued/ → running/ under our owner name: one rename. None if another process won, or the file is bad
    (then it is failed, with the reason). The file is read after the move, so what runs is what was claimed.

    `sync=False` leaves the two directories' fsyncs to `claims_durable`, which the caller calls before the task
    runs: after the ledger's write, whose own fsync then carries the renames on a journaled filesystem (one
    journal commit a claim fewer)."""
    h = history(sp, entry.task_id)
    t = datetime.fromtimestamp(started, UTC) if started is not None else now()
    dest = spool.running_path(sp, entry.task_id, h.next_number, t)
    how = "both" if sync else "none"
    try:
        spool.move(spool.queued_path(sp, entry.name), dest, sync=how, sp=sp)
    except (FileNotFoundError, FileExistsError):
        return None  # another process took it
    now_h = history(sp, entry.task_id)  # read again now that it is ours: records cannot change under us any more
    if now_h.next_number != h.next_number:  # a requeue's record landed between our look and our rename
        h, stale = now_h, dest
        dest = spool.running_path(sp, entry.task_id, h.next_number, t)
        spool.move(stale, dest, sync=how, sp=sp)
    claimed = _read_claimed(sp, dest, entry.task_id, default_model, h.next_number - h.base, h.next_number, t)
    if claimed is not None:
        log.info("running %s (attempt %d, model %s)", claimed.task.id, claimed.attempt, claimed.task.model)
    return claimed


def claims_durable(sp: Spool, claims: list[Claimed]) -> None:
    """Make claims made with `sync=False` durable: running/ and queued/ once for all of them. Before any of them
    runs: a claim a power cut undoes while its task ran would run it twice."""
    if claims:
        spool.fsync_dir(sp.dir("running"), sp)
        spool.fsync_dir(sp.dir("queued"), sp)


def _read_claimed(sp: Spool, path: Path, task_id: str, default_model: str, attempt: int, number: int,
                  started: datetime) -> Claimed | None:
    """Read a task we now own in running/; one that cannot be read is failed with the reason."""
    try:
        task = read_task(path, task_id, default_model)
    except (BadInput, OSError) as e:
        msg = f"the queued task file cannot be read: {e}"
        result = Result(id=task_id, status="failed", finished_at=now(), attempts=attempt - 1, error=msg)
        _write_result(sp, sp.dir("failed"), result)
        spool.move(path, spool.task_path_for(sp.dir("failed"), task_id), sp=sp)
        log.warning("failed %s: %s", task_id, msg)
        return None
    return Claimed(path, task, attempt, number, started, _keep(sp, path) if sp.local.peers else None)


def _keep(sp: Spool, path: Path) -> Path | None:
    """On a synced spool, hold a local hard link to a claimed file: another host taking the task over
    deletes our running/ copy through the sync tool, and our answer must still land beside the task."""
    kept = spool.kept_claim_path(sp, path.name)
    kept.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.link(path, kept)
    except FileExistsError:
        pass
    except OSError as e:  # (a filesystem without hard links): run it all the same, as before synced spools
        log.warning("could not keep a local link to %s (%s)", path.name, e.strerror or e)
        return None
    return kept


def _source(sp: Spool, claimed: Claimed) -> Path | None:
    """Where our claimed file is: running/, else (taken over by another host meanwhile) our kept link, else
    nowhere (None). Alone on a spool, running/ without a look: nobody else moves our claims."""
    if claimed.kept is None and not sp.local.peers:
        return claimed.path
    if claimed.path.exists():
        return claimed.path
    return claimed.kept if claimed.kept is not None and claimed.kept.exists() else None


def _move_claimed(sp: Spool, claimed: Claimed, dest: Path, sync: str = "both") -> None:
    """Our claimed file to its next state; the same bytes already there (a power cut's copy, or another
    host's) or our copy gone (taken over) leave just the one. A sync tool may delete running/ under us."""
    source = _source(sp, claimed)
    if source is None:
        return
    try:
        spool.move(source, dest, sync=sync, sp=sp)
    except FileExistsError:
        source.unlink(missing_ok=True)
    except FileNotFoundError:
        if claimed.kept is None or source == claimed.kept or not claimed.kept.exists():
            if not sp.local.peers:
                raise
            return
        with contextlib.suppress(FileExistsError):
            spool.move(claimed.kept, dest, sync=sync, sp=sp)
    if source != claimed.path:
        claimed.path.unlink(missing_ok=True)


def _let_go(claimed: Claimed) -> None:
    _drop_partial(claimed.path)
    if claimed.kept is not None:
        claimed.kept.unlink(missing_ok=True)


def unclaim(sp: Spool, claimed: Claimed) -> None:
    """Undo a claim whose start could not be counted (the disk is full): one rename back, no record, so the
    attempt does not count and its number is used again."""
    task = claimed.task
    spool.move(claimed.path, spool.queued_path_for(sp, task.id, task.priority, None), sp=sp)


def to_its_result(sp: Spool, path: Path, task_id: str) -> str | None:
    """A running/ file whose task already has a result (killed between writing it and the move, or stopped
    while its move kept failing): move it beside the result, or drop it if the finished copy is there too.
    None when the task has no result."""
    result_path = spool.find_result(sp, task_id)
    if result_path is None:
        return None
    try:
        spool.move(path, spool.task_path_for(result_path.parent, task_id), sp=sp)
    except FileExistsError:  # it had finished; a power cut brought back its running/ copy
        path.unlink(missing_ok=True)
        spool.fsync_dir(path.parent, sp)
        return f"dropped a stale running/ copy of {task_id} (it had already finished)"
    except FileNotFoundError:
        return ""
    _drop_partial(path)
    return f"finished {task_id} (its result was already written)"


def take_over(sp: Spool, entry: spool.RunningEntry, default_model: str = "sonnet") -> Claimed | None:
    """Make a dead owner's running/ task ours (one rename, same attempt and start), so that only its owner
    moves it on. None if another process took it over first, or it could not be read (then failed)."""
    h = history(sp, entry.task_id)
    mine = spool.running_path(sp, entry.task_id, entry.attempt, entry.started)
    path = spool.running_file(sp, entry.name)
    if path != mine:
        try:
            spool.move(path, mine, sp=sp)
        except (FileNotFoundError, FileExistsError):
            return None
    return _read_claimed(sp, mine, entry.task_id, default_model, entry.attempt - h.base, entry.attempt, entry.started)


def result_for(claimed: Claimed, status: str, error: str | None = None, answer: str = "",
               **measured: Any) -> Result:
    """A result with what the claim knows (the task's own fields, its attempt and start) and what the run
    measured (tokens, cost, model_resolved, ...): the one place a finished attempt becomes a Result."""
    task = claimed.task
    return Result(id=task.id, status=status, answer=answer, model=task.model, submitted_at=task.submitted_at,
                  started_at=claimed.started, finished_at=now(), attempts=claimed.attempt, error=error,
                  continues=task.resume, **measured)


def finish(sp: Spool, claimed: Claimed, result: Result) -> Path:
    """running/ → done/DATE/ or failed/, the result file first so a finished answer is never lost.

    Three fsyncs: the result, the result's name (before the task can land beside it), and the task's
    name. running/ is not synced: a copy a power cut brings back there is dropped by recovery.
    """
    finished = result.finished_at or now()
    dest_dir = spool.date_dir(sp, "done", finished) if result.status == "done" else sp.dir("failed")
    dest_dir, host_named = _where_our_result_goes(sp, claimed, dest_dir)
    _write_result(sp, dest_dir, result, host_named=host_named)
    spool.fault("finish:result-written")
    dest = spool.task_path_for(dest_dir, claimed.task.id)
    _move_claimed(sp, claimed, dest, sync="dest")
    _let_go(claimed)
    spool.cancel_marker(sp, claimed.task.id).unlink(missing_ok=True)  # a cancel that came too late
    log.info("%s %s%s", result.status, claimed.task.id, f": {result.error}" if result.error else "")
    return dest


def drop_answered(sp: Spool, claimed: Claimed) -> bool:
    """On a synced spool, a claimed task another host already finished (its queued copy came back from a
    partition): drop our copy, the same bytes as the finished one, instead of running it again."""
    found = spool.find_finished(sp, claimed.task.id)
    if found is None:
        return False
    claimed.path.unlink(missing_ok=True)
    _let_go(claimed)
    log.info("not running %s: it was already %s on another host", claimed.task.id, found.state)
    return True


def _where_our_result_goes(sp: Spool, claimed: Claimed, dest_dir: Path) -> tuple[Path, bool]:
    """The one rule for naming an attempt's result: the directory, and whether under our host's name.

    On a synced spool another host may have answered the task, or may be answering it now: an
    answer that comes second goes beside the first, named for our host, and so does one written
    while we are out of touch or after the task was taken over from us; never a conflict copy."""
    if not sp.local.peers:
        return dest_dir, False
    elsewhere = spool.find_finished(sp, claimed.task.id)
    if elsewhere is not None:
        log.warning("%s was already %s (another host ran it too); our result is kept beside it as a duplicate",
                    claimed.task.id, elsewhere.state)
        return elsewhere.path.parent, True
    return dest_dir, not claimed.path.exists() or time.time() > sp.local.in_touch_until


def _drop_partial(running: Path) -> None:
    """The answer so far is the owner's scratch: once the task has left running/, its result says it all."""
    spool.partial_path(running).unlink(missing_ok=True)


def _write_result(sp: Spool, dest_dir: Path, result: Result, *, host_named: bool = False) -> None:
    path = (spool.host_result_path(dest_dir, result.id, spool.owner_host(spool.owner_tag())) if host_named
            else spool.result_path_for(dest_dir, result.id))
    try:
        spool.write_new(sp, path, render_result(result))
    except FileExistsError:
        log.warning("kept the existing result %s (not overwritten)", path)


def requeue(sp: Spool, claimed: Claimed, reason: str, *, count_attempt: bool = True,
            not_before: datetime | None = None) -> Path:
    """running/ → queued/: the task waits again (a transient error; or, not counted, a hold, a wait, a stop).

    A record comes first (its one writer us), so the count and the reason survive the rename:
    `N.requeued@OWNER.json` for a counted attempt, `N.waited.STAMP@OWNER.json` for one that is not
    (the next claim uses its number again).
    """
    task, ended = claimed.task, now()
    if spool.cancel_marker(sp, task.id).exists():  # asked to stop while it was ending: it ends cancelled
        return cancel_running(sp, claimed, "cancelled by request")
    if _source(sp, claimed) != claimed.path:  # another host took it over: it is queued or running there
        _let_go(claimed)
        log.info("not requeued %s: another host took it over", task.id)
        return claimed.path
    record = {"attempt": claimed.number, "owner": spool.owner_tag(), "started_at": iso_ms(claimed.started),
              "ended_at": iso_ms(ended), "counted": count_attempt, "reason": reason}
    done = any(r.attempt == claimed.number and r.kind == "requeued" for r in spool.attempt_records(sp, task.id))
    if not done:  # a requeue a crash stopped halfway already wrote it
        path = (spool.requeued_record_path(sp, task.id, claimed.number) if count_attempt
                else spool.waited_record_path(sp, task.id, claimed.number, ended))
        with contextlib.suppress(FileExistsError):
            spool.write_new(sp, path, (json.dumps(record) + "\n").encode())
    dest = spool.queued_path_for(sp, task.id, task.priority, not_before)
    try:
        spool.move(claimed.path, dest, sp=sp)
    except FileExistsError:  # a queued copy a power cut left behind: the same bytes; it is the one that waits
        claimed.path.unlink(missing_ok=True)
    _let_go(claimed)
    log.info("requeued %s: %s", task.id, reason)
    return dest


def cancel_running(sp: Spool, claimed: Claimed, reason: str) -> Path:
    """Owner side of a cancel: running/ → cancelled/; the answer so far, if any was written, is its result's."""
    try:
        answer = spool.read_bytes(spool.partial_path(claimed.path)).decode("utf-8", "replace")
    except OSError:
        answer = ""
    dest_dir, host_named = _where_our_result_goes(sp, claimed, sp.dir("cancelled"))
    _write_result(sp, dest_dir, result_for(claimed, "cancelled", reason, answer), host_named=host_named)
    dest = spool.task_path_for(dest_dir, claimed.task.id)
    _move_claimed(sp, claimed, dest)
    _let_go(claimed)
    spool.cancel_marker(sp, claimed.task.id).unlink(missing_ok=True)
    log.info("cancelled %s", claimed.task.id)
    return dest


def cancel(sp: Spool, task_id: str) -> str:
    """Cancel a queued task at once, or ask a running task's owner to stop it (a `running/ID.cancel` marker).
    Returns the new state: cancelled, or cancelling."""
    for _ in range(5):  # a task can move between looking and acting: look again
        loc = spool.locate(sp, task_id)
        if loc.state == "queued":
            dest = spool.task_path_for(sp.dir("cancelled"), task_id)
            try:
                spool.move(loc.path, dest, sp=sp)
            except FileNotFoundError:
                continue  # claimed meanwhile: cancel it as running
            h = history(sp, task_id)
            result = Result(id=task_id, status="cancelled", finished_at=now(), attempts=h.attempts,
                            error="cancelled before it ran" if not h.attempts else "cancelled while queued")
            _write_result(sp, sp.dir("cancelled"), result)
            log.info("cancelled %s", task_id)
            return "cancelled"
        if loc.state == "running":  # its owner stops it (recovery does, for an owner that died)
            marker = spool.cancel_marker(sp, task_id)
            if not marker.exists():
                try:
                    spool.write_new(sp, marker, f"cancel requested {iso_ms(now())}\n".encode())
                except FileExistsError:
                    pass  # someone else asked first
            return "cancelling"
        raise InvalidState(f"task {task_id} is already {loc.state}; nothing to cancel")
    raise InvalidState(f"task {task_id} kept moving while it was being cancelled; try again")


class NotATask(InvalidState):
    """A failed/ entry that was moved aside as bad input: `retry` takes its (fixed) file in again instead."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def retry(sp: Spool, task_id: str, default_model: str = "sonnet") -> Path:
    """failed/ or cancelled/ → queued/ with a fresh attempt count: two renames, no write. The old result
    is set aside in the task's records (`N.retried.STAMP@OWNER.md`), which is what resets the count."""
    loc = spool.locate(sp, task_id)
    if loc.state not in ("failed", "cancelled"):
        raise InvalidState(f"task {task_id} is {loc.state}; only failed or cancelled tasks can be retried")
    if loc.path.name.endswith(spool.REJECTED_SUFFIX):
        raise InvalidState(f"task {task_id} was dropped as a directory or link, which spoold never reads; drop it "
                           f"again as a file (it is kept as {loc.path})")
    try:
        task = read_task(loc.path, task_id, default_model)
    except (BadInput, OSError) as e:
        raise NotATask(f"task {task_id} cannot be retried as it is ({e}); fix {loc.path} and retry again", loc.path) from None
    if not _written_by_spoold(loc.path, task_id):  # bad input the user fixed where it lies: taken in anew
        raise NotATask(f"{loc.path} is the file as it was dropped", loc.path)
    _set_aside(sp, loc)
    dest = spool.move(loc.path, spool.queued_path_for(sp, task_id, task.priority, task.not_before), sp=sp)
    log.info("retry %s", task_id)
    return dest


def _written_by_spoold(path: Path, task_id: str) -> bool:
    """A task file intake wrote says its own id first; a dropped file moved aside as bad input does not."""
    try:
        meta, _ = parse_text(spool.read_bytes(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, BadInput):
        return False
    return str(meta.get("id")) == task_id


def retake(sp: Spool, task: Task, original: Path) -> Path:
    """Retry of input that was moved aside as bad, once fixed: its file is taken in again under the same id
    (written into queued/ as intake writes any task), its old result set aside, the original removed."""
    dest = enqueue(sp, task)
    _set_aside(sp, spool.locate_in(sp, "failed", task.id))
    original.unlink(missing_ok=True)
    spool.fsync_dir(original.parent, sp)
    log.info("retry %s (its fixed file taken in again)", task.id)
    return dest


def _set_aside(sp: Spool, loc: spool.Located) -> None:
    """Move a finished task's result into its records (or, without one, write that a retry happened): what
    resets its attempt count. A late cancel marker goes too."""
    h = history(sp, loc.task_id)
    results = spool.results_of(loc.path.parent, loc.task_id, lambda: spool.known_hosts(sp))  # the answer first
    try:
        ran = parse_result(spool.read_bytes(results[0]).decode("utf-8")).attempts or 0 if results else 0
    except (OSError, UnicodeDecodeError, BadInput):
        ran = 0  # no result (a cancel a crash cut short): the records still say how many ran
    number, t = max(h.next_number - 1, h.base + ran), now()
    for i, result in enumerate(results):  # a synced spool's duplicates go along, each a record of its own
        spool.move(result, spool.retried_result_path(sp, loc.task_id, number, t + timedelta(milliseconds=i)), sp=sp)
    if not results:  # still set the count back: the retry's record is what does it
        spool.write_new(sp, spool.retried_result_path(sp, loc.task_id, number, t),
                        b"(no result was written before this retry)\n")
    spool.cancel_marker(sp, loc.task_id).unlink(missing_ok=True)
