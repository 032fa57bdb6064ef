"""The rate limit on a no-op backend: start lag after a slot opens, estimate error, ledger admission throughput."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench.common import (
    NOOP,
    PY,
    ROOT,
    Daemon,
    child_env,
    count_results,
    lines,
    median,
    ms,
    new_spool,
    pct,
    table,
    target,
    tmpdir,
    wait_for,
)

N, WINDOW_S = 2, 1.0  # 2 starts per rolling second: every start after the first two waits for a slot


def _started_at(root: Path) -> dict[str, float]:
    """Each finished task's admission stamp (its result's `started_at`, the very time the ledger counts)."""
    from spoold import spool
    from spoold.task import parse_result

    out = {}
    for d in spool.terminal_dirs(spool.open_spool(root, create=False), "done"):
        for name in os.listdir(d):
            if name.endswith(".result.md"):
                res = parse_result((d / name).read_text())
                if res.started_at is not None:
                    out[res.id] = res.started_at.timestamp()
    return out


def lag_and_estimates(k: int) -> tuple[list[float], list[float]]:
    from spoold import api, ledger, spool, transitions
    from spoold.task import Task

    with tmpdir("limit") as base:
        starts_file = base / "starts"
        root = new_spool(base, backend="command", command=[*NOOP, str(starts_file)], concurrency=1,
                         max_requests=N, window_minutes=WINDOW_S / 60)
        sp = spool.open_spool(root)
        with Daemon(root):
            for i in range(N):  # warm-up: fill the window and give the ledger stable durations
                transitions.enqueue(sp, Task(id=spool.new_id(f"warm {i}"), prompt="warm\n"))
            wait_for(lambda: count_results(root) >= N, 30, "warm-up", poll=0.005)
            settings = api.load_settings(sp)
            ids = []
            for i in range(k):
                t = Task(id=spool.new_id(f"task {i}"), prompt=f"task {i}\n")
                transitions.enqueue(sp, t)
                ids.append(t.id)
            est = {e.task_id: e.start for e in ledger.estimate(sp, settings)}  # what each had when queued
            wait_for(lambda: count_results(root) >= N + k, 30 + 2 * k * WINDOW_S / N, "all tasks", poll=0.01)
        admitted = _started_at(root)
        proc_starts = sorted(float(x) for x in lines(starts_file))
    order = sorted(admitted.values())
    lags = [proc_starts[i] - (order[i - N] + WINDOW_S) for i in range(N, len(order))]
    errors = [abs(admitted[t] - est[t]) for t in ids if t in est]
    return lags, errors


ADMIT = """
import sys, time
from spoold import config, ledger, spool
sp = spool.open_spool(sys.argv[1], create=False)
settings = config.Settings(max_requests=10**9, window_minutes=0.01)
t0, dur = float(sys.argv[2]), float(sys.argv[3])
while time.time() < t0:
    time.sleep(0.0005)
n = 0
while time.time() < t0 + dur:
    claimed, _ = ledger.start_many(sp, settings, [None], lambda _c, t: True, 1)
    n += claimed == [True]
print(n)
"""


def admissions(procs: int, dur: float) -> float:
    with tmpdir("admit") as base:
        root = new_spool(base)
        t0 = time.time() + 0.5
        ps = [subprocess.Popen([PY, "-c", ADMIT, str(root), str(t0), str(dur)], stdout=subprocess.PIPE, text=True,
                               env=child_env(), cwd=ROOT) for _ in range(procs)]
        total = sum(int(p.communicate()[0]) for p in ps)
    return total / dur


def run(quick: bool) -> str:
    k, repeats, dur = (10, 1, 1.0) if quick else (30, 3, 2.0)
    lags, errors = [], []
    for _ in range(repeats):
        lg, er = lag_and_estimates(k)
        lags += lg
        errors += er
    rows = [
        ["start lag after a slot opens", ms(pct(lags, 50)), ms(pct(lags, 99)), ms(max(lags)), f"{len(lags)} starts"],
        ["estimate error (absolute)", ms(pct(errors, 50)), ms(pct(errors, 99)), ms(max(errors)),
         f"{len(errors)} tasks; " + target("estimate error (worst of every task)", ms(max(errors)),
                                           "≤ max(1 s, 2 %)", max(errors) <= 1.0)],
    ]
    out = "### Rate limit (issue 3)\n\n" + table(["", "p50", "p99", "max", "samples"], rows)
    out += (f"\n\n{N} starts per rolling {WINDOW_S:g} s, concurrency 1, no-op `command` backend; {k} tasks queued behind "
            f"a full window, {repeats} run(s). Lag: the backend process's own start stamp minus the moment the slot "
            "opened (the start N places earlier + the window). Error: the admission stamp minus the estimate "
            "`ledger.estimate` gave right after the task was queued.")
    arows = []
    for procs in (1, 2, 4):
        rates = [admissions(procs, dur) for _ in range(repeats)]
        arows.append([str(procs), f"{median(rates):,.0f}"])
    out += "\n\n" + table(["competing processes", "admissions/s (all processes)"], arows)
    out += (f"\n\nEach process loops `ledger.start_many` for one start (lock, read every host's ledger, gate, record the start, "
            f"atomic fsynced rewrite) for {dur:g} s; median of {repeats} run(s).")
    return out
