"""Recovery: put everything a dead process left in flight back in a true state.

Run by a daemon at start and every scan interval. Each step is a transition of its own
(spoold.transitions), so recovery interrupted at any point is finished by the next one.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from spoold import owners, spool, transitions
from spoold.errors import TaskNotFound
from spoold.spool import Spool

log = logging.getLogger("spoold")


def recover(sp: Spool, *, max_attempts: int, running_here: set[str] | None = None,
            silent: Callable[[str], bool] | None = None) -> list[str]:
    """Recover dead owners' claims, staged writes and intake claims, and stray markers. Returns what was done.

    `running_here` (the ids this process is running) also recovers our own claims a
    failed write left behind, as if their owner had died. `silent` (a synced spool) says which
    other hosts have been silent for the running lease: their running tasks are run again here.
    """
    actions: list[str] = []
    mine = spool.owner_tag()
    markers = [n for n in spool.running_names(sp) if spool.parse_cancel_marker(n) is not None]  # before the tasks
    for entry in spool.list_running(sp):
        stray = running_here is not None and entry.owner == mine and entry.task_id not in running_here
        gone = silent is not None and entry.host != spool.owner_host(mine) and silent(entry.host)
        if stray or gone or not owners.owner_alive(sp, entry.owner):
            try:
                actions.append(recover_running(sp, entry, max_attempts=max_attempts, silent=gone))
            except (FileNotFoundError, FileExistsError) as e:  # a race with another recoverer: next scan
                log.warning("recovery of %s left for the next scan (%s)", entry.task_id, e.strerror or e)
    for name in spool.tmp_names(sp):
        actions.extend(_recover_tmp(sp, name, ours_stray=running_here is not None))
    running = {e.task_id for e in spool.list_running(sp)}
    for name in spool.running_names(sp):
        path = spool.running_file(sp, name)
        if name.endswith(spool.PARTIAL_SUFFIX) and not path.with_suffix(".md").exists():
            path.unlink(missing_ok=True)  # its task left running/ (a crash between the two)
    for name in markers:
        if spool.parse_cancel_marker(name) not in running:
            spool.running_file(sp, name).unlink(missing_ok=True)  # its task had already ended
    _drop_kept(sp, mine, running_here)
    return [a for a in actions if a]


def _drop_kept(sp: Spool, mine: str, running_here: set[str] | None) -> None:
    """Local links to claims (a synced spool's) whose owner died, or that we no longer run."""
    d = spool.kept_dir(sp)
    for name in os.listdir(d) if d.is_dir() else []:
        entry = spool.parse_running_name(name)
        if entry is None:
            continue
        ours_done = entry.owner == mine and running_here is not None and entry.task_id not in running_here
        if ours_done or (entry.owner != mine and not owners.owner_alive(sp, entry.owner)):
            (d / name).unlink(missing_ok=True)


def recover_running(sp: Spool, entry: spool.RunningEntry, *, max_attempts: int, silent: bool = False) -> str:
    """A dead owner's task: finish it if its result exists, else requeue it (or fail it after max_attempts);
    cancel it if someone asked. A copy a power cut left in running/ beside a queued one is dropped, and so is
    one another host already took over (its record of this attempt came first)."""
    path = spool.running_file(sp, entry.name)
    if any(r.attempt == entry.attempt and r.kind == "requeued" and spool.owner_host(r.owner) != entry.host
           for r in spool.attempt_records(sp, entry.task_id)):
        path.unlink(missing_ok=True)
        return f"dropped {entry.task_id}: another host took it over while {entry.host} was silent"
    answered = transitions.to_its_result(sp, path, entry.task_id)
    if answered is not None:
        return answered
    if spool.find_queued(sp, entry.task_id) is not None:  # the claim's rename undone by a power cut, half
        path.unlink(missing_ok=True)
        spool.fsync_dir(path.parent, sp)
        return f"dropped a stale running/ copy of {entry.task_id} (it is queued)"
    claimed = transitions.take_over(sp, entry)
    if claimed is None:
        return f"failed {entry.task_id}: its task file could not be read" if _failed(sp, entry.task_id) else ""
    if spool.cancel_marker(sp, entry.task_id).exists():
        transitions.cancel_running(sp, claimed, "cancelled")
        return f"cancelled {entry.task_id}"
    if _was_sent_back(sp, entry):  # killed between an uncounted requeue's record and its rename: finish it
        transitions.requeue(sp, claimed, "sent back before the daemon died", count_attempt=False)
        return f"requeued {entry.task_id} (not counted)"
    if claimed.attempt >= max_attempts:
        msg = f"interrupted {claimed.attempt} times (the daemon died while it ran); run `spoold retry {entry.task_id}`"
        transitions.finish(sp, claimed, transitions.result_for(claimed, "failed", msg))
        return f"failed {entry.task_id}: {msg}"
    why = (f"{entry.host} went silent while it ran (no heartbeat for the running lease); requeued" if silent
           else f"interrupted on {entry.host} (pid {entry.pid}); requeued")
    transitions.requeue(sp, claimed, why)
    return f"requeued {entry.task_id}"


def _was_sent_back(sp: Spool, entry: spool.RunningEntry) -> bool:
    """Its owner had written a `waited` record for this very attempt: the attempt was not to count."""
    return any(r.kind == "waited" and r.attempt == entry.attempt and r.owner == entry.owner
               and r.path.name.split(".")[2] >= spool.stamp_ms(entry.started)
               for r in spool.attempt_records(sp, entry.task_id))


def _failed(sp: Spool, task_id: str) -> bool:
    return spool.result_path_for(sp.dir("failed"), task_id).exists()


def _recover_tmp(sp: Spool, name: str, *, ours_stray: bool = False) -> list[str]:
    """A dead process's staged write or intake claim; with ours_stray, also our own (intake never spans a turn)."""
    path = spool.tmp_path(sp, name)
    pruner = spool.parse_prune_name(name)
    if pruner is not None:  # a prune's intent is deletion: finish it once its process is gone
        gone = not owners.owner_alive(sp, pruner) or (ours_stray and pruner == spool.owner_tag())
        if gone and spool.remove_pruned(path):
            return [f"finished pruning {name.partition('~')[2].partition('~')[2]}"]
        return []  # (what cannot be removed, as another user's files, stays; `spoold prune` said so)
    claim_parts = spool.parse_intake_claim(name)
    if claim_parts is None:
        # A staged write that never became visible: nothing was promised. Writers such as
        # `spoold submit` hold no owner lock, so their liveness is their pid.
        staged_by = spool.staging_owner(name)
        pid = spool.owner_pid(staged_by) if staged_by else None
        if staged_by and not owners.owner_alive(sp, staged_by) and not (pid is not None and spool.pid_alive(pid)):
            path.unlink(missing_ok=True)
        return []
    owner, task_id, source = claim_parts
    if owners.owner_alive(sp, owner) and not (ours_stray and owner == spool.owner_tag()):
        return []
    if _still_in_inbox(sp, path):  # a synced spool's claim: a link, the dropped file is still in inbox/
        path.unlink(missing_ok=True)
        return [f"dropped the intake link of {source} (it is still in inbox, to be taken in again)"]
    try:
        spool.locate(sp, task_id)
        if not path.is_dir() or path.is_symlink():
            path.unlink(missing_ok=True)
        return [f"dropped the intake copy of {task_id} (already queued)"]
    except TaskNotFound:
        pass
    if _failed(sp, task_id):
        transitions.move_rejected(sp, path, task_id)
        return [f"moved {source} to failed (its result was already written)"]
    spool.move(path, spool.returned_path(sp, source, task_id), sp=sp)
    return [f"returned {source} to inbox (intake was interrupted)"]


def _still_in_inbox(sp: Spool, path: Path) -> bool:
    """Whether an intake claim is a link to a file whose inbox name is still there (looked for by inode: a long
    name is cut in the claim's)."""
    try:
        st = os.lstat(path)
        return stat.S_ISREG(st.st_mode) and st.st_nlink >= 2 and spool.links_in(sp.dir("inbox"), st) > 0
    except OSError:
        return False

