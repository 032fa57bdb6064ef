"""The daemon as a real process on a temporary spool, with the `command` backend."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime

from conftest import ECHO_COMMAND, drop, results, terminal_files, wait_for, write_config

from spoold import api, spool
from spoold.task import parse_result, parse_task

SLEEPER = [sys.executable, "-c", "import sys, time; sys.stdin.read(); print('started', flush=True); time.sleep(60)"]


def _done(sp: spool.Spool, n: int = 1) -> list:
    return wait_for(lambda: len(terminal_files(sp, "done")) >= n and terminal_files(sp, "done"), what=f"{n} done")


def test_drop_to_done_with_result_file(sp, daemon) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND)
    d = daemon(sp)
    drop(sp, "question.md", "---\nmodel: haiku\ntitle: Q\n---\nWhat is up?\n")
    [task_file] = _done(sp)
    res = parse_result((task_file.parent / task_file.name.replace(".md", ".result.md")).read_text())
    assert res.answer == "answer: What is up?\n" and res.status == "done" and res.model == "haiku"
    assert res.started_at and res.finished_at and res.attempts == 1
    task = parse_task(task_file.read_text(), task_id=res.id)
    assert task.source == "question.md" and task.title == "Q"
    assert "status:" not in task_file.read_text()  # the state is the directory; the file is as intake wrote it
    assert "question" in res.id
    assert d.stop() == 0
    assert "queued" in d.log and f"done {res.id}" in d.log


def test_bad_input_does_not_stop_the_daemon(sp, daemon) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND)
    daemon(sp)
    drop(sp, "broken.md", "---\nmodel: [oops\n---\nq\n")
    drop(sp, "good.md", "fine question\n")
    _done(sp)
    wait_for(lambda: results(sp, "failed"), what="failed result")
    assert "not valid YAML" in results(sp, "failed")[0].read_text()


def test_priority_order(sp, daemon) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND)
    ids = [api.submit(sp, f"p{i}", priority=p).id for i, p in enumerate(["low", "normal", "urgent", "high"])]
    d = daemon(sp, args=["--once"])
    assert d.proc.wait(30) == 0
    order = [ln.split()[-1] for ln in d.log.splitlines() if " running " in ln]
    order = [ln.split("running ")[1].split()[0] for ln in d.log.splitlines() if "spoold: running " in ln]
    assert order == [ids[2], ids[3], ids[1], ids[0]]


def test_rate_limit_holds_in_once_mode(sp, daemon) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND, max_requests=2, window_minutes=60)
    for i in range(4):
        api.submit(sp, f"q{i}")
    d = daemon(sp, args=["--once"])
    assert d.proc.wait(30) == 0
    assert len(terminal_files(sp, "done")) == 2 and len(spool.list_queued(sp)) == 2
    assert "rate limit: 2 starts per 60 min" in d.log
    st = api.status(sp)
    assert st.held_until and st.counts["queued"] == 2
    items = api.list_tasks(sp, "queued")
    assert [t.position for t in items] == [1, 2] and all(t.estimated_wait_seconds > 3000 for t in items)


def test_cancel_running_task_stops_its_process(sp, daemon) -> None:
    write_config(sp, backend="command", command=SLEEPER)
    d = daemon(sp)
    tid = api.submit(sp, "sleep please").id
    wait_for(lambda: spool.list_running(sp), what="running")
    assert api.cancel(sp, tid) == "cancelling"
    wait_for(lambda: spool.locate(sp, tid).state == "cancelled", what="cancelled")
    wait_for(lambda: not os.path.exists(sp.dir("running") / f"{tid}.cancel"), what="cancel marker removed")
    assert spool.list_running(sp) == []
    wait_for(lambda: f"cancelled {tid}" in d.log, what="the cancel logged")  # (written after the moves)


def test_sigterm_requeues_a_running_task_after_the_grace_period(sp, daemon) -> None:
    write_config(sp, backend="command", command=SLEEPER, grace_s=0.2)
    d = daemon(sp)
    tid = api.submit(sp, "long").id
    wait_for(lambda: spool.list_running(sp), what="running")
    assert d.stop(signal.SIGTERM) == 0
    info = api.info(sp, tid)
    assert info.state == "queued" and info.attempts == 0  # a stop is not the task's fault


def test_kill_9_then_restart_recovers(sp, daemon) -> None:
    write_config(sp, backend="command", command=SLEEPER)
    d = daemon(sp)
    tid = api.submit(sp, "long").id
    wait_for(lambda: api.info(sp, tid).started_at, what="claimed")
    d.stop(signal.SIGKILL)
    write_config(sp, backend="command", command=ECHO_COMMAND)
    d2 = daemon(sp)
    wait_for(lambda: spool.locate(sp, tid).state == "done", what="done after restart")
    assert f"recovery: requeued {tid}" in d2.log
    assert api.info(sp, tid).attempts == 2


def test_config_change_is_picked_up_without_restart(sp, daemon) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND, max_requests=1)
    d = daemon(sp)
    api.submit(sp, "one")
    _done(sp, 1)
    api.submit(sp, "two")
    wait_for(lambda: "rate limit" in d.log, what="limit reached")
    api.set_config(sp, {"max_requests": 5})
    _done(sp, 2)
    assert "config reloaded" in d.log


def test_command_failure_is_failed_with_stderr(sp, daemon) -> None:
    write_config(sp, backend="command", command=[sys.executable, "-c", "import sys; sys.exit('no such model: x')"])
    daemon(sp)
    tid = api.submit(sp, "q").id
    wait_for(lambda: spool.locate(sp, tid).state == "failed", what="failed")
    assert "no such model: x" in api.info(sp, tid).error


def test_missing_cli_holds_the_queue_instead_of_failing_tasks(sp, daemon) -> None:
    write_config(sp, claude_bin=str(sp.root / "no-such-claude"))
    d = daemon(sp)
    tid = api.submit(sp, "q").id
    wait_for(lambda: "holding the queue" in d.log, what="hold")
    wait_for(lambda: spool.locate(sp, tid).state == "queued", what="requeued")
    assert "not found" in d.log and "no-such-claude" in d.log
    st = api.status(sp)
    assert st.held_until and "or set claude_bin" in st.hold_reason
    assert api.info(sp, tid).attempts == 0
    from spoold import ledger

    wait_for(lambda: ledger.read_usage(sp).starts == [], what="the start given back")  # the CLI never ran


OVERLAP = """#!/bin/sh
echo "start $(date +%s.%N)" >> "$0.log"
sleep 0.05
echo "end $(date +%s.%N)" >> "$0.log"
"""


def test_concurrency_holds_while_finished_tasks_are_written(sp, daemon, tmp_path) -> None:
    """A finished task frees its slot before its outcome is written; never more backends alive than allowed."""
    from conftest import executable

    backend = executable(tmp_path / "overlap.sh", OVERLAP)
    write_config(sp, backend="command", command=[str(backend)], concurrency=2, max_requests=1000)
    daemon(sp)
    for i in range(30):
        drop(sp, f"q{i}.md", f"question {i}\n")
    _done(sp, 30)
    events = sorted((float(t), +1 if kind == "start" else -1)
                    for kind, t in (ln.split() for ln in (tmp_path / "overlap.sh.log").read_text().splitlines()))
    alive, most = 0, 0
    for _, step in events:
        alive += step
        most = max(most, alive)
    assert len(events) == 60 and most == 2  # both slots used, never a third


def test_a_cancel_reaches_a_running_task_while_dispatch_waits_for_a_slot(sp, daemon) -> None:
    """The dispatch pass keeps its listing while slots are full; a cancel marker must still end it at once."""
    write_config(sp, backend="command", command=SLEEPER, concurrency=1)
    daemon(sp)
    first = api.submit(sp, "long one").id
    api.submit(sp, "waits behind it")
    wait_for(lambda: spool.locate(sp, first).state == "running", what="first running")
    assert api.cancel(sp, first) == "cancelling"
    wait_for(lambda: spool.locate(sp, first).state == "cancelled", timeout=10, what="cancelled")


def test_a_budget_below_one_tasks_cost_lets_exactly_one_task_run(sp, daemon, tmp_path) -> None:
    """The finished task's cost is counted before the next admission (two ran at concurrency 1 before)."""
    from conftest import fake_claude_script

    runs = tmp_path / "runs"
    exe = fake_claude_script(tmp_path / "claude", f"cat > /dev/null\necho run >> {runs}\n"
                             "echo '{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,"
                             "\"result\":\"ok\",\"total_cost_usd\":0.00055}'")
    write_config(sp, claude_bin=str(exe), budget_day_usd=0.0001)
    d = daemon(sp)
    ids = [api.submit(sp, f"q{i}").id for i in range(3)]
    wait_for(lambda: "daily budget" in d.log, what="the budget hold")
    assert runs.read_text().count("run") == 1
    assert [spool.locate(sp, t).state for t in ids].count("queued") == 2
    assert "daily budget of $0.0001 reached ($0.00055 spent today)" in api.status(sp).hold_reason


def test_a_family_window_past_the_reserve_holds_only_that_family(sp, daemon, tmp_path) -> None:
    """A run reports the weekly Opus window 90% used: opus tasks wait for its reset, sonnet tasks go on."""
    import json as _json
    import time as _time

    from conftest import fake_claude_script

    reset = int(_time.time()) + 3600
    event = _json.dumps({"type": "rate_limit_event", "rate_limit_info": {
        "status": "allowed_warning", "rateLimitType": "seven_day_opus", "utilization": 0.9, "resetsAt": reset}})
    result = '{"type":"result","subtype":"success","is_error":false,"result":"ok"}'
    exe = fake_claude_script(tmp_path / "claude", f"cat > /dev/null\necho \"$@\" >> {tmp_path}/argv\n"
                             f"echo '{event}'\necho '{result}'")
    write_config(sp, claude_bin=str(exe), reserve=0.2)
    daemon(sp)
    first = api.submit(sp, "first", model="opus").id
    wait_for(lambda: spool.locate(sp, first).state == "done", what="the first opus task")
    opus, sonnet = api.submit(sp, "more opus", model="opus").id, api.submit(sp, "a sonnet one", model="sonnet").id
    wait_for(lambda: spool.locate(sp, sonnet).state == "done", what="the sonnet task")
    info = api.info(sp, opus)
    assert info.state == "queued" and info.attempts == 0 and "weekly Opus window is 90% used" in info.error
    assert abs(datetime.fromisoformat(info.not_before).timestamp() - reset) < 1
    assert (tmp_path / "argv").read_text().count("--model=opus") == 1  # the held one never ran


HOLD_UNTIL = 'read p; case "$p" in hold*) while [ ! -e "$0" ]; do sleep 0.01; done;; esac; echo "$p"'


def _in_process(sp: spool.Spool, drive: Callable[[], None]) -> None:
    """A daemon served in this process's main thread (its signal handlers need it) while `drive` runs in
    another thread, for tests that hold or count its parts; it stops when `drive` ends, whose error is raised."""
    import asyncio
    import threading

    from spoold import daemon as daemon_mod

    d, loops, failures = daemon_mod.Daemon(sp), [], []

    def driver() -> None:
        try:
            wait_for(lambda: loops, what="the daemon's loop")
            drive()
        except BaseException as e:  # raised again in the test's thread
            failures.append(e)
        finally:
            if loops:
                loops[0].call_soon_threadsafe(d.request_stop)

    async def serve() -> int:
        loops.append(asyncio.get_running_loop())
        return await d.run()

    thread = threading.Thread(target=driver)
    thread.start()
    try:
        assert asyncio.run(serve()) == 0
    finally:
        thread.join(60)
    if failures:
        raise failures[0]


def test_a_slot_freed_while_dropped_files_are_taken_in_starts_the_next_task(sp, tmp_path, monkeypatch) -> None:
    """Intake runs beside the claims: a batch being taken in (held here, as a slow disk would) never holds up
    the next start."""
    import threading

    from spoold import intake

    go = tmp_path / "go"
    write_config(sp, backend="command", command=["sh", "-c", HOLD_UNTIL, str(go)], concurrency=1)
    first, second = api.submit(sp, "hold").id, api.submit(sp, "then me").id
    entered, release = threading.Event(), threading.Event()
    scan = intake.scan

    def held_scan(*args: object, **kwargs: object) -> intake.IntakeReport:
        if kwargs.get("include_queued") is False:  # the inbox alone, beside the runs (not a turn's full scan)
            entered.set()
            release.wait(30)
        return scan(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(intake, "scan", held_scan)

    def drive() -> None:
        try:
            wait_for(lambda: spool.locate(sp, first).state == "running", what="first running")
            drop(sp, "third.md", "dropped while the first runs\n")
            wait_for(entered.is_set, what="intake of the dropped file")
            go.touch()
            wait_for(lambda: spool.locate(sp, second).state == "done", what="second done while intake is held")
            assert not release.is_set() and len(os.listdir(sp.dir("inbox"))) == 1
            release.set()
            wait_for(lambda: len(terminal_files(sp, "done")) == 3, what="the dropped file taken in and done")
        finally:
            release.set()

    _in_process(sp, drive)


def test_an_idle_daemon_does_not_spin(sp, monkeypatch) -> None:
    """An intake that found nothing must not wake the loop (a turn starts an intake: that would loop at full
    CPU with an empty queue). Counted in intake scans over half a second of nothing to do."""
    import time as time_mod

    from spoold import intake

    write_config(sp, backend="command", command=ECHO_COMMAND)
    scans, scan = [], intake.scan
    monkeypatch.setattr(intake, "scan", lambda *a, **k: scans.append(1) or scan(*a, **k))
    idle: list[int] = []

    def drive() -> None:
        drop(sp, "one.md", "one question\n")  # a turn, an intake and a run, then nothing to do
        wait_for(lambda: len(terminal_files(sp, "done")) == 1, what="the task done")
        before = len(scans)
        time_mod.sleep(0.5)  # (nothing to await: what is checked is that nothing happens)
        idle.append(len(scans) - before)

    _in_process(sp, drive)
    assert idle and idle[0] <= 3, f"{idle} intake scans in half a second of idling"


def test_a_listing_slower_than_the_scan_interval_still_serves_many_starts(sp, monkeypatch) -> None:
    """A deep queue's listing can take longer than the scan interval (a million names on a slow disk): the
    pass keeps it for an interval from when it was made, not from the last scan, or each start costs a
    listing. And a task's end (its answer so far removed) is no news that would end the pass."""
    import time as time_mod

    from spoold import daemon as daemon_mod

    write_config(sp, backend="command", command=ECHO_COMMAND, scan_interval_s=0.3, max_requests=100)
    ids = [api.submit(sp, f"question {i}").id for i in range(8)]
    listings, listed = [], daemon_mod.Daemon._list_queued

    def slow_listing(self: daemon_mod.Daemon) -> spool.QueuedListing:
        listings.append(1)
        time_mod.sleep(0.4)  # the slow listing itself (the condition under test, not a wait for an event)
        return listed(self)

    monkeypatch.setattr(daemon_mod.Daemon, "_list_queued", slow_listing)
    _in_process(sp, lambda: wait_for(lambda: all(spool.locate(sp, t).state == "done" for t in ids), timeout=60,
                                     what="all done"))
    assert len(listings) <= 4, f"{len(listings)} listings for 8 starts"


def test_the_first_dispatch_uses_the_full_scan_s_listing_of_an_unchanged_queue(sp, monkeypatch) -> None:
    """A daemon's first turn lists queued/ for foreign files, then for its dispatch: over a million queued tasks
    each listing and its checks took ~3 s. While queued/ is as the scan saw it, one listing serves both."""
    write_config(sp, backend="command", command=ECHO_COMMAND, max_requests=100)
    task_id = api.submit(sp, "question").id
    at_first_claim = _listings_at_claims(sp, monkeypatch)
    _in_process(sp, lambda: wait_for(lambda: spool.find_finished(sp, task_id), what="the task done"))  # (no listing)
    assert at_first_claim[0] == 1, f"queued/ listed {at_first_claim[0]} times before the first claim"


def _listings_at_claims(sp: spool.Spool, monkeypatch) -> list[int]:
    """How many times queued/ was listed before each claim (filled in as the daemon claims)."""
    import os as os_mod

    from spoold import transitions

    queued, listings, at_claims = str(sp.dir("queued")), [], []
    listdir, claim = os_mod.listdir, transitions.claim

    def counted_listdir(path: object = ".") -> list[str]:
        if str(path) == queued:
            listings.append(1)
        return listdir(path)  # type: ignore[arg-type]

    def noted_claim(*args: object, **kwargs: object) -> object:
        at_claims.append(len(listings))
        return claim(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os_mod, "listdir", counted_listdir)
    monkeypatch.setattr(transitions, "claim", noted_claim)
    return at_claims


def test_one_listing_of_the_queue_serves_every_start_of_the_first_pass(sp, monkeypatch) -> None:
    """Nothing the daemon does itself is news that ends a pass: not its watcher's start-up probe (over a million
    queued tasks that cost a second 3 s listing right after the first start), not its own claims and runs."""
    write_config(sp, backend="command", command=ECHO_COMMAND, max_requests=100, scan_interval_s=60)
    ids = [api.submit(sp, f"question {i}").id for i in range(6)]
    at_claims = _listings_at_claims(sp, monkeypatch)
    _in_process(sp, lambda: wait_for(lambda: all(spool.find_finished(sp, t) for t in ids), what="all done"))
    assert at_claims[:6] == [1] * 6, f"queued/ listings before each claim: {at_claims}"


def test_a_listing_serves_ten_times_what_it_took_before_the_queue_is_listed_again(sp, monkeypatch) -> None:
    """Over a deep queue the rescan interval grows with the listing (ten times what it takes): a million names
    listed in ~3 s every 5 s scan interval left a third of the time to starts."""
    import time as time_mod

    write_config(sp, backend="command", command=ECHO_COMMAND, scan_interval_s=0.1, max_requests=100)
    ids = [api.submit(sp, f"question {i}").id for i in range(12)]
    listings, list_queued = [], spool.list_queued

    def slow_listing(*args: object, **kwargs: object) -> spool.QueuedListing:
        listings.append(time_mod.monotonic())
        time_mod.sleep(0.2)  # a deep queue's listing (the condition under test, not a wait for an event)
        out = list_queued(*args, **kwargs)  # type: ignore[arg-type]
        out.seconds += 0.2
        return out

    monkeypatch.setattr(spool, "list_queued", slow_listing)
    began = time_mod.monotonic()
    _in_process(sp, lambda: wait_for(lambda: all(spool.locate(sp, t).state == "done" for t in ids), timeout=60,
                                     what="all done"))
    early = [t - began for t in listings if t - began < 1.9]  # within ten times the first listing (2 s)
    assert len(early) <= 2, f"queued/ listed at {early} s (scan interval 0.1 s, a listing 0.2 s)"


def _deep_listing(monkeypatch, extra_s: float) -> None:
    """Listings of queued/ report `extra_s` more than they took, as over a deep queue: the rescan interval
    becomes ten times that (a listing's cost, not a wait: nothing sleeps)."""
    list_queued = spool.list_queued

    def deep(*args: object, **kwargs: object) -> spool.QueuedListing:
        out = list_queued(*args, **kwargs)  # type: ignore[arg-type]
        out.seconds += extra_s
        return out

    monkeypatch.setattr(spool, "list_queued", deep)


def test_without_a_watcher_a_deep_queue_is_rescanned_every_scan_interval(sp, tmp_path, monkeypatch) -> None:
    """The rescan interval grows with the listing only while the watcher brings news: without one (inotify
    watches exhausted), a cancel of the running task waited for the long interval."""
    from spoold import watcher as watcher_mod

    monkeypatch.setattr(watcher_mod.Watcher, "_watch", lambda self, loop, stop: None)  # as an inotify limit would
    write_config(sp, backend="command", command=["sh", "-c", HOLD_UNTIL, str(tmp_path / "never")], concurrency=1,
                 max_requests=100, scan_interval_s=0.3, grace_s=0.2)
    first = api.submit(sp, "hold").id
    api.submit(sp, "then me")
    _deep_listing(monkeypatch, 2.0)  # a rescan every 20 s, were the watcher up
    took: list[float] = []

    def drive() -> None:
        wait_for(lambda: spool.locate(sp, first).state == "running", what="the first running")
        asked = time.monotonic()
        api.cancel(sp, first)
        wait_for(lambda: spool.locate(sp, first).state == "cancelled", timeout=30, what="the cancel carried out")
        took.append(time.monotonic() - asked)

    _in_process(sp, drive)
    assert took[0] < 5.0, f"the cancel took {took[0]:.1f} s with a scan interval of 0.3 s"


def test_a_drop_still_being_written_is_taken_in_soon_after_its_writer_closes_it(sp, tmp_path, monkeypatch) -> None:
    """A writer's close is no filesystem event: the daemon looks again itself, as inbox news that a pass
    waiting for a busy slot hears (it waited for the pass to end: up to the rescan interval)."""
    write_config(sp, backend="command", command=["sh", "-c", HOLD_UNTIL, str(tmp_path / "go")], concurrency=1,
                 max_requests=100, scan_interval_s=0.3)
    first = api.submit(sp, "hold").id
    api.submit(sp, "then me")
    _deep_listing(monkeypatch, 2.0)
    took: list[float] = []

    def drive() -> None:
        wait_for(lambda: spool.locate(sp, first).state == "running", what="the first running")
        with open(sp.dir("inbox") / "late.md", "w") as f:  # open while the daemon looks: not yet complete
            f.write("a late question\n")
            f.flush()
            wait_for(lambda: spool.locate(sp, first).state == "running", what="(still running)")
            time.sleep(0.5)  # held open past a look or two (the condition under test)
        closed = time.monotonic()
        wait_for(lambda: not (sp.dir("inbox") / "late.md").exists(), timeout=30, what="the drop taken in")
        took.append(time.monotonic() - closed)
        (tmp_path / "go").touch()

    _in_process(sp, drive)
    assert took[0] < 2.0, f"taken in {took[0]:.1f} s after its writer closed it"


def test_a_task_passed_over_as_not_yet_due_goes_first_once_due_in_a_long_pass(sp, tmp_path, monkeypatch) -> None:
    """A pass over a deep queue lasts ten times its listing, going on down its listing as slots free: an urgent
    task it passed over for its not_before must not wait behind the rest once it is due."""
    from datetime import UTC, datetime, timedelta

    order, go = tmp_path / "order", tmp_path / "go"
    in_order = 'read p; echo "$p" >> "$1"; case "$p" in hold*) while [ ! -e "$0" ]; do sleep 0.01; done;; esac'
    write_config(sp, backend="command", command=["sh", "-c", in_order, str(go), str(order)], concurrency=1,
                 max_requests=100, scan_interval_s=0.3)
    first = api.submit(sp, "hold").id
    due_at = datetime.now(UTC) + timedelta(seconds=1.0)
    timed = api.submit(sp, "urgent, when due", priority="urgent", not_before=due_at).id
    api.submit(sp, "normal")
    _deep_listing(monkeypatch, 2.0)

    def drive() -> None:
        wait_for(lambda: spool.locate(sp, first).state == "running", what="the first running")
        wait_for(lambda: datetime.now(UTC) > due_at + timedelta(seconds=0.5), what="the urgent task due a while")
        go.touch()
        wait_for(lambda: spool.locate(sp, timed).state == "done", timeout=30, what="the urgent task done")
        wait_for(lambda: len(order.read_text().split("\n")) > 3, what="all three run")

    _in_process(sp, drive)
    assert order.read_text().split() == ["hold", "urgent,", "when", "due", "normal"]


def test_files_taken_in_from_the_inbox_bring_no_news_but_their_drop(sp, monkeypatch) -> None:
    """The intake tells the watcher each queued/ name it links, so the only news of a drop is the drop itself:
    its copy appearing in queued/ (and its claim) used to be news again, a second turn and listing of the queue."""
    from spoold import watcher as watcher_mod

    write_config(sp, backend="command", command=ECHO_COMMAND, max_requests=100)
    batches, sort = [], watcher_mod.Watcher.sort

    def noted_sort(self: watcher_mod.Watcher, changes: set) -> tuple[bool, bool, bool]:
        out = sort(self, changes)
        batches.append((out, sorted(os.path.relpath(p, sp.root) for _, p in changes)))
        return out

    monkeypatch.setattr(watcher_mod.Watcher, "sort", noted_sort)

    def drive() -> None:
        for i in range(3):
            drop(sp, f"q{i}.md", f"question {i}\n")
            wait_for(lambda: len(terminal_files(sp, "done")) == i + 1, what=f"task {i} done")

    _in_process(sp, drive)
    elsewhere = [paths for (news, _, outside), paths in batches if news and outside]
    assert not elsewhere, f"news outside inbox/: {elsewhere}"


def test_a_file_written_straight_into_queued_is_taken_in_soon_after_its_writer_closes_it(sp) -> None:
    """Only a full scan looks at queued/: a foreign file seen there still being written (or, on a synced spool,
    just put in place) is looked at again by a full scan soon, not at the next scan interval."""
    write_config(sp, backend="command", command=ECHO_COMMAND, max_requests=100, scan_interval_s=30)
    took: list[float] = []

    def drive() -> None:
        with open(sp.dir("queued") / "foreign.md", "w") as f:  # open while the daemon looks: not yet complete
            f.write("a question from a foreign tool\n")
            f.flush()
            time.sleep(0.5)  # held open past the full scan the watcher's event brings (the condition under test)
        closed = time.monotonic()
        wait_for(lambda: len(terminal_files(sp, "done")) == 1, timeout=40, what="the foreign file's task done")
        took.append(time.monotonic() - closed)

    _in_process(sp, drive)
    assert took[0] < 5.0, f"taken in {took[0]:.1f} s after its writer closed it, with a scan interval of 30 s"


def test_run_once_takes_in_a_drop_still_being_written_when_it_starts(sp, daemon) -> None:
    """`run --once` from cron right after a drop (or a sync tool's arrival) must not end before the file is
    complete and leave it for the next run."""
    write_config(sp, backend="command", command=ECHO_COMMAND, max_requests=100)
    with open(sp.dir("inbox") / "late.md", "w") as f:
        f.write("a late question\n")
        f.flush()
        d = daemon(sp, args=["--once"])  # (returns once it serves)
        time.sleep(0.5)  # held open past its first look (the condition under test)
    assert d.proc.wait(30) == 0
    assert len(terminal_files(sp, "done")) == 1 and os.listdir(sp.dir("inbox")) == []


def test_a_foreign_file_held_open_in_queued_costs_a_few_full_scans_not_a_growing_stream(sp, monkeypatch) -> None:
    """Each full scan that finds it pending must not schedule a look of its own beside the one waiting (every
    watcher event of its writer started another chain: 10, 20, 29 ... full scans each half second)."""
    from spoold import intake as intake_mod

    write_config(sp, backend="command", command=ECHO_COMMAND, max_requests=100, scan_interval_s=30)
    full_scans: list[float] = []
    scan = intake_mod.scan

    def counted(*args: object, **kwargs: object) -> intake_mod.IntakeReport:
        if kwargs.get("include_queued"):
            full_scans.append(time.monotonic())
        return scan(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(intake_mod, "scan", counted)

    def drive() -> None:
        with open(sp.dir("queued") / "foreign.md", "w") as f:  # a writer that keeps it open, appending
            for i in range(6):
                f.write(f"line {i}\n")
                f.flush()
                time.sleep(0.4)
            began = full_scans[0] if full_scans else time.monotonic()
            held_for = time.monotonic() - began
        wait_for(lambda: len(terminal_files(sp, "done")) == 1, timeout=40, what="its task done once closed")
        assert len([t for t in full_scans if t - began <= held_for]) <= 16, (held_for, [round(t - began, 2) for t in full_scans])

    _in_process(sp, drive)
