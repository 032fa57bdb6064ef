"""Stats over finished tasks, and pruning old ones with their results and transcripts, crash-safe."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from spoold import history, recovery, spool, transitions
from spoold.task import Result, Task

OLD = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


def _finished(sp: spool.Spool, when: datetime, status: str = "done", cost: float | None = 0.01,
              duration: float = 5.0, model: str = "claude-sonnet-5", error: str | None = None,
              session: str | None = None, requeues: int = 0) -> str:
    t = Task(id=spool.new_id("t", now=when), prompt="q\n")
    transitions.enqueue(sp, t)
    for _ in range(requeues):
        [entry] = [e for e in spool.list_queued(sp) if e.task_id == t.id]
        again = transitions.claim(sp, entry, "sonnet")
        assert again
        transitions.requeue(sp, again, "transient")
    [entry] = [e for e in spool.list_queued(sp) if e.task_id == t.id]
    claimed = transitions.claim(sp, entry, "sonnet")
    assert claimed
    transitions.finish(sp, claimed, Result(id=t.id, status=status, answer="a\n" if status == "done" else "", cost_usd=cost,
                                     duration_s=duration, model="sonnet", model_resolved=model, error=error,
                                     finished_at=when + timedelta(seconds=duration), session_id=session))
    return t.id


def test_stats_add_up_cost_durations_and_failures(sp: spool.Spool) -> None:
    for i in range(4):
        _finished(sp, OLD + timedelta(minutes=i), duration=float(i + 1), cost=0.25)
    _finished(sp, OLD, model="claude-opus-5", cost=1.0)
    _finished(sp, OLD + timedelta(days=1), status="failed", cost=None, error="temporary API error: 529 Overloaded")
    _finished(sp, OLD + timedelta(days=1), status="failed", cost=None, error="temporary API error: 500 Internal")
    st = history.stats(sp)
    assert st.tasks == 7 and st.by_day == {"2026-01-10": {"done": 5}, "2026-01-11": {"failed": 2}}
    assert st.cost_by_model == {"claude-opus-5": 1.0, "claude-sonnet-5": 1.0} and st.cost_by_month == {"2026-01": 2.0}
    assert st.duration_p50_s == 3.0 and st.duration_p95_s == 4.8  # 1, 2, 3, 4, 5 s
    assert sum(st.failures.values()) == 2
    assert history.stats(sp, since=OLD + timedelta(hours=12)).tasks == 2


def test_prune_takes_old_finished_tasks_with_results_and_transcripts(sp: spool.Spool, tmp_path: Path) -> None:
    claude = tmp_path / "claude-config"
    (claude / "projects" / "-some-cwd").mkdir(parents=True)
    old = _finished(sp, OLD, session="s-old", requeues=1)
    assert spool.attempt_records(sp, old)
    continued = _finished(sp, OLD, session="s-shared")
    _finished(sp, datetime.now(UTC), session="s-shared")  # a recent follow-up of the same conversation
    recent = _finished(sp, datetime.now(UTC), session="s-new")
    waiting = Task(id=spool.new_id("q", now=OLD), prompt="still queued\n")
    transitions.enqueue(sp, waiting)
    for s in ("s-old", "s-shared", "s-new"):
        (claude / "projects" / "-some-cwd" / f"{s}.jsonl").write_text("{}\n")
    cutoff = datetime(2026, 6, 1, tzinfo=UTC)
    dry = history.prune(sp, cutoff, dry_run=True, claude_dir=claude)
    assert sorted(dry.task_ids) == sorted([old, continued]) and spool.locate(sp, old).state == "done"
    out = history.prune(sp, cutoff, claude_dir=claude)
    assert sorted(out.task_ids) == sorted([old, continued])
    for gone in (old, continued):
        assert spool.find_result(sp, gone) is None and not spool.attempts_dir(sp, gone).exists()
        try:
            spool.locate(sp, gone)
            raise AssertionError("still there")
        except spool.TaskNotFound:
            pass
    assert spool.locate(sp, recent).state == "done" and spool.locate(sp, waiting.id).state == "queued"
    assert sorted(p.stem for p in (claude / "projects" / "-some-cwd").iterdir()) == ["s-new", "s-shared"]
    assert os.listdir(sp.dir("tmp")) == []


def test_a_prune_interrupted_midway_is_finished_by_recovery(sp: spool.Spool) -> None:
    tid = _finished(sp, OLD)
    done = spool.locate(sp, tid).path
    staged = sp.dir("tmp") / f"prune~{spool.host_id()}-999999999~{done.name}"  # a pruner that died after moving it
    os.rename(done, staged)
    assert recovery.recover(sp, max_attempts=3) == [f"finished pruning {done.name}"]
    assert not staged.exists()


def test_bad_input_counts_by_its_reason_not_by_its_file_name() -> None:
    one = history._reason("evil.md: `notify` names targets of the spool's config.yaml; a task cannot add an address")
    two = history._reason("other.md: `notify` names targets of the spool's config.yaml; a task cannot add an address")
    assert one == two and one.startswith("`notify` names targets")


def test_a_rejected_directory_or_link_is_counted_and_pruned_never_followed(sp: spool.Spool, tmp_path: Path) -> None:
    """`failed/ID.rejected` (a dropped directory or link, kept as it came) is a failed task like any: stats count
    it by its reason, prune removes it with its result; a link goes, never its target, nor a link's inside a
    directory."""
    from spoold import intake

    target = tmp_path / "outside.txt"
    target.write_text("the user's own file\n")
    (sp.dir("inbox") / "folder" / "read-only").mkdir(parents=True)
    (sp.dir("inbox") / "folder" / "read-only" / "a.go").write_text("package a\n")
    (sp.dir("inbox") / "folder" / "read-only").chmod(0o555)  # a copy from read-only media
    (sp.dir("inbox") / "folder" / "inner-link").symlink_to(target)
    (sp.dir("inbox") / "link.md").symlink_to(target)
    assert len(intake.scan(sp, default_model="sonnet", max_bytes=1024).failed) == 2
    st = history.stats(sp)
    assert st.tasks == 2 and st.failures == {"a dropped entry is a directory, not a file; spoold never follows or "
                                             "reads it": 1, "a dropped entry is a symbolic link, not a file; spoold "
                                             "never follows or reads it": 1}
    assert history.prune(sp, datetime.now(UTC), ("done",)).task_ids == []  # not a state asked for
    pruned = history.prune(sp, datetime.now(UTC) + timedelta(days=1))
    assert len(pruned.task_ids) == 2 and os.listdir(sp.dir("failed")) == [] and os.listdir(sp.dir("tmp")) == []
    assert target.read_text() == "the user's own file\n"


def test_recovery_finishes_a_prune_of_a_rejected_directory_and_says_so_only_once_it_is_gone(
        sp: spool.Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    staged = sp.dir("tmp") / f"prune~{spool.host_id()}-999999999~20260110T120000000Z-abcdef-x.rejected"
    staged.mkdir()
    (staged / "inside.md").write_text("x")
    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", lambda *a, **k: None)  # as for another user's files: it stays
        assert recovery.recover(sp, max_attempts=3) == []
    assert recovery.recover(sp, max_attempts=3) == ["finished pruning 20260110T120000000Z-abcdef-x.rejected"]
    assert not os.path.lexists(staged)


def test_prune_says_what_it_could_not_delete(sp: spool.Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from spoold import intake

    (sp.dir("inbox") / "folder").mkdir()
    (sp.dir("inbox") / "folder" / "theirs.md").write_text("x")
    intake.scan(sp, default_model="sonnet", max_bytes=1024)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)
    out = history.prune(sp, datetime.now(UTC) + timedelta(days=1))
    assert len(out.task_ids) == 1 and len(out.left) == 1 and out.left[0].endswith(".rejected")
    assert os.listdir(sp.dir("failed")) == []  # gone from every listing all the same
