"""Transitions (claim, finish, requeue, cancel, retry) and recovery after a dead owner."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from spoold import queue, spool
from spoold.errors import InvalidState
from spoold.task import Result, Task, parse_task


def _enqueue(sp: spool.Spool, prompt: str = "q\n", **kw: object) -> Task:
    t = Task(id=spool.new_id(prompt), prompt=prompt, **kw)
    queue.enqueue(sp, t)
    return t


def _claim_next(sp: spool.Spool) -> queue.Claimed:
    claimed = queue.claim(sp, spool.list_queued(sp)[0], "sonnet")
    assert claimed is not None
    return claimed


def test_claim_is_exclusive(sp: spool.Spool) -> None:
    _enqueue(sp)
    [entry] = spool.list_queued(sp)
    first = queue.claim(sp, entry, "sonnet")
    assert first is not None and first.task.attempts == 1 and first.task.started_at
    assert queue.claim(sp, entry, "sonnet") is None
    [running] = spool.list_running(sp)
    assert running.pid == os.getpid()


def test_finish_writes_result_then_moves_task(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    c = _claim_next(sp)
    dest = queue.finish(sp, c, Result(id=t.id, status="done", answer="42"))
    assert dest.parent.parent == sp.dir("done")
    assert (dest.parent / f"{t.id}.result.md").exists()
    assert parse_task(dest.read_text(), task_id=t.id).status == "done"
    assert spool.locate(sp, t.id).state == "done"


def test_requeue_keeps_order_and_counts_attempts(sp: spool.Spool) -> None:
    t = _enqueue(sp, priority="high")
    c = _claim_next(sp)
    queue.requeue(sp, c, "transient")
    [e] = spool.list_queued(sp)
    back = parse_task((sp.dir("queued") / e.name).read_text(), task_id=t.id)
    assert (e.priority, back.attempts, back.error) == (1, 1, "transient")
    c2 = _claim_next(sp)
    queue.requeue(sp, c2, "usage limit", count_attempt=False)
    assert parse_task((sp.dir("queued") / spool.list_queued(sp)[0].name).read_text(), task_id=t.id).attempts == 1


def test_cancel_queued_and_retry(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    assert queue.cancel(sp, t.id) == "cancelled"
    assert spool.locate(sp, t.id).state == "cancelled"
    with pytest.raises(InvalidState):
        queue.cancel(sp, t.id)
    queue.retry(sp, t.id)
    assert spool.locate(sp, t.id).state == "queued"


def test_cancel_running_asks_the_live_owner(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    lock = queue.hold_owner_lock(sp)
    try:
        _claim_next(sp)
        assert queue.cancel(sp, t.id) == "cancelling"
        assert spool.cancel_marker(sp, t.id).exists()
    finally:
        lock.release()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _orphan(sp: spool.Spool, t: Task, host: str | None = None) -> spool.Path:
    """Make the running file look like a claim by a process that died."""
    c = _claim_next(sp)
    dead = spool.running_path(sp, t.id, f"{host or spool.host_id()}-{_dead_pid()}")
    os.rename(c.path, dead)
    return dead


def test_recovery_requeues_a_dead_owners_task(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    _orphan(sp, t)
    actions = queue.recover(sp, max_attempts=3)
    assert actions == [f"requeued {t.id}"]
    assert spool.locate(sp, t.id).state == "queued"


def test_recovery_knows_this_hosts_claims_from_before_host_ids(sp: spool.Spool) -> None:
    """Format 1 named a host by its bare host name: such a claim by a dead process here is still ours to recover."""
    t = _enqueue(sp)
    _orphan(sp, t, host=spool.legacy_host())
    assert queue.recover(sp, max_attempts=3) == [f"requeued {t.id}"]
    other = _enqueue(sp)
    _orphan(sp, other, host="another-laptop-k3x9qa")  # another host's: alive as far as we can know
    assert queue.recover(sp, max_attempts=3) == [] and spool.locate(sp, other.id).state == "running"


def test_recovery_fails_after_max_attempts(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    for _ in range(2):
        _orphan(sp, t)
        queue.recover(sp, max_attempts=2)
    loc = spool.locate(sp, t.id)
    assert loc.state == "failed" and "interrupted 2 times" in loc.result_path.read_text()


def test_recovery_keeps_a_finished_answer(sp: spool.Spool) -> None:
    """Killed between writing the result and moving the task: the answer is kept, not rerun."""
    t = _enqueue(sp)
    dead = _orphan(sp, t)
    from datetime import UTC, datetime

    from spoold.task import render_result

    d = spool.date_dir(sp, "done", datetime.now(UTC))
    spool.write_new(sp, d / f"{t.id}.result.md", render_result(Result(id=t.id, status="done", answer="kept")))
    assert queue.recover(sp, max_attempts=3)[0].startswith("finished")
    assert not dead.exists() and spool.locate(sp, t.id).state == "done"


def test_recovery_drops_a_running_copy_a_power_cut_brought_back(sp: spool.Spool) -> None:
    """finish() does not fsync running/: after a power cut the finished task may show there again."""
    t = _enqueue(sp)
    c = _claim_next(sp)
    ghost = c.path.read_bytes()
    queue.finish(sp, c, Result(id=t.id, status="done", answer="the answer"))
    dead = spool.running_path(sp, t.id, f"{spool.owner_tag().rpartition('-')[0]}-{_dead_pid()}")
    dead.write_bytes(ghost)
    assert queue.recover(sp, max_attempts=3)[0].startswith("dropped a stale running/ copy")
    assert not dead.exists() and spool.locate(sp, t.id).state == "done"
    assert "the answer" in spool.locate(sp, t.id).result_path.read_text()


def test_recovery_returns_an_interrupted_intake_to_the_inbox(sp: spool.Spool) -> None:
    name = f"intake~{spool.owner_tag().rpartition('-')[0]}-{_dead_pid()}~{spool.new_id('x')}~my question.md"
    (sp.dir("tmp") / name).write_text("my question\n")
    queue.recover(sp, max_attempts=3)
    assert (sp.dir("inbox") / "my question.md").read_text() == "my question\n"
    assert os.listdir(sp.dir("tmp")) == []


def test_other_hosts_claims_are_left_alone(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    c = _claim_next(sp)
    theirs = spool.running_path(sp, t.id, "otherhost-123")
    os.rename(c.path, theirs)
    assert queue.recover(sp, max_attempts=3) == []
    assert theirs.exists()


def test_claim_of_a_file_replaced_while_it_was_read_runs_the_newer_text(sp: spool.Spool, monkeypatch) -> None:
    """An editor saving over a queued file (a new inode) just before the claim: the claim reads it again."""
    _enqueue(sp, "old question\n")
    [entry] = spool.list_queued(sp)
    src = sp.dir("queued") / entry.name
    real_stage = spool.stage

    def stage_then_edit(sp_: spool.Spool, data: bytes):
        staged = real_stage(sp_, data)
        newer = src.with_name(".edit")
        newer.write_text(src.read_text().replace("old question", "new question"))
        os.replace(newer, src)
        return staged

    monkeypatch.setattr(spool, "stage", stage_then_edit)
    claimed = queue.claim(sp, entry, "sonnet", started=1_800_000_000.0)
    assert claimed is not None and claimed.task.prompt == "new question\n" and claimed.task.attempts == 1
    on_disk = parse_task(claimed.path.read_text(), task_id=entry.task_id)
    assert on_disk.prompt == "new question\n" and on_disk.status == "running"
    assert not os.listdir(sp.dir("tmp")) and not spool.list_queued(sp)


def test_move_with_swaps_content_in_and_cleans_its_staged_file(sp: spool.Spool) -> None:
    src = sp.dir("queued") / "a.md"
    src.write_text("before\n")
    staged = spool.stage(sp, b"after\n")
    dest = sp.dir("running") / "a.md"
    assert spool.move_with(src, dest, staged, inode=src.stat().st_ino)
    assert dest.read_text() == "after\n" and not src.exists() and not staged.exists()
    staged = spool.stage(sp, b"late\n")
    with pytest.raises(FileNotFoundError):
        spool.move_with(src, dest, staged, inode=0)
    assert not staged.exists() and dest.read_text() == "after\n"
