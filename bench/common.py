"""Shared pieces of the benchmarks: statistics, Markdown tables, temporary spools and a daemon subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 1
PY = sys.executable
NOOP = ["sh", "-c", 'date +%s.%N >> "$0"']  # records its start time, exits; "$0" is the file (argv[3])


def child_env(**extra: str) -> dict[str, str]:
    """The environment a user has: bytecode caching on (an installed package has .pyc files), no stray spool."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "SPOOLD_DIR")}
    env.update(extra)
    return env


def spoold_exe() -> str:
    """The installed `spoold` console script beside this interpreter (not a pyenv shim, which adds a shell)."""
    beside = Path(PY).with_name("spoold")
    return str(beside) if beside.exists() else (shutil.which("spoold") or "spoold")


TARGETS: list[tuple[str, str, str, bool]] = []  # (what, measured, goal, met), gathered for run.py's summary


def target(what: str, measured: str, goal: str, met: bool) -> str:
    """Record a target's verdict for the summary table and return it for the part's own table."""
    TARGETS.append((what, measured, goal, met))
    return f"{goal} {'met' if met else 'missed'}"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], p: float) -> float:
    """Percentile by linear interpolation (p in 0..100)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table, numbers already formatted by the caller."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


@contextlib.contextmanager
def tmpdir(prefix: str, under: Path | None = None) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=f"spoold-bench-{prefix}-", dir=under))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def journaled_fs(size_mb: int = 2048) -> Iterator[Path | None]:
    """A fresh ext4 with its journal (data=ordered) on a loop device, where group commit is on; None where
    it cannot be made (not root, no loop devices): then `durability: batch` falls back to full."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        yield None
        return
    base = Path(tempfile.mkdtemp(prefix="spoold-bench-fs-"))
    image, mnt = base / "disk.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    mounted = False
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True).returncode == 0
        yield mnt if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def new_spool(base: Path, **config: object) -> Path:
    from spoold import spool

    sp = spool.open_spool(base / "spool")
    if config:
        sp.config_path.write_text(yaml.safe_dump(config))
    return sp.root


def drop(root: Path, name: str, text: str) -> None:
    """Drop a task the way a script should: write beside the spool, rename into inbox/."""
    staging = root.parent / f".staging-{name}"
    staging.write_text(text)
    os.rename(staging, root / "inbox" / name)


def wait_for(pred: Callable[[], object], timeout: float, what: str, poll: float = 0.002) -> object:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def count_results(root: Path, state: str = "done") -> int:
    n = 0
    base = root / state
    for d in [base, *(base / x for x in os.listdir(base) if (base / x).is_dir())]:
        n += sum(1 for x in os.listdir(d) if x.endswith(".result.md"))
    return n


def cpu_s(pid: int) -> float:
    """CPU seconds a process has used (utime + stime, every thread), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MB, from /proc."""
    cur = peak = float("nan")
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cur, peak


class Daemon:
    """`spoold run` as a subprocess on a benchmark spool, started when it logs that it serves."""

    def __init__(self, root: Path, env: dict[str, str] | None = None, wait_serving: bool = True) -> None:
        self.root = root
        self.log_path = root.parent / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.started = time.time()
        self.proc = subprocess.Popen([PY, "-m", "spoold.cli", "run", "--spool", str(root)], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=child_env(PYTHONUNBUFFERED="1", **(env or {})),
                                     cwd=ROOT)
        if wait_serving:
            wait_for(lambda: b"serving" in self.log_path.read_bytes() or self.proc.poll() is not None, 60, "daemon start",
                     poll=0.01)
            if self.proc.poll() is not None:
                raise RuntimeError(f"spoold run exited: {self.log_path.read_text()[-2000:]}")

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
