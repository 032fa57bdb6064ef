"""A deep queue (first dispatch, `status`, `ls`, memory) and a full `done/` (`status`, `ls`, `show`, `result`), at 10k/50k/100k."""

from __future__ import annotations

import itertools
import math
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import (
    NOOP,
    Daemon,
    child_env,
    cpu_s,
    lines,
    median,
    new_spool,
    rss_mb,
    spoold_exe,
    table,
    target,
    tmpdir,
    wait_for,
)

# targets by queue depth (the issue's), checked at each size that has one
QUEUED_TARGETS = {
    100_000: {"first": 2.0, "status": 0.5, "submit": 0.050, "rss": 100.0, "peak": 100.0},
    1_000_000: {"first": 5.0, "status": 1.0, "rss": 200.0, "peak": 200.0},
}
DONE_TARGETS = {100_000: {"status": 0.2, "rss": 100.0}}
PARTITIONS = 30  # finished tasks spread over a month of date partitions
IDLE_S = 5.0  # an idle daemon's CPU is counted over this long
RATE_WINDOW_S = 8.0  # the dispatch rate is counted over this long after the first start (the scan interval is 5 s)


def fill(root: Path, n: int) -> None:
    """n queued tasks in the spool's own format (rendered once, ids swapped in), written without fsync: setup only."""
    from spoold import spool
    from spoold.task import Task, render_task

    sp = spool.open_spool(root)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    proto_id = spool.new_id("task", now=t0)
    proto = render_task(Task(id=proto_id, prompt="summarize chapter\n", submitted_at=t0, source="bulk"))
    qdir = sp.dir("queued")
    for i in range(n):
        now = t0 + timedelta(milliseconds=i)
        tid = spool.new_id("task", now=now)
        data = proto.replace(proto_id.encode(), tid.encode())
        stamp = now.isoformat(timespec="milliseconds").replace("+00:00", "Z").encode()
        data = data.replace(b"2026-01-01T00:00:00.000Z", stamp)
        with open(qdir / spool.queued_name(tid, "normal", None), "wb") as f:
            f.write(data)


def fill_done(root: Path, n: int) -> str:
    """n finished tasks (task file and result) over PARTITIONS date partitions, as a month of use leaves them."""
    from spoold import spool
    from spoold.task import Result, Task, render_result, render_task

    sp = spool.open_spool(root)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    proto_id = spool.new_id("task", now=t0)
    task = render_task(Task(id=proto_id, prompt="summarize chapter\n", submitted_at=t0))
    result = render_result(Result(id=proto_id, status="done", answer="a summary", finished_at=t0))
    dirs = [spool.date_dir(sp, "done", t0 + timedelta(days=k)) for k in range(PARTITIONS)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    middle = ""
    for i in range(n):
        day = i * PARTITIONS // n
        d = dirs[day]
        tid = spool.new_id("task", now=t0 + timedelta(days=day, milliseconds=i))
        (d / f"{tid}.md").write_bytes(task.replace(proto_id.encode(), tid.encode()))
        (d / f"{tid}.result.md").write_bytes(result.replace(proto_id.encode(), tid.encode()))
        middle = tid if i == n // 2 else middle
    return middle


def measure_done(n: int, runs: int) -> dict[str, float]:
    with tmpdir(f"scale-done-{n}") as base:
        root = new_spool(base, backend="command", command=["true"])
        some_id = fill_done(root, n)
        env = child_env(SPOOLD_DIR=str(root))
        exe = spoold_exe()
        out = {
            "status": median([_timed([exe, "status"], env) for _ in range(runs)]),
            "ls": median([_timed(f"'{exe}' ls --state done | head", env, shell=True) for _ in range(runs)]),
            "show": median([_timed([exe, "show", some_id], env) for _ in range(runs)]),
            "result": median([_timed([exe, "result", some_id], env) for _ in range(runs)]),
        }
        with Daemon(root) as d:
            time.sleep(1.0)  # past its start-up (its first scan, the CLI check)
            before = cpu_s(d.proc.pid)
            time.sleep(IDLE_S)  # (what is measured is the daemon doing nothing)
            out["idle_cpu"] = (cpu_s(d.proc.pid) - before) / IDLE_S
            out["rss"] = rss_mb(d.proc.pid)[1]
    return out


def _timed(cmd: str | list[str], env: dict[str, str], shell: bool = False) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, shell=shell, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def measure(n: int, runs: int, daemon_runs: int) -> dict[str, float]:
    with tmpdir(f"scale-{n}") as base:
        starts = base / "starts"
        root = new_spool(base, backend="command", command=[*NOOP, str(starts)], concurrency=1,
                         max_requests=1_000_000, window_minutes=60)
        fill(root, n)
        env = child_env(SPOOLD_DIR=str(root))
        exe = spoold_exe()
        first_status = _timed([exe, "status"], env)  # lists and checks every name, then keeps the census
        status = [_timed([exe, "status"], env) for _ in range(runs)]
        ls = [_timed(f"'{exe}' ls --state queued | head", env, shell=True) for _ in range(runs)]
        submit = [_timed([exe, "submit", "one more question"], env) for _ in range(runs)]
        firsts, rss, peak, rate = [], [], [], []
        for _ in range(daemon_runs):
            before = len(lines(starts))
            d = Daemon(root, wait_serving=False)
            try:
                wait_for(lambda: len(lines(starts)) > before, 120, "first dispatch", poll=0.001)
                firsts.append(float(lines(starts)[before]) - d.started)
                time.sleep(2.0)  # let it work through the queue a while, then read its memory
                cur, _ = rss_mb(d.proc.pid)
                rss.append(cur)
                time.sleep(RATE_WINDOW_S - 2.0)  # past a scan interval: a rescan's listing counts in the rate
                peak.append(rss_mb(d.proc.pid)[1])
                rate.append((len(lines(starts)) - before - 1) / RATE_WINDOW_S)
            finally:
                d.stop()
    return {"first": median(firsts), "status": median(status), "status_first": first_status, "ls": median(ls), "submit": median(submit),
            "rss": median(rss),
            "peak": median(peak), "rate": median(rate)}


def _growth(small: float, big: float, ratio: float) -> str:
    """The exponent k in t ∝ n^k between two sizes: 1 is linear, below 1 is sublinear."""
    if small <= 0 or big <= 0:
        return "-"
    return f"n^{math.log(big / small) / math.log(ratio):.2f}"


Row = tuple[str, str, Callable[[float], str]]  # key, label, format


def SECONDS(v: float) -> str:
    return f"{v:.2f} s"


def MB(v: float) -> str:
    return f"{v:.0f} MB"


def MS(v: float) -> str:
    return f"{v * 1000:.0f} ms"


QUEUED_ROWS: list[Row] = [
    ("first", "`spoold run` → first dispatch", SECONDS),
    ("status_first", "`spoold status`, the first (before any census of the queue)", SECONDS),
    ("status", "`spoold status`", SECONDS),
    ("ls", "`spoold ls --state queued \\| head`", SECONDS),
    ("submit", "`spoold submit` (its place and estimate behind every queued task)", MS),
    ("rss", "daemon RSS while dispatching", MB),
    ("peak", "daemon peak RSS", MB),
    ("rate", "dispatch rate with the queue this deep", lambda v: f"{v:.1f} /s"),
]
DONE_ROWS: list[Row] = [
    ("status", "`spoold status`", SECONDS),
    ("ls", "`spoold ls --state done \\| head`", SECONDS),
    ("show", "`spoold show ID`", SECONDS),
    ("result", "`spoold result ID`", SECONDS),
    ("rss", "idle daemon peak RSS", MB),
    ("idle_cpu", "idle daemon CPU (most of it watchfiles waking every 2 ms)", lambda v: f"{v * 1000:.1f} ms/s"),
]


def _table(res: dict[int, dict[str, float]], spec: list[Row], what: str,
           targets: dict[int, dict[str, float]]) -> str:
    """One row a figure: its value at each size, its growth between each pair of sizes, its targets."""
    sizes = sorted(res)
    rows = []
    for key, label, fmt in spec:
        vals = [res[n][key] for n in sizes]
        by_size = dict(zip(sizes, vals, strict=True))
        growth = [_growth(by_size[n], by_size[m], m / n) for n, m in itertools.pairwise(sizes)]
        verdicts = [target(f"{n:,} {what}: {label}", fmt(v), f"≤ {fmt(targets[n][key])}", v <= targets[n][key])
                    + f" (at {n // 1000}k)" for n, v in by_size.items() if key in targets.get(n, {})]
        rows.append([label, *[fmt(v) for v in vals], *growth, "; ".join(verdicts)])
    steps = [f"growth {n // 1000}k→{m // 1000}k" for n, m in itertools.pairwise(sizes)]
    return table(["", *[f"{n:,} {what}" for n in sizes], *steps, "targets"], rows)


def run(quick: bool) -> str:
    sizes = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)  # 1M: the stretch, one run
    runs = 1 if quick else 3
    queued = _table({n: measure(n, 3, 1 if n >= 1_000_000 else runs) for n in sizes}, QUEUED_ROWS, "queued",
                    QUEUED_TARGETS)
    note = (f"Medians of 3 runs of `status`/`ls`/`submit` (no daemon), after a first `status` that finds the files "
            "as a foreign tool wrote them and keeps the queue's census; the daemon's rows are medians of "
            f"{runs} run(s) (one at 1,000,000), RSS read 2 s after the first dispatch, the dispatch rate counted over "
            f"the {RATE_WINDOW_S:g} s after it (longer than a scan interval). Growth n^1.00 is linear; "
            "n^0 is flat.")
    done = _table({n: measure_done(n, runs) for n in sizes[:2]}, DONE_ROWS, "done", DONE_TARGETS)
    dnote = (f"Finished tasks (a task file and a result each) over {PARTITIONS} `done/` date partitions; "
             "`show`/`result` look up a task from the middle. The daemon never lists `done/`.")
    return (f"### Scale: a deep queue\n\n{queued}\n\n{note}"
            f"\n\n### Scale: many finished tasks\n\n{done}\n\n{dnote}")
