"""Eight real `claude -p` tasks at once (pinned CLI, the test suite's fake API): spoold's memory and CPU beside the CLI's."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from bench.cli_overhead import SERVE
from bench.common import ROOT, Daemon, count_results, drop, new_spool, rss_mb, table, tmpdir, wait_for

CONCURRENCY = 8
SLOW_S = 2  # the fake API holds each answer this long, so the eight runs overlap however fast each CLI starts
PROMPT = f"Why is the sky blue? [[slow:{SLOW_S}]]\n"
SAMPLE_S = 0.050
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


class Proc(NamedTuple):
    """The fields of /proc/PID/stat this benchmark reads."""

    name: str
    ppid: int
    cpu_s: float  # utime + stime, all threads
    reaped_s: float  # cutime + cstime: the CPU of children it has waited for, and theirs
    rss_mb: float


@dataclass
class Trace:
    """What the samples saw of the daemon and the processes under it, peaks kept."""

    daemon_mb: float = 0.0
    clis_mb: float = 0.0  # the sum over every process under the daemon at one moment
    cli_mb: dict[int, float] = field(default_factory=dict)  # per CLI (the daemon's child): its process tree's RSS
    cli_s: dict[int, float] = field(default_factory=dict)  # per process under the daemon: CPU when last seen
    most_clis: int = 0
    names: set[str] = field(default_factory=set)
    samples: int = 0


def run(quick: bool) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from claude_cli import CLAUDE_CODE_VERSION, ensure_claude

    tasks = CONCURRENCY if quick else CONCURRENCY * 3
    claude = ensure_claude()
    with _fake_api() as url:
        return _measure(claude, url, tasks, CLAUDE_CODE_VERSION)


@contextlib.contextmanager
def _fake_api() -> Iterator[str]:
    """The fake Messages API in its own process (our sampling must not hold its GIL), stopped by its pid."""
    server = subprocess.Popen([sys.executable, "-c", SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=ROOT / "tests")
    try:
        yield server.stdout.readline().strip()
    finally:
        server.stdin.close()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _measure(claude: Path, url: str, tasks: int, version: str) -> str:
    from claude_cli import claude_env

    with tmpdir("concurrency") as base:
        home = base / "home"
        home.mkdir()
        env = claude_env(url, home, subscription=True)
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        root = new_spool(base, claude_bin=str(claude), concurrency=CONCURRENCY, max_requests=1_000_000)
        with Daemon(root, env={**env, "PYTHONPATH": str(ROOT)}) as daemon:
            pid = daemon.proc.pid
            drop(root, "warm.md", PROMPT)  # the first run pays for cold caches
            wait_for(lambda: _finished(root) >= 1, 120, "warm-up", poll=0.01)
            idle_mb = rss_mb(pid)[0]
            start = _procs()[pid]
            trace = Trace()
            own = time.process_time()
            t0 = time.perf_counter()
            for i in range(tasks):
                drop(root, f"q{i:02}.md", PROMPT)
            _watch(trace, pid, lambda: _finished(root) >= tasks + 1, 600)
            wall = time.perf_counter() - t0
            own = time.process_time() - own
            end = _procs()[pid]
        done, failed = count_results(root) - 1, count_results(root, "failed")
    spoold_s = end.cpu_s - start.cpu_s
    cli_s = end.reaped_s - start.reaped_s  # every CLI was waited for before its result was written
    peaks = list(trace.cli_mb.values())
    usage = [
        ["RSS before the batch (after the warm-up)", f"{idle_mb:.0f} MB", "(none running)"],
        ["peak RSS, all processes at once", f"{trace.daemon_mb:.0f} MB", f"{trace.clis_mb:.0f} MB"],
        ["peak RSS per process", f"{trace.daemon_mb:.0f} MB",
         f"{statistics.median(peaks):.0f} MB median, {max(peaks):.0f} MB max"],
        ["CPU, whole batch", f"{spoold_s:.2f} s", f"{cli_s:.1f} s"],
        ["CPU per task", f"{spoold_s / tasks * 1000:.0f} ms", f"{cli_s / tasks:.2f} s"],
        ["share of the CPU", f"{spoold_s / (spoold_s + cli_s):.1%}", f"{cli_s / (spoold_s + cli_s):.1%}"],
    ]
    batch = [
        ["tasks dropped at once", tasks],
        ["wall time, first drop → last result", f"{wall:.1f} s"],
        ["tasks/s", f"{tasks / wall:.2f}"],
        ["most CLI processes at once", f"{trace.most_clis} (concurrency {CONCURRENCY})"],
        ["results in done/", f"{done} of {tasks}" + (f", **{failed} in failed/**" if failed else "")],
    ]
    sampled = sum(trace.cli_s.values())
    note = (f"Claude Code {version} against the test suite's fake Messages API on loopback, which holds each answer "
            f"{SLOW_S} s (`[[slow:{SLOW_S}]]`) so that the runs overlap; one warm-up task first. `/proc` sampled "
            f"every {SAMPLE_S * 1000:g} ms ({trace.samples} samples): RSS of the daemon, and of every process under it "
            f"(walked by parent pid: {', '.join(sorted(trace.names)) or 'none'}). CPU is exact, not sampled: the "
            f"daemon's utime+stime, and for the CLIs the cutime+cstime of the children it reaped (the samples saw "
            f"{sampled:.1f} s of it). This sampler used {own:.1f} s of CPU on the same cores.")
    return ("### Eight real CLI runs at once\n\n" + table(["", "spoold daemon", "`claude -p` CLIs"], usage) + "\n\n"
            + table(["batch", ""], batch) + "\n\n" + note)


def _watch(trace: Trace, daemon: int, finished: Callable[[], bool], timeout: float) -> None:
    """Sample every SAMPLE_S until `finished()` is true."""
    deadline = time.monotonic() + timeout
    tick = time.monotonic()
    while not finished():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for the batch")
        _sample(trace, daemon)
        tick += SAMPLE_S
        time.sleep(max(0.0, tick - time.monotonic()))


def _sample(trace: Trace, daemon: int) -> None:
    procs = _procs()
    children: dict[int, list[int]] = defaultdict(list)
    for pid, p in procs.items():
        children[p.ppid].append(pid)
    trace.samples += 1
    trace.daemon_mb = max(trace.daemon_mb, rss_mb(daemon)[0])
    clis = children[daemon]
    trace.most_clis = max(trace.most_clis, len(clis))
    total = 0.0
    for cli in clis:
        tree = _tree(children, cli)
        mb = sum(procs[p].rss_mb for p in tree)
        trace.cli_mb[cli] = max(trace.cli_mb.get(cli, 0.0), mb)
        total += mb
        for p in tree:
            trace.cli_s[p] = procs[p].cpu_s
            trace.names.add(procs[p].name)
    trace.clis_mb = max(trace.clis_mb, total)


def _tree(children: dict[int, list[int]], top: int) -> list[int]:
    out, todo = [], [top]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _procs() -> dict[int, Proc]:
    """Every process on the machine, from /proc/*/stat; one that exits while we read is skipped."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        comm, x = stat[stat.index(b"(") + 1:stat.rindex(b")")], stat[stat.rindex(b")") + 2:].split()
        # x[0] is field 3 of proc(5): comm may hold spaces and parentheses, so split after its last ")"
        out[int(name)] = Proc(comm.decode(errors="replace"), int(x[1]), (int(x[11]) + int(x[12])) * TICK_S,
                              (int(x[13]) + int(x[14])) * TICK_S, int(x[21]) * PAGE_MB)
    return out


def _finished(root: Path) -> int:
    """Results in done/ and failed/: a failed run must show in the table, not hang the benchmark."""
    return count_results(root) + count_results(root, "failed")
