"""The library surface the CLI and the adapter share: submit, info, results, holds, windows, answers so far."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from spoold import api, census, ledger, spool, transitions
from spoold.config import Settings
from spoold.errors import BadInput, InvalidState, TaskNotFound
from spoold.task import Result


def test_submit_is_never_refused_for_load_and_says_when_it_starts(sp: spool.Spool) -> None:
    settings = Settings(max_requests=2, window_minutes=60)
    infos = [api.submit(sp, f"q{i}", settings=settings) for i in range(4)]
    assert [i.position for i in infos] == [1, 2, 3, 4] and all(i.state == "queued" for i in infos)
    assert infos[3].estimated_wait_seconds is not None and infos[3].estimated_wait_seconds > 0


def test_submit_checks_options_against_the_spool(sp: spool.Spool) -> None:
    with pytest.raises(BadInput, match="not a profile of this spool"):
        api.submit(sp, "---\nprofile: nope\n---\nq")
    with pytest.raises(BadInput, match="no task .abcdef. in"):
        api.submit(sp, "---\nresume: abcdef\n---\nq")
    first = api.submit(sp, "first").id
    follow = api.submit(sp, f"---\nresume: {first.split('-')[1]}\n---\nmore")
    assert api.info(sp, follow.id).state == "queued"


def test_resolve_id_takes_a_prefix_or_the_random_part(sp: spool.Spool) -> None:
    a = api.submit(sp, "a").id
    assert spool.resolve_id(sp, a) == a == spool.resolve_id(sp, a.split("-")[1]) == spool.resolve_id(sp, a[:20])
    with pytest.raises(TaskNotFound):
        spool.resolve_id(sp, "zzzzzz")


def test_structured_reads_the_fenced_json_block() -> None:
    assert api.structured('```json\n{"n": 4}\n```\n') == {"n": 4}
    assert api.structured("plain answer") is None and api.structured("```json\nnot json\n```") is None


def test_windows_and_the_reserve_hold_from_the_ledger_alone(sp: spool.Spool) -> None:
    now = time.time()
    seen = ledger.WindowSeen("allowed_warning", now + 600, 0.9, now, "t")
    ledger.record_finish(sp, Settings(), None, None, {"seven_day": seen})
    [w] = api.windows(sp)
    assert (w.name, w.utilization, w.task_id) == ("seven_day", 0.9, "t")
    until, why = api.hold(sp, Settings(reserve=0.2))
    assert until and "weekly window is 90% used" in why
    assert api.hold(sp, Settings()) == (None, None)


def test_a_running_tasks_answer_so_far(sp: spool.Spool) -> None:
    tid = api.submit(sp, "long one").id
    [entry] = spool.list_queued(sp)
    claimed = transitions.claim(sp, entry, "sonnet")
    assert api.info(sp, tid).partial_answer is None
    spool.rewrite(sp, spool.partial_path(claimed.path), b"The first words")
    assert api.info(sp, tid).partial_answer == "The first words"
    transitions.finish(sp, claimed, Result(id=tid, status="done", answer="The first words, then the rest.\n"))
    assert spool.find_partial(sp, tid) is None and not spool.partial_path(claimed.path).exists()
    assert api.result(sp, tid)[1] == "The first words, then the rest.\n"


def test_a_task_file_copied_back_from_failed_starts_afresh(sp: spool.Spool) -> None:
    """Review 3.1: `spoold submit failed/X.md` kept `attempts: 3` and gave up at its first transient error."""
    copied = ("---\nid: \"20260101T000000000Z-abcdef\"\nstatus: \"failed\"\nattempts: 3\nerror: \"interrupted 3 times\"\n"
              "started_at: \"2026-01-01T00:00:00.000Z\"\nfinished_at: \"2026-01-01T00:01:00.000Z\"\nmodel: \"opus\"\n---\n"
              "The question again\n")
    ti = api.submit(sp, copied)
    info = api.info(sp, ti.id)
    assert (info.attempts, info.error, info.started_at, info.finished_at, info.model) == (0, None, None, None, "opus")
    assert ti.id != "20260101T000000000Z-abcdef"
    assert any("`attempts` is spoold's own key" in w for w in info.warnings)


def _quiet(directory: Path) -> None:
    """As if nothing changed in the directory for a while: a count made now may be kept (census.QUIET_NS)."""
    st = os.stat(directory)
    os.utime(directory, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))


def test_a_submit_into_a_deep_queue_takes_its_place_from_the_census(sp: spool.Spool, monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    """The census a listing leaves gives the same place and start as a listing, and follows every submit;
    a change it did not see (a task claimed or removed by hand) makes the next submit list again."""
    monkeypatch.setattr(census, "QUEUE_MIN", 5)
    for i in range(6):
        api.submit(sp, f"question {i}")
    api.submit(sp, "urgent one", priority="high")
    _quiet(sp.dir("queued"))
    census.keep(sp, spool.list_queued(sp))  # as the daemon or `status` does
    assert census.read(sp) is not None
    calls: list[int] = []
    real = spool.list_queued
    monkeypatch.setattr(spool, "list_queued", lambda s: calls.append(1) or real(s))
    for i in range(3):
        ti = api.submit(sp, f"more {i}")
        assert calls == [], "a submit with a valid census listed the queue"
        by_listing = api.info(sp, ti.id)
        assert (ti.position, ti.estimated_start) == (by_listing.position, by_listing.estimated_start)
        calls.clear()
    assert ti.position == 10
    first = spool.list_queued(sp)[0]
    os.unlink(sp.dir("queued") / first.name)  # not seen by the census
    st = os.stat(sp.dir("queued"))  # (a change in the very clock tick of the last submit would be missed)
    os.utime(sp.dir("queued"), ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    monkeypatch.setattr(census, "FRESH_S", 0.0)
    ti = api.submit(sp, "after a change")
    assert calls, "a stale census was trusted"
    assert ti.position == 10 == api.info(sp, ti.id).position


def test_status_counts_a_finished_partition_once_until_it_changes(sp: spool.Spool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`status` over a month of finished tasks lists only the partitions that changed since it last counted."""
    day = sp.dir("done") / "2026-01-01"
    day.mkdir()
    for i in range(3):
        (day / f"20260101T00000{i}000Z-aaaaa{i}-x.md").write_text("t")
        (day / f"20260101T00000{i}000Z-aaaaa{i}-x.result.md").write_text("r")
    (day / "20260101T000000000Z-aaaaa0-x.sync-conflict-20260101-000000-ABCDEFG.result.md").write_text("r")
    _quiet(day)
    assert api.status(sp).counts["done"] == 3
    listed: list[str] = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda d: listed.append(str(d)) or real(d))
    first = api.status(sp)
    assert first.counts["done"] == 3 and str(day) not in listed, "an unchanged partition was listed again"
    assert any("sync-conflict" in x for x in first.leftovers), "its leftover is still reported"
    (day / "20260101T000009000Z-aaaaa9-x.md").write_text("t")
    assert api.status(sp).counts["done"] == 4 and str(day) in listed


def test_a_finished_count_kept_in_the_old_form_is_replaced_not_left_behind(sp: spool.Spool) -> None:
    """The counts of a terminal state moved to `STATE-2.json` when they began to count rejected entries: the
    first status after that removes `STATE.json` (a cache: the directory is the truth)."""
    old = spool.cache_path(sp, "done.json")
    old.parent.mkdir(exist_ok=True)
    old.write_text('{"done": [[1, 2, 3], 7, 0, []]}')
    assert api.status(sp).counts["done"] == 0
    assert not old.exists() and spool.cache_path(sp, "done-2.json").exists()


def test_status_over_a_counted_queue_neither_checks_nor_sorts_it_and_says_the_same(
        sp: spool.Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(census, "QUEUE_MIN", 5)
    for i in range(8):
        api.submit(sp, f"question {i}", priority="low" if i % 3 else None)
    _quiet(sp.dir("queued"))
    census.keep(sp, spool.list_queued(sp))
    listing = spool.list_queued(sp, census.trust(sp))
    assert not listing.ordered and len(listing) == 8  # vouched for by the census: taken as listed
    with_census = api.status(sp)
    spool.cache_path(sp, "queued.json").unlink()
    without = api.status(sp)
    for field_ in ("counts", "next_start", "oldest_queued"):
        assert getattr(with_census, field_) == getattr(without, field_)
    (sp.dir("queued") / "not-a-task.txt").write_text("x")  # a name the census never counted
    _quiet(sp.dir("queued"))
    census.keep(sp, spool.list_queued(sp))
    assert spool.list_queued(sp, census.trust(sp)).ordered  # no longer vouched for: checked again


def test_status_over_an_unchanged_counted_queue_lists_nothing_and_says_the_same(
        sp: spool.Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A million queued names take a second to list: while queued/ is as a listing left it, the census's count,
    first names and oldest id stand in for the listing."""
    monkeypatch.setattr(census, "QUEUE_MIN", 5)
    for i in range(8):
        api.submit(sp, f"question {i}", priority="low" if i % 3 else None)
    api.submit(sp, "later", not_before="2099-01-01T00:00:00Z", priority="high")
    _quiet(sp.dir("queued"))
    by_listing = api.status(sp)  # lists, and keeps the census
    listed: list[str] = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda d=".": listed.append(str(d)) or real(d))
    kept = api.status(sp)
    assert str(sp.dir("queued")) not in listed, "an unchanged counted queue was listed"
    for field_ in ("counts", "next_start", "oldest_queued", "held_until"):
        assert getattr(kept, field_) == getattr(by_listing, field_), field_
    assert kept.counts["queued"] == 9 and kept.oldest_queued == spool.list_queued(sp).oldest_id()
    name = spool.list_queued(sp).names[0]
    conflict = name[:-3] + ".sync-conflict-20261207-101010-ABCDEFG.md"  # a sync tool's copy: any change lists again
    (sp.dir("queued") / conflict).write_text("x")
    again = api.status(sp)
    assert str(sp.dir("queued")) in listed and again.counts["queued"] == 9 and len(again.leftovers) == 1
    _quiet(sp.dir("queued"))
    listed.clear()
    for _ in range(2):  # a queue with other names in it is listed every time, so they are always reported
        assert api.status(sp).leftovers == again.leftovers and str(sp.dir("queued")) in listed


def test_a_dropped_directory_or_link_is_a_failed_task_every_view_shows(sp: spool.Spool, tmp_path: Path) -> None:
    """Kept as `failed/ID.rejected` beside its result: listed, counted, shown; never read, followed or retried."""
    from spoold import intake

    secret = tmp_path / "secret.md"
    secret.write_text("---\ntitle: a secret title\n---\nnot for anyone\n")
    (sp.dir("inbox") / "folder.md").mkdir()
    os.symlink(secret, sp.dir("inbox") / "link.md")
    report = intake.scan(sp, default_model="sonnet", max_bytes=1024)
    assert len(report.failed) == 2 and report.queued == []
    assert sorted(os.path.splitext(n)[1] for n in os.listdir(sp.dir("failed"))) == [".md", ".md", ".rejected",
                                                                                   ".rejected"]
    listed = api.list_tasks(sp, "failed")
    assert sorted(t.id for t in listed) == sorted(report.failed)
    assert {t.error for t in listed} == {"'folder.md' is a directory, not a file; spoold never follows or reads it",
                                         "'link.md' is a symbolic link, not a file; spoold never follows or reads it"}
    assert all(t.title != "a secret title" for t in listed + api.recent(sp))  # the link's target is never read
    assert sorted(t.id for t in api.recent(sp) if t.state == "failed") == sorted(report.failed)
    assert api.status(sp).counts["failed"] == 2
    for task_id in report.failed:
        ti, answer = api.result(sp, task_id)
        assert ti.state == "failed" and ti.error and ti.result_path and answer == ""
        assert ti.prompt is None and ti.path.endswith(".rejected")
        assert spool.resolve_id(sp, task_id.split("-")[1]) == task_id  # its short name finds it too
        with pytest.raises(InvalidState, match="drop it again as a file"):
            api.retry(sp, task_id)
    assert secret.read_text().endswith("not for anyone\n")
