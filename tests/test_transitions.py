"""Transitions (claim, finish, requeue, cancel, retry): each one rename, and no task file written after intake."""

from __future__ import annotations

import json
import os

import pytest

from spoold import api, owners, spool, transitions
from spoold.errors import InvalidState
from spoold.task import Task, parse_result


def _enqueue(sp: spool.Spool, prompt: str = "q\n", **kw: object) -> Task:
    t = Task(id=spool.new_id(prompt), prompt=prompt, **kw)
    transitions.enqueue(sp, t)
    return t


def _claim_next(sp: spool.Spool) -> transitions.Claimed:
    claimed = transitions.claim(sp, spool.list_queued(sp)[0], "sonnet")
    assert claimed is not None
    return claimed


def test_claim_is_exclusive_and_its_name_says_attempt_start_and_owner(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    [entry] = spool.list_queued(sp)
    intake_bytes = (sp.dir("queued") / entry.name).read_bytes()
    first = transitions.claim(sp, entry, "sonnet", started=1_800_000_000.25)
    assert first is not None and (first.attempt, first.number) == (1, 1)
    assert transitions.claim(sp, entry, "sonnet") is None
    [running] = spool.list_running(sp)
    assert (running.task_id, running.attempt, running.pid) == (t.id, 1, os.getpid())
    assert running.started.timestamp() == 1_800_000_000.25 and running.owner == spool.owner_tag()
    assert first.path.read_bytes() == intake_bytes  # a claim is a rename: the file is as intake wrote it


def test_a_claim_without_sync_leaves_both_directories_to_claims_durable(sp: spool.Spool, monkeypatch) -> None:
    """The daemon fsyncs its claims' directories after its ledger write (one journal commit carries both)."""
    _enqueue(sp)
    _enqueue(sp, "another\n")
    synced: list[str] = []
    monkeypatch.setattr(spool, "fsync_dir", lambda path, sp=None: synced.append(path.name))
    claims = [transitions.claim(sp, e, "sonnet", sync=False) for e in spool.list_queued(sp)]
    assert all(claims) and synced == []
    transitions.claims_durable(sp, claims)  # type: ignore[arg-type]
    assert synced == ["running", "queued"]  # once for the whole batch, before any of them runs
    transitions.claims_durable(sp, [])
    assert synced == ["running", "queued"]


def test_finish_writes_result_then_moves_the_untouched_task(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    before = (sp.dir("queued") / spool.list_queued(sp)[0].name).read_bytes()
    c = _claim_next(sp)
    dest = transitions.finish(sp, c, transitions.result_for(c, "done", answer="42"))
    assert dest.parent.parent == sp.dir("done") and dest.read_bytes() == before
    res = parse_result((dest.parent / f"{t.id}.result.md").read_text())
    assert (res.status, res.attempts, res.started_at) == ("done", 1, c.started.replace(microsecond=c.started.microsecond // 1000 * 1000))
    assert spool.locate(sp, t.id).state == "done"


def test_requeue_keeps_order_and_counts_attempts_in_records(sp: spool.Spool) -> None:
    t = _enqueue(sp, priority="high")
    c = _claim_next(sp)
    transitions.requeue(sp, c, "transient")
    [e] = spool.list_queued(sp)
    assert e.priority == 1
    [record] = spool.attempt_records(sp, t.id)
    assert (record.attempt, record.kind, record.owner) == (1, "requeued", spool.owner_tag())
    assert json.loads(record.path.read_text())["reason"] == "transient"
    h = transitions.history(sp, t.id)
    assert (h.attempts, h.next_number, h.last_reason) == (1, 2, "transient")
    c2 = _claim_next(sp)
    assert (c2.attempt, c2.number) == (2, 2)
    transitions.requeue(sp, c2, "usage limit", count_attempt=False)  # a hold: not counted, the number is reused
    h = transitions.history(sp, t.id)
    assert (h.attempts, h.last_reason) == (1, "usage limit") and _claim_next(sp).attempt == 2
    assert [r.kind for r in spool.attempt_records(sp, t.id)] == ["requeued", "waited"]


def test_a_requeue_with_a_wait_puts_it_in_the_name_not_the_file(sp: spool.Spool) -> None:
    from datetime import UTC, datetime

    t = _enqueue(sp)
    body = (sp.dir("queued") / spool.list_queued(sp)[0].name).read_bytes()
    later = datetime(2030, 1, 1, tzinfo=UTC)
    transitions.requeue(sp, _claim_next(sp), "later", not_before=later)
    [e] = spool.list_queued(sp)
    assert e.not_before == later and (sp.dir("queued") / e.name).read_bytes() == body
    assert api.info(sp, t.id, with_estimate=False).not_before == "2030-01-01T00:00:00Z"


def test_cancel_queued_and_retry_are_renames(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    body = (sp.dir("queued") / spool.list_queued(sp)[0].name).read_bytes()
    assert transitions.cancel(sp, t.id) == "cancelled"
    loc = spool.locate(sp, t.id)
    assert loc.state == "cancelled" and loc.path.read_bytes() == body
    assert parse_result(loc.result_path.read_text()).status == "cancelled"
    with pytest.raises(InvalidState):
        transitions.cancel(sp, t.id)
    transitions.retry(sp, t.id)
    loc = spool.locate(sp, t.id)
    assert loc.state == "queued" and loc.path.read_bytes() == body
    [aside] = spool.attempt_records(sp, t.id)
    assert aside.kind == "retried" and parse_result(aside.path.read_text()).status == "cancelled"


def test_a_retried_task_still_waits_for_its_not_before(sp: spool.Spool) -> None:
    """Cancelled before its time came, then retried: it starts no earlier than it was asked to."""
    from datetime import UTC, datetime

    later = datetime(2030, 1, 1, tzinfo=UTC)
    t = _enqueue(sp, not_before=later)
    transitions.cancel(sp, t.id)
    transitions.retry(sp, t.id)
    [entry] = spool.list_queued(sp)
    assert entry.task_id == t.id and entry.not_before == later


def test_retry_resets_the_count_and_keeps_the_old_answer(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    for _ in range(2):
        transitions.requeue(sp, _claim_next(sp), "transient")
    c = _claim_next(sp)
    assert c.attempt == 3
    transitions.finish(sp, c, transitions.result_for(c, "failed", "gave up"))
    assert api.info(sp, t.id).attempts == 3
    transitions.retry(sp, t.id)
    assert api.info(sp, t.id).attempts == 0
    again = _claim_next(sp)
    assert (again.attempt, again.number) == (1, 4)
    kinds = [(r.attempt, r.kind) for r in spool.attempt_records(sp, t.id)]
    assert kinds == [(1, "requeued"), (2, "requeued"), (3, "retried")]


def test_cancel_running_asks_the_live_owner(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    lock = owners.hold_owner_lock(sp)
    try:
        _claim_next(sp)
        assert transitions.cancel(sp, t.id) == "cancelling"
        assert spool.cancel_marker(sp, t.id).exists()
        assert transitions.cancel(sp, t.id) == "cancelling"  # asked twice: one marker, written once
    finally:
        lock.release()


def test_an_unreadable_queued_file_is_failed_with_the_reason(sp: spool.Spool) -> None:
    tid = spool.new_id("bad")
    (sp.dir("queued") / spool.queued_name(tid, "normal", None)).write_bytes(b"\xff\xfe not text")
    assert transitions.claim(sp, spool.list_queued(sp)[0], "sonnet") is None
    loc = spool.locate(sp, tid)
    assert loc.state == "failed" and "cannot be read" in loc.result_path.read_text()
    assert loc.path.read_bytes() == b"\xff\xfe not text"


def test_no_task_file_is_written_after_intake(sp: spool.Spool, tmp_path) -> None:
    """Watch the spool with inotify through every transition: a task file is created once (in tmp/, linked
    into queued/), then only renamed. inotify reports every open-for-write and close-after-write."""
    from inotify_simple import INotify, flags

    ino = INotify()
    dirs = {}
    for d in ("tmp", "queued", "running", "failed", "cancelled"):
        dirs[ino.add_watch(sp.dir(d), flags.CLOSE_WRITE | flags.MODIFY | flags.MOVED_TO | flags.CREATE)] = d
    done_dir = spool.date_dir(sp, "done", transitions.now())
    spool.make_dir(done_dir)
    dirs[ino.add_watch(done_dir, flags.CLOSE_WRITE | flags.MODIFY | flags.MOVED_TO | flags.CREATE)] = "done"
    t = _enqueue(sp)
    intake_events = ino.read(timeout=0)
    transitions.requeue(sp, _claim_next(sp), "transient")  # claim, requeue
    c = _claim_next(sp)
    transitions.finish(sp, c, transitions.result_for(c, "failed", "no"))
    transitions.retry(sp, t.id)
    assert transitions.cancel(sp, t.id) == "cancelled"
    events = [(dirs[e.wd], e.name, flags.from_mask(e.mask)) for e in ino.read(timeout=0)]
    written = [(d, n) for d, n, f in events if (flags.CLOSE_WRITE in f or flags.MODIFY in f) and d != "tmp"]
    task_files = [(d, n) for d, n in written if t.id in n and not n.endswith(".result.md")]
    assert task_files == [], task_files
    arrived = [(d, n) for d, n, f in events if flags.MOVED_TO in f]
    assert [d for d, _ in arrived] == ["running", "queued", "running", "failed", "queued", "cancelled"]
    assert any(flags.CREATE in flags.from_mask(e.mask) for e in intake_events)


def test_a_cancel_that_comes_as_a_run_ends_wins_over_its_requeue(sp: spool.Spool) -> None:
    """Asked to cancel while its outcome (a transient error) was being written: it ends cancelled, not requeued."""
    t = _enqueue(sp)
    c = _claim_next(sp)
    spool.write_new(sp, spool.cancel_marker(sp, t.id), b"cancel\n")
    transitions.requeue(sp, c, "transient")
    assert spool.locate(sp, t.id).state == "cancelled" and not spool.cancel_marker(sp, t.id).exists()


def test_a_late_cancel_marker_does_not_outlive_a_finish_or_a_retry(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    c = _claim_next(sp)
    spool.write_new(sp, spool.cancel_marker(sp, t.id), b"cancel\n")
    transitions.finish(sp, c, transitions.result_for(c, "failed", "no"))
    assert not spool.cancel_marker(sp, t.id).exists()
    spool.write_new(sp, spool.cancel_marker(sp, t.id), b"cancel\n")  # as if asked just before the finish
    transitions.retry(sp, t.id)
    assert not spool.cancel_marker(sp, t.id).exists() and spool.locate(sp, t.id).state == "queued"


def test_a_retry_without_a_result_still_resets_the_count(sp: spool.Spool) -> None:
    """A cancel of a queued task killed between its rename and its result: retry still starts afresh."""
    t = _enqueue(sp)
    for _ in range(2):
        transitions.requeue(sp, _claim_next(sp), "transient")
    loc = spool.locate(sp, t.id)
    os.rename(loc.path, spool.task_path_for(sp.dir("cancelled"), t.id))  # the rename, and no result
    transitions.retry(sp, t.id)
    assert transitions.history(sp, t.id).attempts == 0 and _claim_next(sp).attempt == 1


def test_a_cancel_of_a_dead_owners_task_keeps_the_answer_it_wrote(sp: spool.Spool) -> None:
    """Its daemon died after writing the result and before the move: `cancel` says it had ended, and keeps it."""
    import subprocess
    import sys

    t = _enqueue(sp)
    c = _claim_next(sp)
    transitions.finish(sp, c, transitions.result_for(c, "done", answer="kept\n"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    done = spool.locate(sp, t.id).path
    os.rename(done, spool.running_path(sp, t.id, c.number, c.started, f"{spool.host_id()}-{dead.pid}"))
    with pytest.raises(InvalidState, match="had already ended done"):
        api.cancel(sp, t.id)
    assert spool.locate(sp, t.id).state == "done" and api.result(sp, t.id)[1] == "kept\n"


def test_a_finish_or_requeue_meeting_a_copy_a_power_cut_left_keeps_one(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    c = _claim_next(sp)
    ghost = c.path.read_bytes()
    (sp.dir("queued") / spool.queued_name(t.id, "normal", None)).write_bytes(ghost)  # the claim half undone
    transitions.requeue(sp, c, "transient")
    assert [e.task_id for e in spool.list_queued(sp)] == [t.id] and not spool.list_running(sp)


def test_a_run_cancelled_keeps_its_answer_so_far(sp: spool.Spool) -> None:
    t = _enqueue(sp)
    c = _claim_next(sp)
    spool.write_new(sp, spool.partial_path(c.path), b"The first half of")
    transitions.cancel_running(sp, c, "cancelled by request")
    ti, answer = api.result(sp, t.id)
    assert ti.state == "cancelled" and answer == "The first half of\n" and not spool.partial_path(c.path).exists()


def test_retry_of_bad_input_takes_the_fixed_file_in_again_under_its_id(sp: spool.Spool) -> None:
    from spoold import intake
    from spoold.errors import BadInput

    (sp.dir("inbox") / "broken.md").write_text("---\nmodel: [unclosed\n---\nWhy?\n")
    intake.scan(sp, default_model="sonnet", max_bytes=1 << 20)
    [(tid, kept)] = spool.newest_terminal(sp, "failed", None)
    with pytest.raises(BadInput, match="still cannot be read as a task.*fix .*then `spoold retry"):
        api.retry(sp, tid)
    assert spool.locate(sp, tid).state == "failed"  # nothing moved
    kept.write_text("---\nmodel: haiku\n---\nWhy?\n")  # fixed where it lies
    ti = api.retry(sp, tid)
    assert (ti.id, ti.state, ti.model, ti.prompt) == (tid, "queued", "haiku", "Why?\n")
    queued = spool.locate(sp, tid).path.read_text()
    assert f"id: {tid}" in queued and "submitted_at:" in queued  # written as intake writes a task, not moved as is
    assert ti.submitted_at == api.iso(spool.id_time(tid))
    assert not kept.exists() and not spool.result_path_for(sp.dir("failed"), tid).exists()
    assert [r.kind for r in spool.attempt_records(sp, tid)] == ["retried"]
