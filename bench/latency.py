"""Drop → backend start on an idle daemon: p50/p99 over many drops, nothing subtracted."""

from __future__ import annotations

import time

from bench.common import (
    NOOP,
    Daemon,
    count_results,
    drop,
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

P50_TARGET, P99_TARGET = 0.015, 0.050


def run(quick: bool) -> str:
    drops = 100 if quick else 200
    with tmpdir("latency") as base:
        starts_file = base / "starts"
        root = new_spool(base, backend="command", command=[*NOOP, str(starts_file)], concurrency=1,
                         max_requests=1_000_000, window_minutes=60)
        lags: list[float] = []
        with Daemon(root):
            time.sleep(0.5)
            for i in range(drops):
                t0 = time.time()
                drop(root, f"q{i}.md", f"question {i}\n")
                wait_for(lambda: len(lines(starts_file)) > i, 10, f"start {i}")
                lags.append(float(lines(starts_file)[i]) - t0)
                wait_for(lambda: count_results(root) > i, 10, f"result {i}")
                time.sleep(0.03)  # let the daemon go idle again: every drop meets a sleeping loop
    p50, p99 = pct(lags, 50), pct(lags, 99)
    rows = [
        ["p50", ms(p50), target("drop → backend start, p50", ms(p50), f"≤ {P50_TARGET * 1000:g} ms", p50 <= P50_TARGET)],
        ["p99", ms(p99), target("drop → backend start, p99", ms(p99), f"≤ {P99_TARGET * 1000:g} ms", p99 <= P99_TARGET)],
        ["min / max", f"{ms(min(lags))} / {ms(max(lags))}", ""],
    ]
    note = (f"{drops} drops (write beside the spool, rename into `inbox/`), one at a time on an idle daemon; "
            "the clock stops when the backend (`sh -c 'date +%s.%N >> file'`) records its start. "
            f"Median {ms(median(lags))}.")
    return "### Latency: drop → backend start\n\n" + table(["", "latency", "target"], rows) + "\n\n" + note
