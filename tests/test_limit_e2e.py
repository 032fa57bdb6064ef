"""The limit and the estimates, with real daemon processes sharing one spool."""

from __future__ import annotations

import sys

from conftest import terminal_files, wait_for, worst_window, write_config

from spoold import api, spool
from spoold.task import parse_result

QUICK = [sys.executable, "-c", "import sys; sys.stdin.read(); print('ok')"]


def _started(sp: spool.Spool) -> list[tuple[float, str]]:
    out = []
    for p in terminal_files(sp, "done"):
        res = parse_result(spool.result_path_for(p.parent, p.name[:-3]).read_text())
        assert res.started_at is not None
        out.append((res.started_at.timestamp(), res.id))
    return sorted(out)


def test_three_daemons_share_the_limit_and_never_run_a_task_twice(sp, daemon, stress) -> None:
    n_tasks = 600 if stress else 150
    window_s, per_window = 1.2, 20
    write_config(sp, backend="command", command=QUICK, max_requests=per_window, window_minutes=window_s / 60,
                 concurrency=4, scan_interval_s=0.5)
    for i in range(n_tasks):
        api.submit(sp, f"task {i}")
    daemons = [daemon(sp) for _ in range(3)]
    wait_for(lambda: len(terminal_files(sp, "done")) == n_tasks, timeout=120, what="all done")
    starts = _started(sp)
    assert len({tid for _, tid in starts}) == n_tasks  # each task exactly once
    times = [t for t, _ in starts]
    worst = worst_window(times, window_s)
    assert worst <= per_window, f"{worst} starts in one {window_s} s window"
    logs = "".join(d.log for d in daemons)
    assert logs.count("spoold: running ") == n_tasks


def test_each_task_starts_when_its_estimate_said(sp, daemon) -> None:
    """Stable durations: every actual start is within max(1 s, 2 %) of the estimate made at submission."""
    sleeper = [sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(0.4); print('ok')"]
    write_config(sp, backend="command", command=sleeper, max_requests=3, window_minutes=3 / 60, concurrency=1)
    warm = daemon(sp)
    for i in range(3):
        api.submit(sp, f"warm-up {i}")
    wait_for(lambda: len(terminal_files(sp, "done")) == 3, timeout=60, what="warm-up")
    warm.stop()
    write_config(sp, backend="command", command=sleeper, max_requests=3, window_minutes=3 / 60, concurrency=1)
    infos = [api.submit(sp, f"measured {i}") for i in range(7)]
    daemon(sp)
    wait_for(lambda: len(terminal_files(sp, "done")) == 10, timeout=60, what="all done")
    for ti in infos:
        est = api.datetime.fromisoformat(ti.estimated_start).timestamp()
        actual = api.info(sp, ti.id).started_at
        actual_ts = api.datetime.fromisoformat(actual).timestamp()
        wait = max(0.0, est - api.datetime.fromisoformat(ti.submitted_at).timestamp())
        assert abs(actual_ts - est) <= max(1.0, 0.02 * wait), (ti.position, est, actual_ts)
