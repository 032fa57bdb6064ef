"""Recovery after a dead owner: requeue, finish what was answered, fail after max_attempts, return interrupted intake."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from conftest import dead_pid

from spoold import recovery, spool, transitions
from spoold.task import Result, Task, render_result


def _enqueue(sp: spool.Spool, prompt: str = "q\n") -> Task:
    t = Task(id=spool.new_id(prompt), prompt=prompt)
    transitions.enqueue(sp, t)
    return t


def _orphan(sp: spool.Spool, host: str | None = None, task: Task | None = None) -> spool.Path:
    """Claim the next task (or this one), then make its running file look like a claim by a process that died."""
    entry = next(e for e in spool.list_queued(sp) if task is None or e.task_id == task.id)
    c = transitions.claim(sp, entry, "sonnet")
    assert c is not None
    dead = spool.running_path(sp, c.task.id, c.number, c.started, f"{host or spool.host_id()}-{dead_pid()}")
    os.rename(c.path, dead)
    return dead


def test_recovery_requeues_a_dead_owners_task_and_counts_the_attempt(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    _orphan(sp)
    assert recovery.recover(sp, max_attempts=3) == [f"requeued {t.id}"]
    assert spool.locate(sp, t.id).state == "queued"
    h = transitions.history(sp, t.id)
    assert h.attempts == 1 and "interrupted on" in (h.last_reason or "")


def test_recovery_knows_this_hosts_claims_from_before_host_ids(sp: spool.Spool) -> None:
    """Format 1 named a host by its bare host name: such a claim by a dead process here is still ours to recover."""
    t = _enqueue(sp)
    _orphan(sp, host=spool.legacy_host())
    assert recovery.recover(sp, max_attempts=3) == [f"requeued {t.id}"]
    other = _enqueue(sp)
    _orphan(sp, host="another-laptop-k3x9qa", task=other)  # another host's: alive as far as we can know
    assert recovery.recover(sp, max_attempts=3) == [] and spool.locate(sp, other.id).state == "running"


def test_recovery_fails_after_max_attempts(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    for _ in range(2):
        _orphan(sp)
        recovery.recover(sp, max_attempts=2)
    loc = spool.locate(sp, t.id)
    assert loc.state == "failed" and "interrupted 2 times" in loc.result_path.read_text()


def test_recovery_keeps_a_finished_answer(sp: spool.Spool) -> None:
    """Killed between writing the result and moving the task: the answer is kept, not rerun."""
    t = _enqueue(sp)
    dead = _orphan(sp)
    d = spool.date_dir(sp, "done", datetime.now(UTC))
    spool.write_new(sp, d / f"{t.id}.result.md", render_result(Result(id=t.id, status="done", answer="kept")))
    assert recovery.recover(sp, max_attempts=3)[0].startswith("finished")
    assert not dead.exists() and spool.locate(sp, t.id).state == "done"


def test_recovery_keeps_a_cancel_that_was_half_done(sp: spool.Spool) -> None:
    """Killed between writing the cancelled result and moving the task: it ends cancelled, not rerun."""
    t = _enqueue(sp)
    _orphan(sp)
    spool.write_new(sp, spool.result_path_for(sp.dir("cancelled"), t.id),
                    render_result(Result(id=t.id, status="cancelled")))
    recovery.recover(sp, max_attempts=3)
    assert spool.locate(sp, t.id).state == "cancelled"


def test_recovery_drops_a_running_copy_a_power_cut_brought_back(sp: spool.Spool) -> None:
    """finish() does not fsync running/: after a power cut the finished task may show there again."""
    t = _enqueue(sp)
    c = transitions.claim(sp, spool.list_queued(sp)[0], "sonnet")
    assert c is not None
    ghost = c.path.read_bytes()
    transitions.finish(sp, c, transitions.result_for(c, "done", answer="the answer"))
    dead = spool.running_path(sp, t.id, c.number, c.started, f"{spool.host_id()}-{dead_pid()}")
    dead.write_bytes(ghost)
    assert recovery.recover(sp, max_attempts=3)[0].startswith("dropped a stale running/ copy")
    assert not dead.exists() and spool.locate(sp, t.id).state == "done"
    assert "the answer" in spool.locate(sp, t.id).result_path.read_text()


def test_recovery_returns_an_interrupted_intake_to_the_inbox(sp: spool.Spool) -> None:
    name = f"intake~{spool.host_id()}-{dead_pid()}~{spool.new_id('x')}~my question.md"
    (sp.dir("tmp") / name).write_text("my question\n")
    recovery.recover(sp, max_attempts=3)
    assert (sp.dir("inbox") / "my question.md").read_text() == "my question\n"
    assert os.listdir(sp.dir("tmp")) == []


def test_other_hosts_claims_are_left_alone(sp: spool.Spool) -> None:
    c = transitions.claim(sp, spool.list_queued(sp)[0], "sonnet") if _enqueue(sp) else None
    assert c is not None
    theirs = spool.running_path(sp, c.task.id, c.number, c.started, "otherhost-123")
    os.rename(c.path, theirs)
    assert recovery.recover(sp, max_attempts=3) == []
    assert theirs.exists()


def test_recovery_drops_a_running_copy_when_the_task_is_also_queued(sp: spool.Spool) -> None:
    """A power cut between a claim's two directory fsyncs can leave the task in both queued/ and running/."""
    t = _enqueue(sp)
    dead = _orphan(sp)
    (sp.dir("queued") / spool.queued_name(t.id, "normal", None)).write_bytes(dead.read_bytes())
    assert recovery.recover(sp, max_attempts=3) == [f"dropped a stale running/ copy of {t.id} (it is queued)"]
    assert not dead.exists() and [e.task_id for e in spool.list_queued(sp)] == [t.id]
    assert transitions.history(sp, t.id).attempts == 0


def test_recovery_finishes_an_uncounted_requeue_it_interrupted(sp: spool.Spool) -> None:
    """Killed between a hold's `waited` record and its rename, on the last allowed attempt: not a failure."""
    t = _enqueue(sp)
    c = transitions.claim(sp, spool.list_queued(sp)[0], "sonnet")
    assert c is not None
    dead_owner = f"{spool.host_id()}-{dead_pid()}"
    dead = spool.running_path(sp, t.id, c.number, c.started, dead_owner)
    os.rename(c.path, dead)
    record = spool.attempts_dir(sp, t.id) / f"{c.number}.waited.{spool.stamp_ms(datetime.now(UTC))}@{dead_owner}.json"
    spool.write_new(sp, record, b'{"reason": "usage limit"}\n')
    assert recovery.recover(sp, max_attempts=1) == [f"requeued {t.id} (not counted)"]
    assert spool.locate(sp, t.id).state == "queued" and transitions.history(sp, t.id).attempts == 0
