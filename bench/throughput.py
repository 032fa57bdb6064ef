"""Many trivial tasks through spoold, nq and task-spooler in the same run: tasks per second, first drop to last result."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    NOOP,
    Daemon,
    count_results,
    drop,
    journaled_fs,
    lines,
    median,
    new_spool,
    table,
    target,
    tmpdir,
    wait_for,
)

MARK = ["sh", "-c", 'date +%s.%N >> "$0"; : > "$1"']  # nq/tsp: same start stamp, plus a file when it ends


def _spoold(n: int, conc: int, durability: str = "full", under: Path | None = None) -> float:
    with tmpdir("tput-spoold", under) as base:
        starts = base / "starts"
        root = new_spool(base, backend="command", command=[*NOOP, str(starts)], concurrency=conc,
                         max_requests=1_000_000, window_minutes=60, durability=durability)
        with Daemon(root) as d:
            t0 = time.perf_counter()
            for i in range(n):
                drop(root, f"t{i:05d}.md", f"task {i}\n")
            wait_for(lambda: count_results(root) >= n, 600, "all results", poll=0.01)
            elapsed = time.perf_counter() - t0
        assert len(lines(starts)) == n, "every task ran once"
        assert durability != "batch" or under is None or "batch is off" not in d.log_path.read_text(), "no batch"
    return n / elapsed


def _wait_marks(marks: Path, n: int) -> None:
    wait_for(lambda: len(os.listdir(marks)) >= n, 600, "all jobs", poll=0.01)


def _nq(n: int, conc: int, under: Path | None = None) -> float:
    """nq runs one job at a time per queue directory; concurrency c is c directories, filled round-robin."""
    with tmpdir("tput-nq", under) as base:
        marks = base / "marks"
        marks.mkdir()
        dirs = [base / f"q{k}" for k in range(conc)]
        for d in dirs:
            d.mkdir()
        t0 = time.perf_counter()
        for i in range(n):
            env = dict(os.environ, NQDIR=str(dirs[i % conc]))
            subprocess.run(["nq", "-q", *MARK, str(base / "starts"), str(marks / str(i))], env=env, check=True,
                           stdout=subprocess.DEVNULL)
        _wait_marks(marks, n)
        elapsed = time.perf_counter() - t0
        for d in dirs:
            subprocess.run(["nq", "-w"], env=dict(os.environ, NQDIR=str(d)), check=False)
    return n / elapsed


def _tsp(n: int, conc: int, under: Path | None = None) -> float:
    with tmpdir("tput-tsp", under) as base:
        marks = base / "marks"
        marks.mkdir()
        env = dict(os.environ, TS_SOCKET=str(base / "socket"), TMPDIR=str(base), TS_MAXFINISHED=str(n + 10),
                   TS_MAXCONN=str(n + 10))
        subprocess.run(["tsp", "-S", str(conc)], env=env, check=True)
        try:
            t0 = time.perf_counter()
            for i in range(n):
                subprocess.run(["tsp", *MARK, str(base / "starts"), str(marks / str(i))], env=env, check=True,
                               stdout=subprocess.DEVNULL)
            _wait_marks(marks, n)
            elapsed = time.perf_counter() - t0
        finally:
            subprocess.run(["tsp", "-K"], env=env, check=False, stderr=subprocess.DEVNULL)
    return n / elapsed


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)


def _durable(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)


def _floor(n: int, conc: int, under: Path | None = None) -> float:
    """spoold's file protocol (format 2) for n tasks, replayed with nothing else: no parsing, no daemon, no asyncio.

    The same creates, fsyncs and renames per task as spoold does (intake batched as for a bulk
    drop; then per task the claim and ledger write under one lock, the same `sh` job, and finish),
    in `conc` threads: what any program that keeps spoold's promises pays on this disk, and so
    the ceiling for spoold.
    """
    with tmpdir("tput-floor", under) as base:
        d = {k: str(base / k) for k in ("inbox", "tmp", "queued", "running", "done", "ledger")}
        for p in d.values():
            os.mkdir(p)
        for i in range(n):
            Path(d["inbox"], f"t{i}.md").write_text(f"task {i}\n")
        body = b"---\nid: x\nstatus: queued\n---\ntask\n"
        t0 = time.perf_counter()
        for i in range(n):
            os.rename(f"{d['inbox']}/t{i}.md", f"{d['tmp']}/c{i}")
        for i in range(n):  # intake's order: the queued copies written, then the claims durable, then queued
            _durable(f"{d['tmp']}/a{i}", body)
        _fsync_dir(d["tmp"])
        _fsync_dir(d["inbox"])
        for i in range(n):
            os.link(f"{d['tmp']}/a{i}", f"{d['queued']}/q{i}")
            os.unlink(f"{d['tmp']}/a{i}")
        _fsync_dir(d["queued"])
        for i in range(n):
            os.unlink(f"{d['tmp']}/c{i}")
        todo, ledger_lock = iter(range(n)), threading.Lock()

        def worker() -> None:
            while True:
                with ledger_lock:  # claim and ledger write: one at a time, as under spoold's ledger lock
                    i = next(todo, None)
                    if i is None:
                        return
                    run, done = f"{d['running']}/r{i}", f"{d['done']}/r{i}"
                    os.rename(f"{d['queued']}/q{i}", run)  # format 2: a claim is a rename, then a read
                    Path(run).read_bytes()
                    _durable(f"{d['tmp']}/l{i}", b'{"starts":[1]}')  # the ledger's write, then the claim's dirs
                    os.replace(f"{d['tmp']}/l{i}", f"{d['ledger']}/host.json")
                    _fsync_dir(d["ledger"])
                    _fsync_dir(d["running"])
                    _fsync_dir(d["queued"])
                subprocess.run([*MARK[:3], str(base / "starts"), str(base / "end")], stdin=subprocess.DEVNULL,
                               capture_output=True, check=True)
                _durable(f"{d['tmp']}/e{i}", body)  # finish: the result, then the task's move beside it
                os.link(f"{d['tmp']}/e{i}", f"{d['done']}/e{i}")
                os.unlink(f"{d['tmp']}/e{i}")
                _fsync_dir(d["done"])
                os.rename(run, done)
                _fsync_dir(d["done"])

        threads = [threading.Thread(target=worker) for _ in range(conc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return n / (time.perf_counter() - t0)


def run(quick: bool) -> str:
    n = 1000
    repeats = 1 if quick else 3
    peers = {"nq": _nq, "tsp": _tsp} if shutil.which("nq") and shutil.which("tsp") else {}
    with journaled_fs() as fs:
        rows = _rows(n, repeats, peers, fs)
    headers = ["concurrency", "spoold tasks/s", "durable floor tasks/s (spoold ÷ floor)", "spoold batch tasks/s",
               *[f"{k} tasks/s" for k in peers], "target: ≥ 0.9× floor", *(["target: batch ≥ faster peer"] if peers else [])]
    note = _note(n, repeats, peers, fs)
    return "### Throughput\n\n" + table(headers, rows) + "\n\n" + note


def _rows(n: int, repeats: int, peers: dict[str, Callable[..., float]], fs: Path | None) -> list[list[str]]:
    rows = []
    for conc in (1, 4):
        rates: dict[str, list[float]] = {"spoold": [], "batch": [], "floor": [], **{k: [] for k in peers}}
        for _ in range(repeats):  # interleaved, so a noisy moment hits every tool alike
            rates["spoold"].append(_spoold(n, conc, under=fs))
            rates["batch"].append(_spoold(n, conc, "batch", under=fs))
            rates["floor"].append(_floor(n, conc, under=fs))
            for name, fn in peers.items():
                rates[name].append(fn(n, conc, under=fs))
        med = {k: median(v) for k, v in rates.items()}
        best = max((med[k] for k in peers), default=float("nan"))
        to_floor, to_best = med["spoold"] / med["floor"], med["batch"] / best
        row = [str(conc), f"{med['spoold']:.0f}", f"{med['floor']:.0f} ({to_floor:.2f}×)", f"{med['batch']:.0f}"]
        row += [f"{med[k]:.0f}" for k in peers]
        row.append(target(f"throughput, concurrency {conc}: default durability ÷ durable floor", f"{to_floor:.2f}×",
                          "≥ 0.9×", to_floor >= 0.9))
        if peers:
            row.append(target(f"throughput, concurrency {conc}: `durability: batch` ÷ faster of nq and tsp",
                              f"{to_best:.2f}×", "≥ 1.0×", to_best >= 1.0))
        rows.append(row)
    return rows


def _note(n: int, repeats: int, peers: dict[str, Callable[..., float]], fs: Path | None) -> str:
    where = ("every tool on one fresh ext4 with its journal (data=ordered), on a loop device backed by a file, "
             "where group commit is on" if fs is not None else
             "the temporary directory's filesystem (no loop device here: `durability: batch` may fall back to full)")
    note = (f"Spool and queues on {where}. "f"{n} trivial tasks per run, median of {repeats} interleaved run(s). spoold: files dropped into `inbox/` "
            "with the daemon already running, `command` backend, every task fsynced and a result file written; "
            "the clock runs from the first drop to the last result file. nq/tsp: one `nq`/`tsp` call per job "
            "(their way to submit), until the last job's end marker exists; neither fsyncs. nq has no slots, so "
            "concurrency 4 is four queue directories filled round-robin.")
    note += (" spoold batch: the same with `durability: batch` (group commit every 50 ms, one syncfs for many "
             "files).")
    note += ("\n\nDurable floor: spoold's own file protocol (the creates, fsyncs and renames of intake, claim, "
             "ledger write and finish, plus the same `sh` job) replayed in a tight loop in as many threads, with no "
             "parsing and no daemon: the ceiling for anything that keeps every task durable this way on this disk. "
             "The gap from spoold to it is spoold's Python; the gap from it to the peers is the fsyncs.")
    if not peers:
        note += " nq and tsp are not installed (`apt-get install nq task-spooler`): no ratios."
    return note
