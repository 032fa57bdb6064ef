"""The limit on a controllable clock, budgets, holds, estimates and a damaged ledger."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
from conftest import start_one
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from spoold import ledger, spool, transitions
from spoold.config import Settings
from spoold.task import Task
from spoold.units import family_of

W = 3600.0


def settings(**kw: object) -> Settings:
    base = dict(max_requests=3, window_minutes=60, concurrency=10)
    base.update(kw)
    return Settings(**base)


def usage(starts: list[float], **kw: object) -> ledger.Usage:
    return ledger.Usage(starts=starts, spend=kw.get("spend", {}), durations=[], hold_until=kw.get("hold_until"),
                        hold_reason=kw.get("hold_reason"))


def test_n_starts_then_the_next_waits_exactly_for_the_first_to_leave() -> None:
    s = settings()
    starts = [1000.0, 1010.0, 1020.0]
    assert ledger.gate(usage(starts[:2]), s, 0, 1030).wait_until is None
    g = ledger.gate(usage(starts), s, 0, 1030)
    assert g.wait_until == 1000.0 + W and "3 starts per 60 min" in g.reason
    assert ledger.gate(usage(starts), s, 0, 1000.0 + W - 0.001).wait_until == 1000.0 + W
    assert ledger.gate(usage(starts), s, 0, 1000.0 + W + 0.001).wait_until is None


def test_sliding_window_never_admits_more_than_n_in_any_window() -> None:
    """Greedy admission on a fine clock: every window of length W holds at most N starts."""
    s = settings(max_requests=5, window_minutes=1)
    starts: list[float] = []
    t = 0.0
    while t < 600:
        if ledger.gate(usage(starts), s, 0, t).wait_until is None:
            starts.append(t)
        t += 0.25
    for i, a in enumerate(starts):
        assert sum(1 for b in starts[i:] if b < a + 60) <= 5
    assert len(starts) == 5 * 10  # and it is not stingier than the limit


def test_min_interval_and_concurrency() -> None:
    s = settings(min_interval_s=360)
    assert ledger.gate(usage([1000.0]), s, 0, 1100).wait_until == 1360.0
    busy = ledger.gate(usage([]), settings(concurrency=1), 1, 0)
    assert busy.waits and busy.wait_until is None and "waiting for a running task" in (busy.reason or "")


def test_clock_going_back_still_holds_the_limit() -> None:
    s = settings()
    future = [5000.0, 5001.0, 5002.0]  # stamped before the clock went back to 1000
    g = ledger.gate(usage(future), s, 0, 1000.0)
    assert g.wait_until == 1000.0 + W  # counted as 'now', not forgotten and not a day-long stall


def test_hold_and_budget() -> None:
    s = settings(budget_day_usd=1.0)
    now = 1_700_000_000.0
    g = ledger.gate(usage([], hold_until=now + 50, hold_reason="usage limit"), s, 0, now)
    assert g.wait_until == now + 50 and g.reason == "usage limit"
    day = ledger.datetime.fromtimestamp(now, ledger.UTC).strftime("%Y-%m-%d")
    g = ledger.gate(usage([], spend={day: 1.2}), s, 0, now)
    assert "daily budget" in g.reason and g.wait_until > now
    g = ledger.gate(usage([], spend={day: 0.5}), s, 0, now)
    assert g.wait_until is None


def _queue(sp: spool.Spool, n: int) -> list[str]:
    ids = []
    for i in range(n):
        t = Task(id=spool.new_id(f"t{i}"), prompt=f"t{i}\n")
        transitions.enqueue(sp, t)
        ids.append(t.id)
    return ids


def test_estimates_follow_the_formula(sp: spool.Spool) -> None:
    """Under N per W the k-th start is the start N places earlier plus W."""
    s = settings(max_requests=2, window_minutes=60, concurrency=5)
    ids = _queue(sp, 5)
    now = 10_000.0
    u = usage([now - 600])  # one start 10 min ago: one slot free now
    est = ledger.estimate(sp, s, now=now, usage=u)
    assert [e.task_id for e in est] == ids and [e.position for e in est] == [1, 2, 3, 4, 5]
    assert [e.start for e in est] == [now, now - 600 + W, now + W, now - 600 + 2 * W, now + 2 * W]


def test_estimates_respect_workers_and_holds(sp: spool.Spool) -> None:
    s = settings(max_requests=100, concurrency=1)
    _queue(sp, 3)
    now = 10_000.0
    u = usage([])
    u.durations = [30.0, 30.0, 500.0]  # the median, not the outlier
    est = ledger.estimate(sp, s, now=now, usage=u)
    assert [e.start for e in est] == [now, now + 30, now + 60]
    u.hold_until = now + 1000
    assert ledger.estimate(sp, s, now=now, usage=u)[0].start == now + 1000


def test_a_start_is_recorded_under_the_lock(sp: spool.Spool) -> None:
    s = settings(max_requests=1)
    claimed, g = start_one(sp, s, lambda t: "x", now=lambda: 100.0)
    assert claimed == "x" and ledger.read_usage(sp, 100.0).starts == [100.0]
    claimed, g = start_one(sp, s, lambda t: "y", now=lambda: 101.0)
    assert claimed is None and g.wait_until == 100.0 + W


def test_damaged_ledger_is_kept_aside_and_rebuilt_not_emptied(sp: spool.Spool) -> None:
    s = settings(max_requests=1)
    _queue(sp, 1)
    claimed, _ = start_one(sp, s, lambda t: transitions.claim(sp, spool.list_queued(sp)[0], "sonnet", started=t))
    assert claimed is not None
    path = ledger.host_file(sp)
    path.write_text("{not json")
    u = ledger.read_usage(sp)
    assert len(u.starts) == 1  # rebuilt from the running task's started_at
    assert any(n.startswith(path.name + ".damaged-") for n in os.listdir(path.parent))
    assert json.loads(path.read_text())["starts"]


def test_hosts_files_are_joined(sp: spool.Spool) -> None:
    d = ledger.ledger_dir(sp)
    d.mkdir(parents=True, exist_ok=True)
    (d / "laptop.json").write_text(json.dumps({"starts": [100.0, 200.0], "spend": {"2026-11-24": 1.0}}))
    (d / "desktop.json").write_text(json.dumps({"starts": [150.0], "spend": {"2026-11-24": 0.5}}))
    u = ledger.read_usage(sp, 300.0)
    assert u.starts == [100.0, 150.0, 200.0] and u.spend == {"2026-11-24": 1.5}


@pytest.mark.parametrize("strategy", ["fifo", "lifo"])
def test_strategies(sp: spool.Spool, strategy: str) -> None:
    ids = _queue(sp, 3)
    order = [e.task_id for e in ledger.dispatch_order(spool.list_queued(sp), strategy)]
    assert order == (ids if strategy == "fifo" else ids[::-1])


def test_hold_is_shared_and_can_be_cleared(sp: spool.Spool) -> None:
    s = settings()
    ledger.set_hold(sp, s, 4_000_000_000.0, "usage limit")
    assert ledger.read_usage(sp).hold_reason == "usage limit"
    d = ledger.ledger_dir(sp)
    (d / "otherhost.json").write_text(json.dumps({"hold_until": 4_000_000_001.0, "hold_reason": "theirs",
                                                  "hold_set_at": 1.0}))
    assert ledger.read_usage(sp).hold_reason == "theirs"
    ledger.clear_hold(sp, s)
    assert ledger.read_usage(sp).hold_until is None
    assert json.loads((d / "otherhost.json").read_text())["hold_reason"] == "theirs"  # their file untouched


def test_a_hold_for_a_host_s_own_cli_holds_that_host_alone_and_ends_when_its_cli_runs(sp: spool.Spool) -> None:
    """A synced spool: one host without a working claude must not stop every host's queue."""
    s = settings()
    d = ledger.ledger_dir(sp)
    d.mkdir(parents=True, exist_ok=True)
    (d / "otherhost.json").write_text(json.dumps({"hold_until": 4_000_000_001.0, "hold_set_at": 1.0,
                                                  "hold_reason": "claude CLI not found", "hold_here": True}))
    assert ledger.read_usage(sp).hold_until is None  # theirs: their CLI, not the account
    ledger.set_hold(sp, s, 4_000_000_000.0, "claude CLI not found ('claude')", this_host=True)
    assert ledger.read_usage(sp).hold_reason == "claude CLI not found ('claude')"  # ours holds us
    assert json.loads(ledger.host_file(sp).read_text())["hold_here"] is True
    assert ledger.clear_host_hold(sp, s) and ledger.read_usage(sp).hold_until is None
    ledger.set_hold(sp, s, 4_000_000_000.0, "usage limit")  # the account's: never lifted by a CLI that runs
    assert not ledger.clear_host_hold(sp, s) and ledger.read_usage(sp).hold_reason == "usage limit"
    assert "hold_here" not in json.loads(ledger.host_file(sp).read_text())


def test_a_host_s_own_cli_hold_never_replaces_a_live_hold_of_every_host(sp: spool.Spool) -> None:
    """A usage limit until its reset, then this host's CLI goes missing: the 60 s host hold must not take the
    account hold's place in the file (the other hosts would start, and meet the limit, at once)."""
    s = settings()
    ledger.set_hold(sp, s, 4_000_000_000.0, "usage limit")
    ledger.set_hold(sp, s, 3_000_000_000.0, "claude CLI not found ('claude')", this_host=True)
    own = json.loads(ledger.host_file(sp).read_text())
    assert own["hold_reason"] == "usage limit" and "hold_here" not in own
    ledger.clear_hold(sp, s)  # a person lifted it: now this host's own hold is recorded
    ledger.set_hold(sp, s, 4_100_000_000.0, "claude CLI not found ('claude')", this_host=True)
    assert json.loads(ledger.host_file(sp).read_text())["hold_here"] is True


def _hammer(root: str, until: float, out: Any) -> None:
    """One competing process: take every slot it can until `until`."""
    import time

    sp = spool.open_spool(root)
    s = settings(max_requests=10, window_minutes=0.5 / 60)
    mine: list[float] = []
    while time.time() < until:
        token, g = start_one(sp, s, lambda t: t)
        if token is not None:
            mine.append(token)
        elif g.wait_until:
            time.sleep(min(0.01, max(0.0, g.wait_until - time.time())))
    out.put(mine)


def test_competing_processes_never_exceed_the_window_together(sp: spool.Spool) -> None:
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    until = time.time() + 3.0
    procs = [ctx.Process(target=_hammer, args=(str(sp.root), until, out)) for _ in range(4)]
    for p in procs:
        p.start()
    per_proc = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    times = sorted(t for mine in per_proc for t in mine)
    assert sum(1 for mine in per_proc if mine) >= 2  # they really competed
    worst = max(sum(1 for b in times[i:] if b < a + 0.5) for i, a in enumerate(times))
    assert worst == 10 and len(times) >= 20  # the limit, exactly, and not stingier


def test_a_batch_of_starts_is_gated_as_it_goes_and_written_once(sp: spool.Spool) -> None:
    """start_many counts the batch's own earlier starts: 3 per window admits 3 of 5, then says wait."""
    s = settings(max_requests=3)
    writes = []
    real = ledger._write_host
    ledger._write_host = lambda *a: (writes.append(a), real(*a))  # type: ignore[assignment]
    try:
        out, g = ledger.start_many(sp, s, iter(range(5)), lambda c, t: f"task{c}", 10, now=lambda: 500.0)
    finally:
        ledger._write_host = real  # type: ignore[assignment]
    assert out == ["task0", "task1", "task2"] and g.wait_until == 500.0 + W
    assert len(writes) == 1 and ledger.read_usage(sp, 500.0).starts == [500.0] * 3


def test_a_batch_skips_what_others_took_and_stops_at_concurrency(sp: spool.Spool) -> None:
    out, g = ledger.start_many(sp, settings(max_requests=100), iter(range(5)), lambda c, t: None if c % 2 == 0 else c,
                               10, now=lambda: 1.0)
    assert out == [1, 3] and g.wait_until is None  # 0, 2, 4 were taken by someone else; the candidates ran out
    s = settings(max_requests=100, concurrency=2)
    _queue(sp, 3)
    [a, b, c] = spool.list_queued(sp)
    out, g = ledger.start_many(sp, s, iter([a, b, c]), lambda e, t: transitions.claim(sp, e, "sonnet", started=t), 10)
    assert [x.task.id for x in out] == [a.task_id, b.task_id] and g.waits and g.wait_until is None
    # A running task whose process has exited (its outcome is being written) holds no slot.
    out, _ = ledger.start_many(sp, s, iter([c]), lambda e, t: transitions.claim(sp, e, "sonnet", started=t), 1,
                               finishing=frozenset({a.task_id}))
    assert [x.task.id for x in out] == [c.task_id]


def test_a_failed_claim_after_others_keeps_the_ones_that_started(sp: spool.Spool) -> None:
    s = settings(max_requests=100)

    def claim(c: int, t: float) -> int:
        if c == 2:
            raise OSError(28, "No space left on device")
        return c

    out, _ = ledger.start_many(sp, s, iter(range(5)), claim, 10, now=lambda: 7.0)
    assert out == [0, 1] and ledger.read_usage(sp, 7.0).starts == [7.0, 7.0]
    with pytest.raises(OSError):
        ledger.start_many(sp, s, iter([2]), claim, 10)


def test_run_times_ride_along_but_spend_is_written_at_once(sp: spool.Spool) -> None:
    s = settings()
    path = ledger.host_file(sp)
    ledger.record_finish(sp, s, None, 12.5)
    assert not path.exists()  # a run time alone waits for the next write
    ledger.record_finish(sp, s, 0.25, 3.0)
    on_disk = json.loads(path.read_text())
    assert sum(on_disk["spend"].values()) == 0.25 and on_disk["durations"] == [3.0, 12.5]
    ledger.record_finish(sp, s, None, 7.0)
    ledger.flush(sp, s)
    assert json.loads(path.read_text())["durations"] == [3.0, 12.5, 7.0]


def test_the_estimate_from_names_alone_agrees_with_the_one_from_entries(sp: spool.Spool) -> None:
    """Without not_before the estimate reads ids from the names alone; it must give the very same times."""
    _queue(sp, 40)
    s = settings(max_requests=7, window_minutes=1, concurrency=3, min_interval_s=2.0)
    u = usage([1000.0, 1001.0, 1030.0])
    u.durations = [12.0]
    listing = spool.list_queued(sp)
    fast = ledger.estimate(sp, s, listing, now=1040.0, usage=u)
    slow = ledger.estimate(sp, s, list(listing), now=1040.0, usage=u)  # a plain list: parsed entries
    assert fast == slow and len(fast) == 40 and fast[0].start == 1040.0
    assert ledger.estimate(sp, s, listing, limit=5, now=1040.0, usage=u) == slow[:5]


def test_lowering_and_raising_the_limit_within_a_window_forgets_no_start(sp: spool.Spool) -> None:
    import time

    t0 = time.time()
    out, _ = ledger.start_many(sp, settings(max_requests=10), iter(range(10)), lambda c, t: c, 10, now=lambda: t0)
    assert len(out) == 10
    ledger.set_hold(sp, settings(max_requests=5), 0.0, "a ledger write under the lowered limit")
    _, g = ledger.start_many(sp, settings(max_requests=10), iter([0]), lambda c, t: c, 1, now=lambda: t0 + 1)
    assert g.wait_until == t0 + W  # still ten starts in the window


def _seen(util: float | None, resets_at: float, seen_at: float, status: str = "allowed_warning") -> ledger.WindowSeen:
    return ledger.WindowSeen(status, resets_at, util, seen_at, "task-x")


def test_reserve_stops_starts_at_the_threshold_until_the_window_resets() -> None:
    now = 1_700_000_000.0
    s = settings(reserve=0.2)
    below = usage([])
    below.windows = {"five_hour": _seen(0.79, now + 600, now - 1)}
    assert ledger.gate(below, s, 0, now).wait_until is None
    at = usage([])
    at.windows = {"five_hour": _seen(0.85, now + 600, now - 1), "seven_day": _seen(0.5, now + 86400, now - 1)}
    g = ledger.gate(at, s, 0, now)
    assert g.wait_until == now + 600
    assert g.reason == "reserve: the 5-hour window is 85% used (starts stop at 80%, keeping 20% for you)"
    assert ledger.gate(at, s, 0, now + 601).wait_until is None  # the window reset: starts go on
    assert ledger.gate(at, settings(), 0, now).wait_until is None  # no reserve set: only the subscription's own limit


def test_reserve_hold_moves_the_estimates(sp: spool.Spool) -> None:
    now = 1_700_000_000.0
    _queue(sp, 2)
    u = usage([])
    u.windows = {"seven_day": _seen(0.95, now + 7200, now)}
    est = ledger.estimate(sp, settings(reserve=0.1), now=now, usage=u)
    assert [e.start for e in est] == [now + 7200, now + 7200]


def test_windows_newest_word_wins_across_hosts_and_a_reset_window_is_forgotten(sp: spool.Spool) -> None:
    now = 1_700_000_000.0
    d = ledger.ledger_dir(sp)
    d.mkdir(parents=True, exist_ok=True)
    for host, util, seen in (("laptop", 0.9, now - 50), ("desktop", 0.4, now - 10)):
        (d / f"{host}.json").write_text(json.dumps({"windows": {
            "five_hour": _seen(util, now + 100, seen).as_json(),
            "seven_day": _seen(util, now - 1, seen).as_json()}}))
    u = ledger.read_usage(sp, now)
    assert set(u.windows) == {"five_hour"} and u.windows["five_hour"].utilization == 0.4


def test_a_finished_run_records_what_the_subscription_said(sp: spool.Spool) -> None:
    now = time.time()
    ledger.record_finish(sp, settings(), None, 1.5, {"five_hour": _seen(0.81, now + 999, now)})
    u = ledger.read_usage(sp)
    assert u.windows["five_hour"].utilization == 0.81 and u.windows["five_hour"].task_id == "task-x"


def test_a_family_window_holds_only_that_familys_tasks() -> None:
    now = 1_700_000_000.0
    u = usage([])
    u.windows = {"seven_day_opus": _seen(0.9, now + 3600, now), "five_hour": _seen(0.3, now + 600, now)}
    holds = ledger.reserve_holds(u, settings(reserve=0.2), now)
    assert set(holds) == {"opus"} and holds["opus"][0] == now + 3600 and "weekly Opus window is 90% used" in holds["opus"][1]
    assert ledger.gate(u, settings(reserve=0.2), 0, now).wait_until is None  # sonnet and haiku tasks still start
    assert [family_of(m) for m in ("opus", "claude-opus-4-5", "sonnet", "haiku")] == ["opus", "opus", "sonnet", None]


def test_a_running_task_past_its_typical_time_pushes_the_next_start_out(sp: spool.Spool) -> None:
    """One slot, a task running for 100 s where tasks usually take 10 s: the next is not 'in 0 s'."""
    from datetime import UTC, datetime

    _queue(sp, 2)
    c = transitions.claim(sp, spool.list_queued(sp)[0], "sonnet", started=1000.0)
    assert c is not None and c.started == datetime.fromtimestamp(1000.0, UTC)
    u = usage([1000.0])
    u.durations = [10.0]
    [est] = ledger.estimate(sp, settings(concurrency=1, max_requests=100), now=1100.0, usage=u)
    assert est.start == 1200.0  # as long again as it has run so far
    [early] = ledger.estimate(sp, settings(concurrency=1, max_requests=100), now=1002.0, usage=u)
    assert early.start == 1010.0  # within its typical time: a typical duration after its start


@hsettings(max_examples=300, deadline=None)
@given(c=st.integers(1, 8), n=st.integers(1, 40), w=st.floats(1, 3600), gap=st.sampled_from([0.0, 0.5, 7.0]),
       dur=st.floats(0.1, 900), position=st.integers(1, 3000), busy=st.lists(st.floats(0, 600), max_size=8),
       past=st.lists(st.floats(0, 3600), max_size=40), hold=st.floats(0, 100))
def test_a_deep_queue_start_jumps_to_the_same_answer_as_simulating_it(c: int, n: int, w: float, gap: float,
        dur: float, position: int, busy: list[float], past: list[float], hold: float) -> None:
    now = 10_000.0
    workers = sorted([now + b for b in busy][:c] + [now] * max(0, c - len(busy)))
    starts = sorted(now - p for p in past if p < w)
    floor = now + hold
    got = ledger.untimed_start(position, floor, workers, starts, dur, c, n, w, gap)
    want = ledger.untimed_start(position, floor, workers, starts, dur, c, n, w, gap, jump=False)
    assert abs(got - want) <= 1e-6 * max(1.0, want - now), (got, want)


def test_a_start_behind_100000_queued_is_found_without_walking_them() -> None:
    import time as _time

    t = _time.perf_counter()
    got = ledger.untimed_start(100_000, 0.0, [0.0] * 4, [], 60.0, 4, 50, 18_000.0, 0.0)
    took = _time.perf_counter() - t
    assert got == pytest.approx(ledger.untimed_start(100_000, 0.0, [0.0] * 4, [], 60.0, 4, 50, 18_000.0, 0.0, jump=False))
    assert took < 0.05, f"{took:.3f} s: the jump did not happen"


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.floats(), max_size=50), st.lists(st.floats(), max_size=50), st.integers(0, 60))
def test_the_ledger_writes_its_floats_as_json_does(tmp_path_factory: Any, first: list[float], then: list[float],
                                                   pruned: int) -> None:
    """Each write starts from the texts of the last one (a window's starts: a few gone from the front, a few
    new at the end): what it writes must be what json.dumps writes, whatever the lists."""
    sp = spool.open_spool(tmp_path_factory.mktemp("s"))
    for xs in (first, first[pruned:] + then, sorted(first), sorted(first)[pruned:] + sorted(then), then,
               [0.0, -0.0, 1.0], [-0.0, 1.0, 2.0], [1.0, 2.0, 3.0]):
        assert ledger._floats_json(sp, xs) == json.dumps(xs, separators=(",", ":"))


def test_a_filesystem_without_flock_falls_back_to_filelock(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    sp = spool.open_spool(tmp_path / "s")

    def no_flock(_sp: spool.Spool) -> int:
        raise OSError(errno.ENOSYS, "flock not supported")

    monkeypatch.setattr(ledger, "_lock_ledger", no_flock)
    with ledger.locked(sp):
        assert sp.local.ledger_lock == "filelock" and spool.ledger_lock_path(sp).exists()
    with ledger.locked(sp):  # and it stays so for this spool, without trying flock again
        pass
    monkeypatch.setattr(ledger, "_lock_ledger", lambda _sp: (_ for _ in ()).throw(OSError(errno.EIO, "eio")))
    sp2 = spool.open_spool(tmp_path / "s2")
    with pytest.raises(OSError, match="eio"), ledger.locked(sp2):
        pass
